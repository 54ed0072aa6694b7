"""How far a model's next-token distributions move from a reference's, position by position: the KL divergence
KL(p_ref || q), its mean and 99th percentile, top-1 agreement and the relative error of the logits.

``verify`` reports these for a quantized folder against PyTorch with the fp32 weights, and
``benchmarks/fidelity.py`` for each system against its own fp32 base. The percentile interpolates linearly between
the sorted values, as llama.cpp's ``llama-perplexity --kl-divergence`` does, so its figures read alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROWS_PER_CHUNK = 64  # positions turned to float64 at once: 64 x 151,936 x 8 bytes = 78 MB per array


@dataclass(frozen=True)
class Fidelity:
    positions: int
    kl_mean: float  # nats
    kl_p99: float
    top1: float  # fraction of positions whose argmax agrees with the reference's
    rel_error: float  # ||logits - reference|| / ||reference|| over all positions

    def line(self) -> str:
        return (f"KL mean {self.kl_mean:.2e}, p99 {self.kl_p99:.2e} over {self.positions} positions; top-1 "
                f"{self.top1:.1%}; relative logits error {self.rel_error:.2e}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """KL(p_reference || q_logits) in nats for each position (every axis but the last, the vocabulary, flattened):
    sum over the vocabulary of p_ref * (log p_ref - log q), both from log-softmax in float64."""
    q, p = _rows(logits, reference)
    out = np.empty(len(p), np.float64)
    for start in range(0, len(p), ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        log_p, log_q = log_softmax(p[rows]), log_softmax(q[rows])
        out[rows] = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return np.maximum(out, 0.0)  # a rounding of -1e-17 is 0: KL is never negative


def fidelity(logits: np.ndarray, reference: np.ndarray) -> Fidelity:
    """``logits`` against ``reference`` (same shape, [..., vocab]), over every position."""
    q, p = _rows(logits, reference)
    kl = kl_divergence(q, p)
    top1 = float((q.argmax(-1) == p.argmax(-1)).mean())
    diff = ref = 0.0
    for start in range(0, len(p), ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        a, e = np.asarray(q[rows], np.float64), np.asarray(p[rows], np.float64)
        diff += float(((a - e) ** 2).sum())
        ref += float((e ** 2).sum())
    rel = np.sqrt(diff / ref) if ref > 0 else (0.0 if diff == 0 else float("inf"))
    return Fidelity(len(kl), float(kl.mean()), float(np.percentile(kl, 99)), top1, float(rel))


def _rows(logits: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, reference = np.asarray(logits), np.asarray(reference)
    if logits.shape != reference.shape or logits.ndim < 1 or logits.size == 0:
        raise ValueError(f"logits {logits.shape} and reference {reference.shape}: the same non-empty shape needed")
    return logits.reshape(-1, logits.shape[-1]), reference.reshape(-1, reference.shape[-1])
