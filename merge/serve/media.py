"""Images and videos named by a request's URLs: ``data:`` URLs always; ``file://`` paths only under the folder the
operator allows (``--allow-local-media``); ``http(s)://`` only when the operator opts in (``--allow-remote-media``),
within a byte limit and a time limit.

Every image goes through :func:`merge.runtime.images.load_image` (EXIF orientation applied, the size checked from
the header before decoding) and every video through the folder's video processor, as ``merge run`` reads them.
Each refusal is a :class:`~merge.serve.errors.ApiError` naming the request field it came from.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge.errors import MergeError

from .errors import ApiError, bad_request
from .limits import DEFAULT_MAX_MEDIA_BYTES, DEFAULT_MEDIA_TIMEOUT

CHUNK = 1 << 16


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from, and how much of it."""

    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES  # per image or video, after base64 decoding or downloading
    local_root: Path | None = None  # file:// URLs are served from under this folder only
    remote: bool = False  # http(s):// URLs are fetched only when True
    timeout: float = DEFAULT_MEDIA_TIMEOUT  # seconds for a whole download


@dataclass(frozen=True)
class MediaRef:
    """One image or video part of a request: its kind, its URL and the request field that holds the URL."""

    kind: str  # "image" or "video"
    url: str
    param: str


def _too_large(param: str, size: int | str, limit: int) -> ApiError:
    return ApiError(413, f"{param}: the media is {size} bytes, more than the {limit} this server takes "
                         "(--max-media-bytes)", param=param, code="media_too_large")


def _data_url(ref: MediaRef, policy: MediaPolicy) -> bytes:
    header, comma, payload = ref.url.partition(",")
    if not comma:
        raise bad_request(f"{ref.param}: a data: URL needs a ',' before its data", ref.param)
    if not header.endswith(";base64"):
        raise bad_request(f"{ref.param}: only base64 data: URLs are taken (data:<type>;base64,<data>)", ref.param)
    if len(payload) > (policy.max_bytes + 2) // 3 * 4 + 4:
        raise _too_large(ref.param, f"about {len(payload) // 4 * 3}", policy.max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{ref.param}: the data: URL's data is not valid base64", ref.param) from None
    if len(data) > policy.max_bytes:
        raise _too_large(ref.param, len(data), policy.max_bytes)
    return data


def _local_path(ref: MediaRef, policy: MediaPolicy) -> Path:
    if policy.local_root is None:
        raise bad_request(f"{ref.param}: file:// URLs are refused; the server takes local files only under a folder "
                          "its operator names (--allow-local-media)", ref.param)
    parsed = urllib.parse.urlsplit(ref.url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"{ref.param}: a file:// URL names no host (file:///path)", ref.param)
    path = Path(urllib.parse.unquote(parsed.path))
    if not path.is_absolute():
        raise bad_request(f"{ref.param}: a file:// URL holds an absolute path", ref.param)
    root = policy.local_root.resolve()
    resolved = path.resolve()  # symbolic links and .. followed first: a link out of the folder is outside it
    if not resolved.is_relative_to(root):
        raise bad_request(f"{ref.param}: {path} is not under the folder this server takes local files from",
                          ref.param)
    if not resolved.exists():
        raise bad_request(f"{ref.param}: {path} does not exist", ref.param)
    if resolved.is_file() and resolved.stat().st_size > policy.max_bytes:
        raise _too_large(ref.param, resolved.stat().st_size, policy.max_bytes)
    return resolved


class _NoOtherSchemes(urllib.request.HTTPRedirectHandler):
    """Redirects stay on http(s): urllib would also follow one to ftp://."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "a redirect away from http(s)", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(ref: MediaRef, policy: MediaPolicy) -> bytes:
    if not policy.remote:
        raise bad_request(f"{ref.param}: http(s) URLs are refused; the server fetches media only when its operator "
                          "allows it (--allow-remote-media)", ref.param)
    opener = urllib.request.build_opener(_NoOtherSchemes())
    deadline = time.monotonic() + policy.timeout
    request = urllib.request.Request(ref.url, headers={"User-Agent": "qwen3vl-merge"})
    try:
        with opener.open(request, timeout=policy.timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise _too_large(ref.param, int(length), policy.max_bytes)
            chunks, size = [], 0
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > policy.max_bytes:
                    raise _too_large(ref.param, f"more than {policy.max_bytes}", policy.max_bytes)
                if time.monotonic() > deadline:
                    raise _timed_out(ref, policy)
                chunks.append(chunk)
            return b"".join(chunks)
    except ApiError:
        raise
    except TimeoutError:
        raise _timed_out(ref, policy) from None
    except urllib.error.HTTPError as exc:
        raise bad_request(f"{ref.param}: fetching the URL failed with HTTP status {exc.code}", ref.param) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise _timed_out(ref, policy) from None
        raise bad_request(f"{ref.param}: fetching the URL failed ({reason})", ref.param) from None


def _timed_out(ref: MediaRef, policy: MediaPolicy) -> ApiError:
    return bad_request(f"{ref.param}: fetching the URL took longer than {policy.timeout:g} s (--media-timeout)",
                       ref.param)


def fetch_bytes(ref: MediaRef, policy: MediaPolicy) -> bytes | Path:
    """The media's bytes (data: and http(s) URLs) or its checked path (file:// URLs)."""
    scheme = urllib.parse.urlsplit(ref.url).scheme.lower() if ":" in ref.url else ""
    if scheme == "data":
        return _data_url(ref, policy)
    if scheme == "file":
        return _local_path(ref, policy)
    if scheme in ("http", "https"):
        return _download(ref, policy)
    raise bad_request(f"{ref.param}: a media URL is data:, file:// or http(s)://, got {ref.url[:40]!r}", ref.param)


def load_image(ref: MediaRef, policy: MediaPolicy):
    """A PIL image, upright (EXIF orientation applied)."""
    from merge.runtime.images import load_image as read_image

    source = fetch_bytes(ref, policy)
    if isinstance(source, Path) and not source.is_file():
        raise bad_request(f"{ref.param}: {source} is not a file", ref.param)
    try:
        return read_image(source)
    except MergeError as exc:
        raise bad_request(f"{ref.param}: {exc}", ref.param) from None


def load_video(ref: MediaRef, policy: MediaPolicy, preprocessor: Any):
    """A :class:`merge.runtime.video.Video` (frames sampled and resized by the folder's video processor): a video
    file, or for a file:// URL also a folder of frames."""
    source = fetch_bytes(ref, policy)
    try:
        if isinstance(source, Path):
            return preprocessor.load_video(source)
        with _temporary_file(source) as path:
            return preprocessor.load_video(path)
    except MergeError as exc:
        raise bad_request(f"{ref.param}: {exc}", ref.param) from None


@contextlib.contextmanager
def _temporary_file(data: bytes):
    """PyAV reads a video from a file: the bytes written to a private temporary one, removed after."""
    fd, name = tempfile.mkstemp(prefix="merge-serve-", suffix=".video")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
