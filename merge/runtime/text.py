"""The folder's tokenizer and chat template with the ``tokenizers`` library and ``jinja2`` only."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from merge.contract.names import CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_JSON_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from merge.errors import MergeError

from .files import Files


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dictionary."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(files: Files, tokenizer_config: dict) -> str:
    """``chat_template.jinja``, else tokenizer_config.json's ``chat_template``, else ``chat_template.json``."""
    jinja = files.text(CHAT_TEMPLATE_FILE)
    if jinja is not None:
        return jinja
    template = tokenizer_config.get("chat_template")
    if template is None:
        template = (files.json(CHAT_TEMPLATE_JSON_FILE, required=False) or {}).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise MergeError(
            f"{files.folder} has no chat template ({CHAT_TEMPLATE_FILE}, or chat_template in {TOKENIZER_CONFIG_FILE})"
        )
    return template


def compile_chat_template(source: str):
    """The template compiled the way transformers compiles chat templates: a sandboxed jinja2 environment with
    ``trim_blocks``, ``lstrip_blocks``, loop controls, a ``tojson`` that does not escape HTML, ``raise_exception``
    and ``strftime_now``."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise MergeError(f"the chat template does not compile: {exc}") from exc


class TextTokenizer:
    """``tokenizer.json`` (the ``tokenizers`` library) plus the chat template and special tokens of the folder.

    Offers the calls :func:`merge.tokenizer_files.build_inputs` makes on a transformers tokenizer
    (``apply_chat_template(..., tokenize=False)``, ``convert_tokens_to_ids``, ``__call__``, ``pad_token_id``)
    and ``decode``.
    """

    def __init__(self, folder: Path | str | Files):
        from tokenizers import Tokenizer

        files = folder if isinstance(folder, Files) else Files(folder)
        text = files.text(TOKENIZER_FILE)
        if text is None:
            raise MergeError(f"{files.folder} has no {TOKENIZER_FILE}; it is not a combined (or checkpoint) folder")
        try:
            self.backend = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise MergeError(f"{files.where(TOKENIZER_FILE)} is not a tokenizer the tokenizers library can load "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
        config = files.json(TOKENIZER_CONFIG_FILE, required=False) or {}
        self.special_tokens = {
            name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if _token_content(config.get(name)) is not None
        }
        self.additional_special_tokens = [_token_content(t) for t in config.get("additional_special_tokens") or []]
        self.template = compile_chat_template(_chat_template(files, config))

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            **kwargs: Any) -> str:
        if tokenize:
            raise ValueError("TextTokenizer.apply_chat_template renders text only (tokenize=False)")
        context = {**self.special_tokens, "additional_special_tokens": self.additional_special_tokens, **kwargs}
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **context)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


class TextStream:
    """Incremental decoding: each new token gives the text it completes, never half a UTF-8 character.

    The byte-level decoder turns an unfinished character at the end into one U+FFFD; that last U+FFFD is held
    back until the next token shows whether it completes a character or stays invalid. The window decoded each
    step restarts, with a few tokens of context, whenever the text so far ends on a whole character.

    Why not ``tokenizers.decoders.DecodeStream``: it gives the same text on valid UTF-8, but it has no flush
    (an unfinished character at the end is dropped, where ``decode`` shows U+FFFD), and on runs of bytes that
    are not UTF-8 its text differs from ``decode``'s (measured: 19 of 200 random id sequences on the tiny
    preset). ``tests/test_run.py`` holds this stream equal to ``decode`` on such sequences.
    """

    CONTEXT_TOKENS = 4

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self._start = 0  # window: ids[_start:]
        self._shown = 0  # characters of the window's text already emitted

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self._decode(self.ids[self._start :])
        complete = not text.endswith("\ufffd")
        stable = text if complete else text[:-1]
        piece = stable[self._shown :]
        self._shown = max(self._shown, len(stable))
        if complete:
            self._start = max(len(self.ids) - self.CONTEXT_TOKENS, 0)
            self._shown = len(self._decode(self.ids[self._start :]))
        return piece

    def flush(self) -> str:
        """What is held back (an unfinished character comes out as U+FFFD)."""
        text = self._decode(self.ids[self._start :])
        piece = text[self._shown :]
        self._start, self._shown = len(self.ids), 0
        return piece
