"""Fuzzing the first call (hypothesis, bounded and seeded): grids, image counts and sizes, prompt layouts (images
first, last, side by side, many), left-padded batches with different image counts, token budgets. Every example
either matches PyTorch within the fp32 bound or is refused with one MergeError line; never a crash, a hang, or a
silent wrong answer. Some examples are broken on purpose (an image token or a patch row dropped): those must be
refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from merge.errors import MergeError
from merge.runtime import CombinedModel
from merge.tools.compare import compare

pytestmark = pytest.mark.slow  # hypothesis examples against PyTorch

TEXT_IDS = st.integers(min_value=3, max_value=900)  # the tiny presets' ordinary tokens (specials start at 992)
SIDES = st.sampled_from([2, 4, 6])  # patches per side, multiples of the merge size


@st.composite
def rows(draw):
    """A batch: per row, a list of ("text", ids) and ("image", (t, h, w)) segments."""
    batch = []
    for _ in range(draw(st.integers(1, 2))):
        segments = []
        for _ in range(draw(st.integers(1, 5))):
            if draw(st.booleans()):
                segments.append(("text", draw(st.lists(TEXT_IDS, min_size=1, max_size=6))))
            else:
                segments.append(("image", (draw(st.integers(1, 2)), draw(SIDES), draw(SIDES))))
        batch.append(segments)
    return batch


def _assemble(batch, config, patch_dim: int, rng: np.random.Generator):
    start, end, image = config.vision_start_token_id, config.vision_end_token_id, config.image_token_id
    encoded, grids = [], []
    for segments in batch:
        ids = []
        for kind, value in segments:
            if kind == "text":
                ids += value
            else:
                t, h, w = value
                ids += [start] + [image] * (t * h * w // 4) + [end]
                grids.append([t, h, w])
        encoded.append(ids)
    length = max(len(ids) for ids in encoded)
    input_ids = np.zeros((len(encoded), length), np.int64)
    mask = np.zeros_like(input_ids)
    for row, ids in enumerate(encoded):  # left padding
        input_ids[row, length - len(ids):] = ids
        mask[row, length - len(ids):] = 1
    grid = np.array(grids, np.int64).reshape(-1, 3)
    pixels = rng.standard_normal((int(grid.prod(axis=1).sum()), patch_dim)).astype(np.float32)
    return input_ids, mask, pixels, grid


@pytest.fixture(scope="module")
def subjects(combined, hf_models, sources):
    return CombinedModel(combined("tiny")), hf_models("tiny"), sources("tiny").config


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BREAKAGE = st.sampled_from([None] * 6 + ["drop_image_token", "drop_patch_row"])


@seed(20261129)
@SETTINGS
@given(batch=rows(), breakage=BREAKAGE)
def test_first_call_matches_pytorch_or_is_refused(subjects, batch, breakage):
    _check_example(*subjects, batch, breakage)


def test_twin_fuzzing_finds_a_broken_model(subjects, tmp_path, combined):
    """The same search over a folder with DeepStack removed must find an example that fails."""
    from tests.sabotage import broken_copy

    _, reference, config = subjects
    broken = CombinedModel(broken_copy(combined("tiny"), tmp_path / "broken", "no_deepstack"))

    @seed(20261129)
    @SETTINGS
    @given(batch=rows())
    def search(batch):
        _check_example(broken, reference, config, batch, None)

    with pytest.raises(AssertionError, match="prefill logits"):
        search()


def _check_example(model, reference, config, batch, breakage) -> None:
    import torch

    rng = np.random.default_rng(len(str(batch)))
    input_ids, mask, pixels, grid = _assemble(batch, config, model.patch_dim, rng)
    if breakage == "drop_image_token" and (input_ids == config.image_token_id).any():
        row, col = np.argwhere(input_ids == config.image_token_id)[0]
        input_ids[row, col] = 5
    elif breakage == "drop_patch_row" and len(pixels):
        pixels = pixels[1:]
    else:
        breakage = None
    try:
        feeds = model.first_feeds(input_ids, mask, pixels, grid)
    except MergeError as exc:
        assert breakage is not None, f"a valid example was refused: {exc}"
        assert "\n" not in str(exc)
        return
    assert breakage is None, "a broken example was not refused"
    logits = model.forward(feeds)["logits"]
    types = np.where(input_ids == config.image_token_id, 1, 0) * mask
    kwargs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
              "mm_token_type_ids": torch.from_numpy(types)}
    if len(grid):
        kwargs |= {"pixel_values": torch.from_numpy(pixels), "image_grid_thw": torch.from_numpy(grid)}
    with torch.no_grad():
        expected = reference(**kwargs).logits.numpy()
    real = mask.astype(bool)
    result = compare("prefill logits", logits[real], expected[real])
    assert result.passed, f"{batch}: {result.line()}"
