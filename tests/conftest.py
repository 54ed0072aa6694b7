"""Shared fixtures: presets and combined folders built once per session into temporary folders."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def preset_cache(tmp_path_factory) -> Path:
    """Presets are built into a cache private to the test session (never the user's ~/.cache)."""
    cache = Path(os.environ.get("QWEN3VL_MERGE_TEST_CACHE") or tmp_path_factory.mktemp("preset-cache"))
    os.environ["QWEN3VL_MERGE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def sources(preset_cache):
    """``sources(name)`` -> resolved ModelSource, built on first use."""
    from merge.sources.resolve import resolve_model

    return functools.cache(lambda name: resolve_model(name, preset_cache))


@pytest.fixture(scope="session")
def combined(sources, tmp_path_factory):
    """``combined(name, precision="fp32", vision_precision="fp32", kv_cache="float32")`` -> a built combined folder,
    built once per session. Tests that change a folder work on a copy."""
    from merge.contract.quant import quant_spec_for
    from merge.stitch.pipeline import build

    @functools.cache
    def get(name: str, precision: str = "fp32", vision_precision: str = "fp32", kv_cache: str = "float32") -> Path:
        kv = "" if kv_cache == "float32" else f"-kv-{kv_cache}"
        out = tmp_path_factory.mktemp(f"combined-{name}-{precision}-vision-{vision_precision}{kv}") / "combined"
        build(sources(name), out, quant=quant_spec_for(precision), vision_precision=vision_precision,
              kv_cache=kv_cache)
        return out

    return get


@pytest.fixture(scope="session")
def hf_models(sources):
    """``hf_models(name)`` -> Qwen3VLForConditionalGeneration (Qwen3VLMoeForConditionalGeneration for an MoE preset)
    in float32, eval mode (loaded once)."""
    import torch

    from export.classes import model_classes_of

    def load(name):
        folder = sources(name).folder
        return model_classes_of(folder)[1].from_pretrained(folder, dtype=torch.float32).eval()

    return functools.cache(load)


@pytest.fixture(scope="session")
def prep(sources):
    """``prep(name)`` -> transformers' (tokenizer, image processor) loaded from the preset folder."""
    from tests.hf import load_preprocessors

    return functools.cache(lambda name: load_preprocessors(sources(name).folder))
