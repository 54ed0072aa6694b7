"""The one loader of a combined folder: ``run``, ``verify``, ``inspect`` and ``CombinedModel`` open a folder here
before anything else reads it, and read its files only through what it holds.

A combined folder is untrusted input (people download them), so :meth:`CombinedFolder.open` checks, cheaply (no
hashing), before any file is used:

- ``merge.json`` is there and well-formed (every field typed), and ``config.json`` is a Qwen3-VL config;
- every file the manifest names is a plain name inside the folder (no path, no ``..``), a regular file (a FIFO,
  socket or device is refused, and never waited on: :func:`merge.contract.reading.open_regular`), not a symbolic
  link (opened with ``O_NOFOLLOW``), except in a Hugging Face hub snapshot a link to the same repository's
  ``../../blobs/`` (hard links are accepted: a hard link is the file itself);
- ``model.onnx`` and ``model.onnx.data`` have the sizes the manifest records;
- ``config.json`` agrees with the model: layers, KV heads, vocabulary, patch width, vision token ids
  (:mod:`merge.contract.agreement`);
- every tensor of the model with external data names ``model.onnx.data`` (a plain name) and lies inside it:
  offset + length within the file, length equal to what its type and shape need.

Files are opened once, through a descriptor on the folder, and kept: the model's bytes, the data file (mapped)
and the small preprocessing files are then read from what was checked, never again by path (so a file swapped
for a symbolic link after the check is never read). ``check_checksums`` adds SHA-256 of the model files and
of every preprocessing file read (tokenizer, chat template, configs: the bytes held) against the manifest, and
refuses files the manifest does not list or has no checksum for. Every failure is one :class:`MergeError`
naming the file, the tensor and the numbers that disagree.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from merge.errors import MergeError

from .agreement import check_config_agrees
from .config import ModelConfig
from .manifest import MAX_MANIFEST_BYTES, Manifest
from .names import CONFIG_FILE, DATA_FILE, MANIFEST_FILE, MODEL_FILE, TOOL_NAME
from .onnx_wire import TensorInfo, WireError, model_interface, model_tensors
from .reading import load_json, open_file, open_regular, read_and_close, read_fd

MAX_SMALL_FILE_BYTES = 64 << 20  # tokenizer.json and friends are a few MB
MAX_MODEL_BYTES = 2 << 30  # a protobuf cannot be larger; the weights live in the data file
# the oldest ONNX Runtime that has every op a combined folder uses (MRotaryEmbedding came in 1.29; 1.28 refuses to
# load the model); pyproject.toml asks for the same
MIN_ONNXRUNTIME = "1.29"


def _plain_name(name: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("~"):
        raise MergeError(f"{where} names {name!r}, which is not a plain file name inside the folder")
    return name


# TensorProto data types numpy can view in place (the others, 4-bit types for one, go to ONNX Runtime as bytes)
_NUMPY_TYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
                9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}

# ONNX Runtime turns external data given in memory into embedded tensors, and refuses an embedded tensor of more
# than 2 GiB ("exceeds the 2147483648 byte limit for embedded initializer data"; measured with 1.32)
MAX_IN_MEMORY_TENSOR = 2**31 - 1


@dataclass
class CombinedFolder:
    path: Path
    manifest: Manifest
    config: ModelConfig
    model_bytes: bytes
    data: mmap.mmap | None
    files: dict[str, bytes] = field(default_factory=dict)  # the preprocessing files, as read and checked
    largest_external: int = 0  # bytes of the largest tensor stored in the data file
    external: list[TensorInfo] = field(default_factory=list)  # the tensors stored in the data file (checked)

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def data_path(self) -> Path:
        return self.path / DATA_FILE

    # -- opening ----------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path | str, *, check_checksums: bool = False) -> CombinedFolder:
        path = Path(folder)
        hint = f"build one with `python -m merge build --out {folder}`"
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MergeError(f"{folder}: no such folder ({hint})") from None
        except NotADirectoryError:
            raise MergeError(f"{folder} is not a folder (expected a combined folder; {hint})") from None
        except OSError as exc:
            raise MergeError(f"{folder}: cannot be opened ({exc.strerror})") from None
        try:
            return cls._open(path, dir_fd, hint, check_checksums)
        finally:
            os.close(dir_fd)

    @classmethod
    def _open(cls, path: Path, dir_fd: int, hint: str, check_checksums: bool) -> CombinedFolder:
        names = set(os.listdir(dir_fd))
        if MODEL_FILE not in names:
            raise MergeError(f"{path} is not a combined folder: no {MODEL_FILE} ({hint})")
        if MANIFEST_FILE not in names:
            raise MergeError(f"{path} is not a complete combined folder: no {MANIFEST_FILE} ({hint})")
        manifest_bytes = _read(dir_fd, path, MANIFEST_FILE, MAX_MANIFEST_BYTES)
        manifest_data = load_json(manifest_bytes, path / MANIFEST_FILE)
        manifest = Manifest.from_json(manifest_data, str(path / MANIFEST_FILE))
        where = str(path / MANIFEST_FILE)
        listed = {_plain_name(n, where) for n in (*manifest.parts.values(), *manifest.preprocessing_files,
                                                  *manifest.checksums, *manifest.sizes)}
        missing = sorted(listed - names)
        if missing:
            raise MergeError(f"{path}: {MANIFEST_FILE} lists {', '.join(missing)}, which the folder does not hold")
        if CONFIG_FILE not in names:
            raise MergeError(f"{path} is not a combined folder: no {CONFIG_FILE} ({hint})")
        files = {name: _read(dir_fd, path, name, MAX_SMALL_FILE_BYTES)
                 for name in sorted({CONFIG_FILE, *manifest.preprocessing_files})}
        config_data = load_json(files[CONFIG_FILE], path / CONFIG_FILE)
        config = ModelConfig.from_dict(config_data, str(path / CONFIG_FILE))

        model_fd = _open_regular(dir_fd, path, MODEL_FILE)
        try:
            model_size = os.fstat(model_fd).st_size
            _check_size(path, MODEL_FILE, model_size, manifest)
            if model_size > MAX_MODEL_BYTES:
                raise MergeError(f"{path / MODEL_FILE} is {model_size} bytes, more than a protobuf can hold")
            model_bytes = read_fd(model_fd, model_size)
            digest = hashlib.sha256(model_bytes).hexdigest() if check_checksums else None
        finally:
            os.close(model_fd)
        try:
            tensors = model_tensors(model_bytes)
            check_config_agrees(config, model_interface(model_bytes), manifest)  # KV heads, layers, token ids
        except WireError as exc:
            raise MergeError(f"{path / MODEL_FILE} is not a readable ONNX model ({exc})") from None
        external = [t for t in tensors if t.is_external]

        data = None
        if external or DATA_FILE in names:
            data_fd = _open_regular(dir_fd, path, DATA_FILE)
            try:
                size = os.fstat(data_fd).st_size
                _check_size(path, DATA_FILE, size, manifest)
                data = mmap.mmap(data_fd, 0, access=mmap.ACCESS_READ) if size else None
            finally:
                os.close(data_fd)
            _check_external(path, external, len(data) if data is not None else 0)
        largest = max((t.nbytes() or 0 for t in external), default=0)
        folder = cls(path=path, manifest=manifest, config=config, model_bytes=model_bytes, data=data, files=files,
                     largest_external=largest, external=external)
        if check_checksums:
            folder._check_checksums(names, digest)
        return folder

    # -- checksums ----------------------------------------------------------------------------------------------
    def _check_checksums(self, names: set[str], model_digest: str | None) -> None:
        """SHA-256 of the model files and of every preprocessing file read (from the bytes held) against the
        manifest; files it does not list, and files it has no checksum for, are refused."""
        listed = {MANIFEST_FILE, *self.manifest.parts.values(), *self.manifest.preprocessing_files}
        unlisted = sorted(n for n in names - listed if not n.startswith("."))
        if unlisted:
            raise MergeError(f"{self.path}: {', '.join(unlisted)} {'is' if len(unlisted) == 1 else 'are'} not listed "
                             f"in {MANIFEST_FILE} (--check-checksums refuses files it cannot vouch for)")
        digests = {MODEL_FILE: lambda: model_digest, DATA_FILE: lambda: hashlib.sha256(self.data or b"").hexdigest()}
        for name, content in sorted(self.files.items()):
            digests[name] = lambda content=content: hashlib.sha256(content).hexdigest()
        missing = []
        for name, digest in digests.items():
            expected = self.manifest.checksums.get(name)
            if expected is None:
                missing.append(name)
            elif (actual := digest()) != expected:
                raise MergeError(f"{self.path / name}: SHA-256 {actual} does not match {MANIFEST_FILE}'s {expected}")
        if missing:
            older = (f"a folder built before {TOOL_NAME} recorded the preprocessing files' checksums; "
                     if not {MODEL_FILE, DATA_FILE} & set(missing) else "")
            raise MergeError(f"{self.path / MANIFEST_FILE} has no checksum for {', '.join(missing)} ({older}"
                             "--check-checksums refuses files it cannot vouch for): rebuild the folder to check "
                             f"{'it' if len(missing) == 1 else 'them'}, or run without --check-checksums")

    # -- use ----------------------------------------------------------------------------------------------------
    def session(self, options=None, providers=None, model_bytes: bytes | None = None):
        """An ONNX Runtime session over what was checked: the model's bytes and each weight as a view of the mapped
        data file (:meth:`_mapped_initializers`), so that ONNX Runtime opens nothing by path; except when a tensor
        is larger than ONNX Runtime was measured to take from memory (2 GiB, as bytes: an 8B model's fp32 token
        table is 2.3 GiB), where it reads the data file from the folder."""
        import onnxruntime as ort

        options = options or ort.SessionOptions()
        values = None
        if self.data is not None and self.largest_external > MAX_IN_MEMORY_TENSOR:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path))
        elif self.data is not None:
            values = self._mapped_initializers()
            if values is not None:
                options.add_external_initializers(*values)
            else:
                options.add_external_initializers_from_files_in_memory([DATA_FILE], [self.data], [len(self.data)])
        try:
            with self._pages_released_while_loading():
                session = ort.InferenceSession(model_bytes or self.model_bytes, options,
                                               providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # ONNX Runtime raises its own exception types for every load failure
            text = str(exc).strip()
            first = text.splitlines()[0] if text else str(exc)
            if "is not a registered function/op" in first:  # an ONNX Runtime older than the ops the folder uses
                first += (f"; this is ONNX Runtime {ort.__version__}, the folder needs onnxruntime>="
                          f"{MIN_ONNXRUNTIME} (pip install -U 'onnxruntime>={MIN_ONNXRUNTIME}')")
            raise MergeError(f"{self.model_path}: ONNX Runtime cannot load it ({first})") from exc
        if values is not None:
            session._merge_mapped_initializers = values  # the session reads them in place: they live as long as it
        self.release_data_pages()
        return session

    def _mapped_initializers(self) -> tuple[list[str], list] | None:
        """(names, OrtValues) of every tensor in the data file, each a view of the mapped file (no copy), or None
        when one has a type numpy cannot view (ONNX Runtime then gets the file's bytes instead).

        Given the file's bytes (``add_external_initializers_from_files_in_memory``), ONNX Runtime copies every
        tensor into memory of its own, beside the prepacked copies its MatMul kernels make: on a 2B int4 folder
        that held 4.9 GiB of anonymous memory after loading, against 3.3 GiB with the views."""
        import onnxruntime as ort

        names, values = [], []
        for tensor in self.external:
            dtype = _NUMPY_TYPES.get(tensor.data_type)
            if dtype is None:
                return None
            offset = int(tensor.external.get("offset", 0))
            count = (tensor.nbytes() or 0) // np.dtype(dtype).itemsize
            view = np.frombuffer(self.data, dtype, count=count, offset=offset).reshape(tensor.dims)
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(view))
        return names, values

    @contextlib.contextmanager
    def _pages_released_while_loading(self, every: float = 0.05):
        """While ONNX Runtime loads (reading every weight once to prepack it), drop the mapped file's resident
        pages every ``every`` seconds, so that the weights already packed do not stay counted beside their packed
        copies until the end: the load's peak is then about its end state, not the two together. A page dropped
        while being read is read again from the page cache (the same bytes: the mapping is the file's)."""
        if not self._releasable:
            yield
            return
        done = threading.Event()

        def release() -> None:
            while not done.wait(every):
                self.release_data_pages()

        worker = threading.Thread(target=release, name="release-mapped-pages", daemon=True)
        worker.start()
        try:
            yield
        finally:
            done.set()
            worker.join()

    def release_data_pages(self) -> None:
        """Drop this process's resident pages of the mapped data file. Creating a session reads every weight once,
        and ONNX Runtime computes from its own prepacked copies of most of them (every MatMul's and MatMulNBits'),
        so the mapped pages would stay counted in the process's memory beside those copies: on a 2B int4 folder
        that is the whole data file again. The few weights it reads in place (the token table, norms) come back
        from the page cache on first touch. The mapping stays, so nothing else changes: a file written in place
        shows through a shared mapping with or without this."""
        if self._releasable:
            self.data.madvise(mmap.MADV_DONTNEED)

    @property
    def _releasable(self) -> bool:
        """A mapped data file whose pages the system can be told to drop (Linux, macOS)."""
        return self.data is not None and hasattr(mmap, "MADV_DONTNEED")

    def file(self, name: str) -> bytes | None:
        """A preprocessing file's bytes as checked (None if the folder has none by that name)."""
        return self.files.get(name)


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


def _open_regular(dir_fd: int, folder: Path, name: str) -> int:
    """A descriptor on ``folder/name``: a regular file (never a FIFO, socket or device; opened without blocking), no
    symbolic link, except a Hugging Face hub snapshot's link to its own repository's blob (see
    :func:`_open_hub_blob`). Hard links are the file itself, wherever its other names are (a backup made with
    ``cp -al`` or ``rsync --link-dest``), and are read as such."""
    try:
        is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        raise MergeError(f"{folder / name}: no such file") from None
    except OSError as exc:
        raise MergeError(f"{folder / name}: cannot be opened ({exc.strerror or exc})") from None
    if not is_link:  # a link swapped in after this look is refused by O_NOFOLLOW, never followed
        return open_regular(name, str(folder / name), dir_fd=dir_fd, follow_symlinks=False,
                            link_note="a combined folder holds its own files (or is a Hugging Face hub snapshot "
                                      f"whose links point into {HUB_BLOBS}/)")
    fd = _open_hub_blob(dir_fd, folder, name)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MergeError(f"{folder / name} is not a regular file")
    return fd


HUB_BLOBS = "../../blobs"  # from <repo cache>/snapshots/<revision>/ to <repo cache>/blobs/


def _open_hub_blob(dir_fd: int, folder: Path, name: str) -> int:
    """The file behind a symbolic link, only where the folder is a hub snapshot (``<repo>/snapshots/<rev>/``) and
    the link is ``../../blobs/<blob>``: the layout huggingface_hub writes, whose blobs belong to the same repository.
    The blob is opened through the snapshot's own descriptor, with no further link followed; any other link (out of
    the folder, into another repository, to a pipe or a device) is refused."""
    refused = MergeError(f"{folder / name} is a symbolic link; a combined folder holds its own files (or is a "
                         f"Hugging Face hub snapshot whose links point into {HUB_BLOBS}/)")
    try:
        target = os.readlink(name, dir_fd=dir_fd)
    except OSError:
        raise refused from None
    blobs, _, blob = target.rpartition("/")
    if blobs != HUB_BLOBS or blob in ("", ".", "..") or Path(os.path.realpath(folder)).parent.name != "snapshots":
        raise refused
    try:
        blobs_fd = os.open(HUB_BLOBS, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        raise refused from None
    try:
        return os.open(blob, _OPEN_FLAGS | os.O_NONBLOCK, dir_fd=blobs_fd)  # a pipe there: refused, not waited on
    except OSError:
        raise refused from None
    finally:
        os.close(blobs_fd)


def _read(dir_fd: int, folder: Path, name: str, limit: int) -> bytes:
    return read_and_close(_open_regular(dir_fd, folder, name), str(folder / name), limit)


def _check_size(folder: Path, name: str, size: int, manifest: Manifest) -> None:
    expected = manifest.sizes.get(name)
    if expected is not None and expected != size:
        raise MergeError(f"{folder / name} is {size} bytes but {MANIFEST_FILE} says {expected}: truncated or "
                         "changed since it was built")


def _check_external(folder: Path, tensors, data_size: int) -> None:
    for tensor in tensors:
        location = tensor.external.get("location", "")
        if location != DATA_FILE:
            raise MergeError(f"{folder / MODEL_FILE}: tensor {tensor.name!r} has its data in {location!r}; only "
                             f"{DATA_FILE}, inside the folder, is allowed")
        try:
            offset = int(tensor.external.get("offset", "0"))
            length = int(tensor.external["length"]) if "length" in tensor.external else data_size - offset
        except ValueError:
            raise MergeError(f"{folder / MODEL_FILE}: tensor {tensor.name!r} has a non-numeric offset or length "
                             f"{tensor.external}") from None
        if offset < 0 or length < 0 or offset + length > data_size:
            raise MergeError(f"{folder / MODEL_FILE}: tensor {tensor.name!r} spans bytes {offset}..{offset + length} "
                             f"of {DATA_FILE}, which has {data_size}")
        needed = tensor.nbytes()
        if needed is not None and needed != length:
            raise MergeError(f"{folder / MODEL_FILE}: tensor {tensor.name!r} has {length} bytes of data but its type "
                             f"and shape {tensor.dims} need {needed}")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open_file(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
