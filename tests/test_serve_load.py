"""A bounded load on loopback: 32 streaming requests at once (text, and images of their own sizes) through the
official ``openai`` client against the tiny preset; every one completes, and every greedy answer equals the same
request run alone with ``CombinedModel.chat``. The benchmark (``benchmarks/serve.py``) runs too, small, and prints
throughput concurrent against one by one with p50/p99 latencies."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from PIL import Image

from benchmarks.serve import concurrently, requests_for, summary
from merge.runtime import CombinedModel
from merge.serve.app import background_server
from merge.serve.service import ServeOptions, Service

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 32


@pytest.fixture(scope="module")
def folder(combined) -> Path:
    return combined("tiny")


def _alone(model: CombinedModel, request: dict) -> str:
    """The same request through CombinedModel.chat: its images (decoded from the data: URLs), then its text."""
    content = request["messages"][0]["content"]
    images = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])))
              for p in content if p["type"] == "image_url"]
    prompt = next(p["text"] for p in content if p["type"] == "text")
    return model.chat(prompt, images, max_new_tokens=request["max_tokens"])[0]


def test_32_concurrent_streams_answer_as_alone(folder):
    requests = requests_for(REQUESTS, 48)
    model = CombinedModel(folder)
    alone = [_alone(model, r) for r in requests]
    service = Service(folder, ServeOptions(max_batch=8, max_queue=64, max_tokens=64, model_name="tiny"))
    with background_server(service) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        outcomes, wall = concurrently(client, "tiny", requests)
        stats = service.engine.stats()
    assert [o.text for o in outcomes] == alone
    assert all(o.finish_reason in ("stop", "length") for o in outcomes)
    assert stats["finished"] == REQUESTS and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["steps"] < sum(o.completion_tokens for o in outcomes) / 2  # requests shared the decode steps
    figures = summary(outcomes, wall)
    assert figures["latency_p50_s"] <= figures["latency_p99_s"] and figures["tokens_per_s"] > 0


def test_the_benchmark_runs_and_prints_its_figures(folder):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--combined", str(folder),
                           "--requests", "6", "--max-tokens", "8", "--max-batch", "3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("CPU: ")
    figures = r"\d+ requests, \d+ tokens in [\d.]+ s: [\d.]+ tokens/s, .* latency p50 [\d.]+ s p99 [\d.]+ s"
    assert re.match(r"one by one +" + figures, lines[1]) and re.match(r"concurrent +" + figures, lines[2])
    assert re.match(r"concurrent / one by one: [\d.]+x the throughput", lines[3])
    assert lines[4] == "greedy answers equal to the same request served alone: 6/6"
