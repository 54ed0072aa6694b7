"""The one comparator every parity check goes through (tests and ``merge verify``).

Shape first, then max absolute and relative error, cosine similarity, a PASSED/FAILED line per output and
the tolerance that would have been needed. The fp32 bound is relative to the reference's scale:
``max |actual - expected| <= rtol_scale * max(1, max |expected|)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

FP32_SCALE = 1e-4


@dataclass(frozen=True)
class Comparison:
    name: str
    passed: bool
    shape_ok: bool
    actual_shape: tuple[int, ...]
    expected_shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    bound: float
    reference_scale: float

    @property
    def needed_scale(self) -> float:
        """The smallest ``rtol_scale`` that would have passed."""
        return self.max_abs / max(1.0, self.reference_scale)

    def line(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        if not self.shape_ok:
            return f"{status} {self.name}: shape {self.actual_shape} != expected {self.expected_shape}"
        return (
            f"{status} {self.name} {self.actual_shape}: max_abs={self.max_abs:.3e} max_rel={self.max_rel:.3e} "
            f"cos={self.cosine:.7f} bound={self.bound:.3e} (needed scale {self.needed_scale:.1e})"
        )


def compare(name: str, actual: np.ndarray, expected: np.ndarray, scale: float = FP32_SCALE) -> Comparison:
    """Compare one output; never raises on a mismatch, the result says PASSED or FAILED."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    shape_ok = actual.shape == expected.shape
    if not shape_ok:
        result = Comparison(name, False, False, actual.shape, expected.shape, np.inf, np.inf, np.nan, np.nan, np.nan)
        log.debug(result.line())
        return result
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    finite = bool(np.isfinite(a).all())
    diff = np.abs(a - e)
    max_abs = float(diff.max()) if diff.size else 0.0
    ref_scale = float(np.abs(e).max()) if e.size else 0.0
    rel = diff / np.maximum(np.abs(e), 1e-12)
    max_rel = float(rel.max()) if rel.size else 0.0
    denom = np.linalg.norm(a) * np.linalg.norm(e)
    cosine = float((a.ravel() @ e.ravel()) / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    bound = scale * max(1.0, ref_scale)
    passed = finite and max_abs <= bound
    result = Comparison(name, passed, True, actual.shape, expected.shape, max_abs, max_rel, cosine, bound, ref_scale)
    log.debug(result.line())
    return result
