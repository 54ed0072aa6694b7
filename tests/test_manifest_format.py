"""merge.json's format_version: the build writes the current one; a newer one is refused naming both numbers; a
manifest without one is format 0, run as it stands but told to build again where a feature needs a newer format;
a manifest promising more than its model holds is refused. Each refusal has a twin that passes."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from merge.contract.folder import CombinedFolder, file_sha256
from merge.contract.manifest import FORMAT_KV_CACHE_IN_PLACE, FORMAT_VERSION, FORMAT_VIDEOS, Manifest
from merge.errors import MergeError
from merge.runtime import CombinedModel


def _copy(combined, tmp_path, change=None):
    """A copy of the tiny folder with ``change(manifest dict)`` applied to its merge.json."""
    folder = tmp_path / "combined"
    shutil.copytree(combined("tiny"), folder)
    if change is not None:
        data = json.loads((folder / "merge.json").read_text())
        change(data)
        (folder / "merge.json").write_text(json.dumps(data))
    return folder


def _feeds_with_a_video(model):
    """A first call's input_ids, attention_mask, pixel_values_videos and video_grid_thw: one video of 1 x 4 x 4
    patches (4 video tokens)."""
    config = model.config
    ids = np.array([[5, config.vision_start_token_id, *[config.video_token_id] * 4, config.vision_end_token_id, 6]])
    pixels = np.zeros((16, model.patch_dim), np.float32)
    return ids, np.ones_like(ids), pixels, np.array([[1, 4, 4]])


def test_the_build_writes_the_current_format(combined):
    folder = combined("tiny")
    assert json.loads((folder / "merge.json").read_text())["format_version"] == FORMAT_VERSION
    model = CombinedModel(folder)
    assert model.format_version == FORMAT_VERSION
    assert model.cache_in_place and model.takes_videos and model.keeps_logits


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, FORMAT_VERSION])
def test_a_newer_format_is_refused_naming_both_numbers(version, combined, tmp_path):
    """Refused before anything else in the manifest is read (a newer format may have fields this one does not
    know: the unknown field here must not be what is reported). Twin: the current version, written explicitly."""
    def change(data):
        data["format_version"] = version
        if version > FORMAT_VERSION:
            data["a_field_of_the_future"] = True

    folder = _copy(combined, tmp_path, change)
    if version > FORMAT_VERSION:
        with pytest.raises(MergeError, match=rf"format_version {version} is newer than the format {FORMAT_VERSION} "
                                             r"this qwen3vl-merge reads; update qwen3vl-merge"):
            CombinedFolder.open(folder)
    else:
        assert CombinedFolder.open(folder).manifest.format_version == FORMAT_VERSION


@pytest.mark.parametrize("value", ["1", 1.0, True, -1, None])
def test_a_format_version_not_a_count_is_refused(value, combined):
    data = Manifest.read(combined("tiny")).to_json()
    with pytest.raises(MergeError, match=r"format_version = .* is not a non-negative integer"):
        Manifest.from_json({**data, "format_version": value})
    assert Manifest.from_json(data).format_version == FORMAT_VERSION  # the twin


def test_a_manifest_without_a_format_is_format_0(combined, tmp_path):
    """A folder built before formats were numbered runs as it stands (every position's logits, the growing
    cache, its video inputs fed empty), and a feature of a later format is one line: the folder, its format, the
    format needed, build it again. Twin: the current build does both."""
    old = CombinedModel(_copy(combined, tmp_path, lambda data: data.pop("format_version")))
    assert old.format_version == 0 and not old.cache_in_place and not old.takes_videos and not old.keeps_logits
    ids = np.array([[5, 6, 7]])
    generation = old.generate(ids, max_new_tokens=3, all_logits=False)
    assert generation.tokens.shape == (1, 3) and generation.prefill_logits.shape[1] == 3  # every position
    assert any(name.startswith("present.") for name in generation.prefill_outputs)  # the growing cache

    folder = re.escape(str(tmp_path / "combined"))
    with pytest.raises(MergeError, match=rf"^{folder} is a format 0 folder \(merge\.json format_version, 0 when "
                                         rf"absent\) but writing the KV cache in place needs format "
                                         rf"{FORMAT_KV_CACHE_IN_PLACE}; build it again$"):
        old.new_cache(1, 8)
    with pytest.raises(MergeError, match=rf"^{folder} is a format 0 folder .* but taking videos needs format "
                                         rf"{FORMAT_VIDEOS}; build it again$"):
        ids, mask, pixels, grid = _feeds_with_a_video(old)
        old.first_feeds(ids, mask, pixel_values_videos=pixels, video_grid_thw=grid)

    current = CombinedModel(combined("tiny"))
    current.new_cache(1, 8)
    ids, mask, pixels, grid = _feeds_with_a_video(current)
    current.forward(current.first_feeds(ids, mask, pixel_values_videos=pixels, video_grid_thw=grid))
    assert current.generate(np.array([[5, 6, 7]]), max_new_tokens=3, all_logits=False).prefill_logits.shape[1] == 1


@pytest.mark.parametrize("version", [FORMAT_VERSION, 0])
def test_a_manifest_promising_more_than_its_model_is_refused(version, combined, tmp_path):
    """merge.json is not covered by the checksums: a format written into an old folder's manifest by hand must not
    make the runtime use what the model lacks (here the in-place cache's metadata). Twin: the same model as format
    0 runs."""
    import onnx

    folder = _copy(combined, tmp_path)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != "kv_cache_in_place"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    data = json.loads((folder / "merge.json").read_text())
    data["sizes"]["model.onnx"] = (folder / "model.onnx").stat().st_size
    data["checksums"]["model.onnx"] = file_sha256(folder / "model.onnx")
    data["format_version"] = version
    (folder / "merge.json").write_text(json.dumps(data))
    if version:
        with pytest.raises(MergeError, match=rf'merge.json says format {version}, whose models have the metadata '
                                             r'kv_cache_in_place = "1", but its model has not'):
            CombinedModel(folder)
    else:
        assert not CombinedModel(folder).cache_in_place
