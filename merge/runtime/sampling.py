"""Choosing each next token: greedy (the default), or sampled with temperature, top-k and top-p, and stop strings.

A row's choice depends only on its own logits, its own options and its own random stream (a
``numpy.random.Generator`` seeded from the row's ``seed``): the same seed and the same logits give the same token,
whatever other rows share the batch. The order of the filters is the usual one (Hugging Face's, vLLM's):

1. ``temperature``: the logits divided by it; 0 means greedy (the largest logit, the lowest id on a tie, as
   ``argmax``); so does ``top_k`` 1;
2. ``top_k``: only the k largest logits stay (0: all);
3. ``top_p``: of those, the fewest most probable tokens whose probabilities sum to at least ``top_p`` stay (the
   most probable always stays; 1: all);
4. one token drawn from the renormalised probabilities, computed in float64.

Stop strings end a row's text where one first appears (the text returned and streamed stops before it);
:class:`StopScanner` holds back the end of the streamed text while it could still become a stop string.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from merge.errors import MergeError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string: the held-back end is compared with each one per token
MAX_SEED = 2**63 - 1


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise MergeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise MergeError(f"{name} must be a finite number, got {value}")
    return value


@dataclass(frozen=True)
class Sampling:
    """How one row chooses its tokens; the default is greedy. Every field is checked, one line each."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        temperature = _number(self.temperature, "temperature")
        if temperature < 0:
            raise MergeError(f"temperature must be 0 (greedy) or more, got {temperature}")
        top_p = _number(self.top_p, "top_p")
        if not 0 < top_p <= 1:
            raise MergeError(f"top_p must be more than 0 and at most 1, got {top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int | np.integer) or self.top_k < 0:
            raise MergeError(f"top_k must be a whole number, 0 (all tokens) or more, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer)
                                      or not 0 <= self.seed <= MAX_SEED):
            raise MergeError(f"seed must be a whole number from 0 to {MAX_SEED}, got {self.seed!r}")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "top_k", int(self.top_k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


GREEDY = Sampling()


class TokenChooser:
    """The next token of every row of a batch, each row with its own :class:`Sampling` and random stream."""

    def __init__(self, sampling: Sampling | Sequence[Sampling] | None, batch: int) -> None:
        rows = [sampling or GREEDY] * batch if sampling is None or isinstance(sampling, Sampling) else list(sampling)
        if len(rows) != batch:
            raise MergeError(f"sampling: {len(rows)} settings for {batch} rows")
        for row in rows:
            if not isinstance(row, Sampling):
                raise MergeError(f"sampling must be a merge.runtime.Sampling, got {type(row).__name__}")
        self.rows = rows
        self.rngs = [None if s.greedy else np.random.default_rng(s.seed) for s in rows]

    @property
    def greedy(self) -> bool:
        return all(s.greedy for s in self.rows)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """[batch, vocab] logits -> [batch] int64 token ids."""
        tokens = logits.argmax(-1).astype(np.int64)
        for row, (sampling, rng) in enumerate(zip(self.rows, self.rngs, strict=True)):
            if rng is not None:
                tokens[row] = sample(logits[row], sampling, rng)
        return tokens


def probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution a sampled row draws from (float64, sums to 1): temperature, then top-k, then top-p."""
    z = np.asarray(logits, np.float64) / sampling.temperature
    if 0 < sampling.top_k < z.size:
        kth = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # probability of the tokens ranked above each one
        dropped = order[before >= sampling.top_p]
        p[dropped] = 0
        p /= p.sum()
    return p


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token id drawn from :func:`probabilities` with ``rng`` (one uniform number per token)."""
    p = probabilities(logits, sampling)
    cumulative = np.cumsum(p)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), p.size - 1))


def check_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """``stop``: one string or a list of them (OpenAI's ``stop``), each non-empty; refused in one line."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list | tuple):
        raise MergeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    if len(items) > MAX_STOP_STRINGS:
        raise MergeError(f"stop holds {len(items)} strings; at most {MAX_STOP_STRINGS}")
    for item in items:
        if not isinstance(item, str) or not item:
            raise MergeError(f"stop strings must be non-empty strings, got {item!r}")
        if len(item) > MAX_STOP_CHARS:
            raise MergeError(f"a stop string of {len(item)} characters; at most {MAX_STOP_CHARS}")
    return tuple(items)


class StopScanner:
    """One row's streamed text against its stop strings: :meth:`feed` takes each new piece and returns what may be
    shown now, holding back an end that could still grow into a stop string; :attr:`stopped` once one appeared
    (nothing from it on is ever shown)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        cut = _first_stop(text, self.stop)
        if cut >= 0:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[len(text) - n:])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The end of the text, once no more pieces come."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text


def _first_stop(text: str, stop: Sequence[str]) -> int:
    """Where the first stop string in ``text`` starts, or -1."""
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one was found."""
    cut = _first_stop(text, stop)
    return (text[:cut], True) if cut >= 0 else (text, False)


def ending(tokens: Sequence[int], eos: Collection[int], decode: Callable[[Sequence[int]], str],
           stop: Sequence[str], stopped: bool) -> tuple[str, str]:
    """A row's final text and OpenAI's finish reason, from all its tokens: the text up to the first end-of-sequence
    token and then up to the first stop string; ``"stop"`` when either ended it (``stopped``: its scanner saw a
    stop string), else ``"length"``. One rule for :meth:`CombinedModel.complete` and the serving engine."""
    end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    text, cut = cut_at_stop(decode(tokens[:end]), stop)
    return text, "stop" if end < len(tokens) or cut or stopped else "length"
