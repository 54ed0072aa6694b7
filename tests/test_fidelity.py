"""merge.tools.fidelity: KL(p_ref || q) per position, its mean and 99th percentile, top-1 and the relative logits
error, on cases whose answers are known by hand; and twins (the reversed divergence, a float32 softmax) that
must not give the same numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from merge.tools.fidelity import ROWS_PER_CHUNK, fidelity, kl_divergence


def test_kl_of_two_token_distributions_by_hand():
    reference = np.array([[0.0, 0.0]], np.float32)  # p = (1/2, 1/2)
    logits = np.array([[math.log(3.0), 0.0]], np.float32)  # q = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    (kl,) = kl_divergence(logits, reference)
    assert kl == pytest.approx(expected, rel=1e-6)
    # twin: the other direction, KL(q || p), is another number; a swapped argument order would be caught
    reversed_ = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert abs(kl - reversed_) > 0.01
    assert kl_divergence(reference, logits)[0] == pytest.approx(reversed_, rel=1e-6)


def test_kl_is_zero_for_shifted_logits_and_the_error_is_not():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((3, 50)).astype(np.float32)
    result = fidelity(reference + 7.0, reference)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-12) and result.top1 == 1.0
    assert result.rel_error == pytest.approx(7.0 * math.sqrt(150) / np.linalg.norm(reference.astype(np.float64)))


def test_peaked_logits_in_float64():
    """Logits of a random preset (std ~45): a float32 exp overflows, the float64 log-softmax gives KL ~ 100."""
    reference = np.array([[100.0, 0.0, 0.0]], np.float32)
    logits = np.array([[0.0, 100.0, 0.0]], np.float32)
    (kl,) = kl_divergence(logits, reference)
    assert kl == pytest.approx(100.0, rel=1e-6)
    with np.errstate(over="ignore", invalid="ignore"):  # twin: softmax in float32 without the max shift
        p = np.exp(reference) / np.exp(reference).sum(-1, keepdims=True)
    assert not np.isfinite(p).all()


def test_mean_p99_and_top1_over_positions():
    """200 positions, 198 equal to the reference and 2 far off: p99 interpolates between the sorted values at
    0.99 * 199 = 197.01, as llama-perplexity does; top-1 counts the two."""
    reference = np.zeros((200, 4), np.float32)
    reference[:, 0] = 5.0
    logits = reference.copy()
    logits[[3, 150]] = [0.0, 5.0, 0.0, 0.0]
    kl = kl_divergence(logits, reference)
    big = kl[3]
    assert big > 1 and np.count_nonzero(kl > 1e-12) == 2
    result = fidelity(logits, reference)
    assert result.positions == 200 and result.top1 == pytest.approx(198 / 200)
    assert result.kl_mean == pytest.approx(2 * big / 200)
    assert result.kl_p99 == pytest.approx(0.01 * big, rel=1e-5)


def test_leading_axes_are_positions_and_chunks_agree():
    rng = np.random.default_rng(1)
    rows = ROWS_PER_CHUNK * 2 + 5  # three chunks
    reference = rng.standard_normal((1, rows, 32)).astype(np.float32) * 4
    logits = reference + rng.standard_normal(reference.shape).astype(np.float32)
    kl = kl_divergence(logits, reference)
    assert kl.shape == (rows,)
    one_by_one = [kl_divergence(logits[0, i:i + 1], reference[0, i:i + 1])[0] for i in range(rows)]
    assert np.allclose(kl, one_by_one, rtol=1e-12)
    result = fidelity(logits, reference)
    diff = (logits - reference).astype(np.float64)
    assert result.rel_error == pytest.approx(np.linalg.norm(diff) / np.linalg.norm(reference.astype(np.float64)))


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same non-empty shape"):
        fidelity(np.zeros((2, 5)), np.zeros((2, 6)))
    with pytest.raises(ValueError, match="same non-empty shape"):
        kl_divergence(np.zeros((0, 5)), np.zeros((0, 5)))


def test_spread_copy_scales_only_the_final_norm(sources, tmp_path):
    """benchmarks/spread.py: the copy's final text norm is the original's times the factor (bf16, rounded to
    nearest), every other tensor and file is the original's (files linked, not copied), the original is untouched,
    and an existing copy is reused only for the same source and factor."""
    import torch
    from safetensors import safe_open

    from benchmarks.spread import find_final_norm, spread_copy

    source = sources("tiny").folder
    shard, name = find_final_norm(source)
    assert name == "model.language_model.norm.weight"
    before = shard.read_bytes()
    out = spread_copy(source, tmp_path / "spread", 1 / 15)
    assert shard.read_bytes() == before
    assert all((out / f.name).is_symlink() for f in source.iterdir() if f.is_file() and f != shard
               and not f.name.startswith("."))
    assert not (out / shard.name).is_symlink()
    with safe_open(shard, "pt") as a, safe_open(out / shard.name, "pt") as b:
        names = a.keys()  # a safetensors handle is not iterable
        assert sorted(names) == sorted(b.keys())
        for key in names:
            x, y = a.get_tensor(key), b.get_tensor(key)
            if key == name:
                assert torch.equal(y, (x.float() / 15).to(torch.bfloat16))
                assert not torch.equal(x, y)
            else:
                assert torch.equal(x, y), key
    assert spread_copy(source, tmp_path / "spread", 1 / 15) == out  # reused
    with pytest.raises(SystemExit, match="another spread copy"):
        spread_copy(source, tmp_path / "spread", 0.5)


def test_factor_for_reaches_the_target_top1_probability():
    from benchmarks.spread import factor_for, output_spread

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((40, 300)) * 45  # a random preset's near one-hot outputs
    assert output_spread(logits)["top1_prob_mean"] > 0.95
    factor = factor_for(logits, 0.5)
    assert 0 < factor < 1
    assert output_spread(logits * factor)["top1_prob_mean"] == pytest.approx(0.5, abs=1e-3)
    flat = rng.standard_normal((40, 300)) * 0.01  # already flatter than asked: left as it is
    assert factor_for(flat, 0.5) == 1.0
