"""The folder's tokenizer and chat template with the ``tokenizers`` library and ``jinja2`` only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from merge.contract.names import CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_JSON_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from merge.errors import MergeError

from .chat_template import ChatTemplate
from .files import Files


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _token_content(value: Any, key: str, where: Path) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dictionary."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise MergeError(f"{where}: {key} = {_shown(value)} is not a string or an AddedToken object")


def _chat_template(files: Files, tokenizer_config: dict) -> tuple[str, Path]:
    """(source, the file it came from): ``chat_template.jinja``, else tokenizer_config.json's ``chat_template``,
    else ``chat_template.json``'s."""
    jinja = files.text(CHAT_TEMPLATE_FILE)
    if jinja is not None:
        return jinja, files.where(CHAT_TEMPLATE_FILE)
    where = files.where(TOKENIZER_CONFIG_FILE)
    template = tokenizer_config.get("chat_template")
    if template is None:
        where = files.where(CHAT_TEMPLATE_JSON_FILE)
        template = (files.json(CHAT_TEMPLATE_JSON_FILE, required=False) or {}).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        if not all(isinstance(t, dict) for t in template):
            raise MergeError(f"{where}: chat_template is a list, but not of {{name, template}} objects")
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None:
            raise MergeError(f"{where}: chat_template names no template \"default\"")
    if template is None:
        raise MergeError(
            f"{files.folder} has no chat template ({CHAT_TEMPLATE_FILE}, or chat_template in {TOKENIZER_CONFIG_FILE})"
        )
    if not isinstance(template, str):
        raise MergeError(f"{where}: chat_template = {_shown(template)} is not a string")
    return template, where


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
        where = files.where(TOKENIZER_CONFIG_FILE)
        tokens = {name: _token_content(config.get(name), name, where)
                  for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.special_tokens = {name: token for name, token in tokens.items() if token is not None}
        additional = config.get("additional_special_tokens") or []
        if not isinstance(additional, list):
            raise MergeError(f"{where}: additional_special_tokens = {_shown(additional)} is not a list")
        self.additional_special_tokens = [_token_content(t, "additional_special_tokens", where) for t in additional]
        self.template = ChatTemplate(*_chat_template(files, config))  # compiled, rendered within bounds

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
