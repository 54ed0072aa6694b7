"""``POST /v1/chat/completions``'s body, OpenAI's format, checked field by field: every refusal is a 400 naming the
field (``messages[1].content[0].image_url.url``), never a silent default for an option this server cannot honour
(``n`` above 1, ``tools``, ``logprobs``, penalties, ``logit_bias``, a JSON ``response_format`` are refused by name).

Messages become what the folder's chat template takes: ``{"role", "content"}`` with the content a string or a list
of ``{"type": "text", "text"}``, ``{"type": "image"}`` and ``{"type": "video"}`` parts; the images' and videos'
URLs (OpenAI's ``image_url`` parts, vLLM's ``video_url`` parts) are listed in order beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from merge.errors import MergeError
from merge.runtime.sampling import MAX_SEED, MAX_STOP_CHARS, MAX_STOP_STRINGS, Sampling

from .errors import bad_request
from .media import MediaRef

MAX_MESSAGES = 512
MAX_PARTS = 256  # per message
MAX_MEDIA = 16  # images and videos per request: with the folder's pixel budget, a bound on a request's pixels
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# options OpenAI defines that this server cannot honour: refused when set to anything but their neutral value
UNSUPPORTED = {
    "tools": lambda v: v in (None, []),
    "functions": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
    "n": lambda v: v in (None, 1),
}


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    media: list[MediaRef] = field(default_factory=list)
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, name: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", name)
    if value > high or value < low or (low_open and value == low):
        bound = f"more than {low:g}" if low_open else f"at least {low:g}"
        raise bad_request(f"{name} must be {bound} and at most {high:g}, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int, why: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _whole(value):
        raise bad_request(f"{name} must be a whole number, got {value!r}", name)
    if not low <= value <= high:
        raise bad_request(f"{name} must be from {low} to {high}{why}, got {value}", name)
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", name)
    return value


def _url(part: dict, key: str, where: str) -> tuple[str, str]:
    """(url, its field) of an ``image_url`` / ``video_url`` part: ``{key: {"url": ...}}`` or ``{key: "..."}``."""
    value = part.get(key)
    if isinstance(value, str):
        return value, f"{where}.{key}"
    if not isinstance(value, dict) or not isinstance(value.get("url"), str) or not value["url"]:
        raise bad_request(f"{where}.{key} must be an object with a url (a string)", f"{where}.{key}")
    return value["url"], f"{where}.{key}.url"


def _content(content: Any, role: str, where: str, media: list[MediaRef]) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where} must be a string or a non-empty list of content parts", where)
    if len(content) > MAX_PARTS:
        raise bad_request(f"{where} holds {len(content)} parts; at most {MAX_PARTS}", where)
    parts: list[dict] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string", f"{at}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "video_url"):
            if role != "user":
                raise bad_request(f"{at}: images and videos go in user messages, not in a {role} message", at)
            url, param = _url(part, kind, at)
            media.append(MediaRef("image" if kind == "image_url" else "video", url, param))
            parts.append({"type": "image" if kind == "image_url" else "video"})
        elif isinstance(kind, str):
            raise bad_request(f"{at}.type {kind!r} is not taken here (text, image_url, video_url)", f"{at}.type")
        else:
            raise bad_request(f"{at} must be an object with a type", at)
    return parts


def _messages(body: dict, media: list[MediaRef]) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of messages", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"messages holds {len(messages)} messages; at most {MAX_MESSAGES}", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with a role and a content", where)
        role = message.get("role")
        if role not in ROLES:
            shown = role if isinstance(role, str) else type(role).__name__
            raise bad_request(f"{where}.role {shown!r} is not taken here (system, developer, user, assistant)",
                              f"{where}.role")
        if message.get("tool_calls") or message.get("function_call"):
            raise bad_request(f"{where}: tool calls are not taken here", f"{where}.tool_calls")
        content = message.get("content")
        if content is None:
            raise bad_request(f"{where}.content is missing", f"{where}.content")
        out.append({"role": ROLES[role], "content": _content(content, role, f"{where}.content", media)})
    if len(media) > MAX_MEDIA:
        raise bad_request(f"messages hold {len(media)} images and videos; at most {MAX_MEDIA} per request",
                          "messages")
    return out


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request("stop must be a non-empty string or a list of them", "stop")
    if len(items) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in items):
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
                          "stop")
    return tuple(items)


def parse_chat_request(body: Any, max_tokens_limit: int) -> ChatRequest:
    """The checked request; a 400 :class:`~merge.serve.errors.ApiError` naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise bad_request("model is required (the id GET /v1/models lists)", "model")
    if not isinstance(model, str) or not model:
        raise bad_request(f"model must be a non-empty string (the id GET /v1/models lists), got {model!r:.60}",
                          "model")
    for name, neutral in UNSUPPORTED.items():
        if not neutral(body.get(name)):
            raise bad_request(f"{name} is not supported by this server (given {str(body.get(name))[:60]})", name)
    media: list[MediaRef] = []
    messages = _messages(body, media)
    limits = {}
    for name in ("max_tokens", "max_completion_tokens"):
        limits[name] = _integer(body, name, 1, max_tokens_limit, " (the server's --max-tokens)")
    if None not in limits.values() and limits["max_tokens"] != limits["max_completion_tokens"]:
        raise bad_request("max_tokens and max_completion_tokens disagree; give one", "max_completion_tokens")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    top_k = _integer(body, "top_k", -1, 1 << 30)  # vLLM's extension; -1 or 0: every token
    seed = body.get("seed")
    if seed is not None and (not _whole(seed) or not 0 <= seed <= MAX_SEED):
        raise bad_request(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}", "seed")
    try:
        sampling = Sampling(temperature=0.0 if temperature is None else temperature,  # greedy by default
                            top_p=1.0 if top_p is None else top_p,
                            top_k=0 if top_k in (None, -1) else top_k, seed=seed)
    except MergeError as exc:  # pragma: no cover - each field was checked above
        raise bad_request(str(exc)) from None
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only taken with stream: true", "stream_options")
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object", "stream_options")
        include_usage = _boolean(options, "include_usage")
    return ChatRequest(model=model, messages=messages, media=media,
                       max_tokens=limits["max_tokens"] or limits["max_completion_tokens"], sampling=sampling,
                       stop=_stop(body), stream=stream, include_usage=include_usage)
