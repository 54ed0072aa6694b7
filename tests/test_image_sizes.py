"""Sizes users control: --min-pixels / --max-pixels applied as transformers applies ``size``; folder values and
images checked before anything is allocated; every refusal one line."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from merge.cli import main
from merge.errors import MergeError
from merge.runtime.images import ImageProcessor, smart_resize
from merge.tools.compare import compare


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize(("min_pixels", "max_pixels"), [(None, 40_000), (20_000, 30_000), (300_000, 600_000),
                                                          (4096, None)])
def test_pixel_budget_matches_transformers(min_pixels, max_pixels, sources):
    """Our override against transformers' image processor called with size={shortest_edge, longest_edge}."""
    from transformers import AutoImageProcessor

    folder = sources("tiny").folder
    theirs = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    ours = ImageProcessor.from_folder(folder, min_pixels=min_pixels, max_pixels=max_pixels)
    low = min_pixels or min(theirs.size["shortest_edge"], max_pixels)  # a lone max below the folder's min lowers it
    size = {"shortest_edge": low, "longest_edge": max_pixels or max(theirs.size["longest_edge"], low)}
    images = _images([(400, 300), (97, 611), (1000, 1000), (64, 96)], seed=1)
    expected = theirs(images=images, size=size, return_tensors="np")
    actual = ours(images=images)
    np.testing.assert_array_equal(actual["image_grid_thw"], expected["image_grid_thw"])
    result = compare("pixel_values", actual["pixel_values"], expected["pixel_values"], scale=1e-6)
    assert result.passed, result.line()
    # twin: the folder's own budget (the override ignored) gives other grids
    default = ImageProcessor.from_folder(folder)(images=images)
    assert not np.array_equal(default["image_grid_thw"], expected["image_grid_thw"])


def test_run_max_pixels_takes_fewer_image_tokens(combined, tmp_path, capsys):
    folder = combined("tiny")
    picture = tmp_path / "big.png"
    _images([(1200, 900)], seed=2)[0].save(picture)
    counts = {}
    for budget in (None, 100_000):
        extra = ["--max-pixels", str(budget)] if budget else []
        assert main(["run", str(folder), "--image", str(picture), "--prompt", "Describe.", "--max-new-tokens", "2",
                     *extra]) == 0
        timing = capsys.readouterr().out.strip().splitlines()[-1]
        counts[budget] = int(timing.split("(")[1].split(" image tokens")[0])
    h, w = smart_resize(900, 1200, 32, 65536, 100_000)
    assert counts[100_000] == h * w // 32**2 < counts[None]

    from merge.runtime import CombinedModel

    completion = CombinedModel(folder, max_pixels=100_000).complete("Describe.", [picture], max_new_tokens=1)
    assert completion.image_tokens == counts[100_000]


def _write_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (its pixel data is absent): nothing needs decoding to refuse it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


@pytest.mark.parametrize("case", ["min_pixels_absurd", "max_below_min", "patch_size_mismatch", "huge_image",
                                  "decompression_bomb", "aspect_ratio", "cli_budget"])
@pytest.mark.parametrize("command", ["run", "verify"])
def test_refusals_are_one_line(case, command, combined, tmp_path, capsys):
    folder = tmp_path / "combined"
    shutil.copytree(combined("tiny"), folder)
    picture = tmp_path / "picture.png"
    _images([(120, 90)])[0].save(picture)
    extra: list[str] = []
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    if case == "min_pixels_absurd":
        config["min_pixels"] = 10**10
        expected = "min_pixels = 10000000000 must be an integer from 1 to"
    elif case == "max_below_min":
        config["size"] = {"shortest_edge": 5000, "longest_edge": 4000}
        expected = "min_pixels 5,000 is larger than max_pixels 4,000"
    elif case == "patch_size_mismatch":
        config["patch_size"] = 14
        expected = "patch_size 14 but the model's vision config says 16"
    elif case == "huge_image":
        _write_png_header(picture, 12000, 12000)
        expected = "is 12000x12000 = 144,000,000 pixels, more than the 89,478,485 this tool decodes"
    elif case == "decompression_bomb":  # past twice the limit Pillow itself refuses to open it
        _write_png_header(picture, 20000, 20000)
        expected = "Image size (400000000 pixels) exceeds limit"
    elif case == "aspect_ratio":
        _images([(2010, 8)])[0].save(picture)
        expected = "aspect ratio above 200"
    else:
        extra = ["--max-pixels", "0"]
        expected = "max_pixels = 0 must be an integer"
    config_path.write_text(json.dumps(config))
    argv = [command, str(folder), "--image", str(picture), "--prompt", "Describe.", "--max-new-tokens", "2", *extra]
    if command == "verify":
        argv += ["--model", "tiny"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err
    assert captured.out == ""


def test_budget_in_the_api_is_checked():
    with pytest.raises(MergeError, match="min_pixels 9 is larger than max_pixels 4"):
        ImageProcessor().with_pixel_budget(9, 4)
