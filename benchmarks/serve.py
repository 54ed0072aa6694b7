"""Load on ``merge serve``: N streaming requests at once against the same requests one by one, through the official
``openai`` client on loopback. Prints the machine, throughput (completion tokens per second of wall time) both ways,
and the p50/p99 of each request's latency and time to its first token; checks that every greedy answer served
concurrently equals the one served alone (exit 1 otherwise):

    python benchmarks/serve.py --combined combined/ --requests 32 --max-tokens 64 --max-batch 8
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import machine

PROMPTS = ("Hello there.", "Describe the image.", "Tell me a long story about a red fox and a blue bird.",
           "What do you see?", "Write a poem about the sea.", "Hi", "Explain how a bicycle works, step by step.")


@dataclass
class Outcome:
    text: str
    finish_reason: str
    completion_tokens: int
    latency: float  # seconds from sending to the last chunk
    first_token: float  # seconds from sending to the first text


def _png(seed: int, width: int, height: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def requests_for(count: int, max_tokens: int) -> list[dict]:
    """``count`` chat requests: different texts, every third with an image of its own size, max_tokens varied
    from half to all of ``max_tokens``."""
    out = []
    for i in range(count):
        content: list[dict] = []
        if i % 3 == 1:
            content.append({"type": "image_url", "image_url": {"url": _png(i, 64 + 16 * (i % 4), 48 + 16 * (i % 3))}})
        content.append({"type": "text", "text": PROMPTS[i % len(PROMPTS)]})
        tokens = max(1, max_tokens // 2 + (i * 7) % (max_tokens // 2 + 1))
        out.append({"messages": [{"role": "user", "content": content}], "max_tokens": min(tokens, max_tokens)})
    return out


def one(client, model: str, request: dict) -> Outcome:
    """One streamed request, timed."""
    start = time.perf_counter()
    first, pieces, reason, usage = None, [], "", None
    stream = client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                            **request)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first if first is not None else time.perf_counter() - start
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                reason = choice.finish_reason
    latency = time.perf_counter() - start
    return Outcome("".join(pieces), reason, usage.completion_tokens if usage else 0, latency,
                   latency if first is None else first)


def concurrently(client, model: str, requests: list[dict]) -> tuple[list[Outcome], float]:
    """All requests at once (one thread each); (outcomes in request order, wall seconds)."""
    outcomes: list[Outcome | BaseException | None] = [None] * len(requests)

    def work(i: int) -> None:
        try:
            outcomes[i] = one(client, model, requests[i])
        except BaseException as exc:  # reported below, in order
            outcomes[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    for outcome in outcomes:
        if not isinstance(outcome, Outcome):
            raise RuntimeError(f"a request failed: {outcome!r}")
    return outcomes, wall  # type: ignore[return-value]


def one_by_one(client, model: str, requests: list[dict]) -> tuple[list[Outcome], float]:
    start = time.perf_counter()
    outcomes = [one(client, model, request) for request in requests]
    return outcomes, time.perf_counter() - start


def summary(outcomes: list[Outcome], wall: float) -> dict:
    latency = np.array([o.latency for o in outcomes])
    first = np.array([o.first_token for o in outcomes])
    tokens = sum(o.completion_tokens for o in outcomes)
    return {"requests": len(outcomes), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(outcomes) / wall, 2),
            "latency_p50_s": round(float(np.percentile(latency, 50)), 3),
            "latency_p99_s": round(float(np.percentile(latency, 99)), 3),
            "first_token_p50_s": round(float(np.percentile(first, 50)), 3),
            "first_token_p99_s": round(float(np.percentile(first, 99)), 3)}


def line(name: str, s: dict) -> str:
    return (f"{name:<12} {s['requests']} requests, {s['completion_tokens']} tokens in {s['wall_s']:.2f} s: "
            f"{s['tokens_per_s']:.1f} tokens/s, {s['requests_per_s']:.2f} requests/s | latency p50 "
            f"{s['latency_p50_s']:.3f} s p99 {s['latency_p99_s']:.3f} s | first token p50 "
            f"{s['first_token_p50_s']:.3f} s p99 {s['first_token_p99_s']:.3f} s")


def main() -> int:
    import openai

    from merge.serve.app import background_server
    from merge.serve.service import ServeOptions, Service

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--combined", type=Path, required=True, help="a combined folder built by merge build")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()

    info = machine.describe(args.threads or len(os.sched_getaffinity(0)))  # ONNX Runtime's default: one per core
    print(machine.header(info))
    requests = requests_for(args.requests, args.max_tokens)
    options = ServeOptions(max_batch=args.max_batch, max_queue=max(64, args.requests),
                           max_tokens=args.max_tokens, threads=args.threads, model_name="bench")
    service = Service(args.combined, options)
    with background_server(service) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        one(client, "bench", requests[0])  # warm up
        alone, alone_wall = one_by_one(client, "bench", requests)
        together, together_wall = concurrently(client, "bench", requests)
        stats = service.engine.stats()
    report = {"machine": info, "folder": str(args.combined), "max_batch": args.max_batch,
              "one_by_one": summary(alone, alone_wall), "concurrent": summary(together, together_wall)}
    print(line("one by one", report["one_by_one"]))
    print(line("concurrent", report["concurrent"]))
    speedup = report["concurrent"]["tokens_per_s"] / report["one_by_one"]["tokens_per_s"]
    print(f"concurrent / one by one: {speedup:.2f}x the throughput (max batch {args.max_batch}); engine: "
          f"{stats.get('steps', 0)} decode steps, {stats.get('prefills', 0)} first calls")
    differ = [i for i, (a, b) in enumerate(zip(alone, together, strict=True)) if a.text != b.text]
    print(f"greedy answers equal to the same request served alone: {len(requests) - len(differ)}/{len(requests)}")
    if args.json:
        report["outcomes"] = {"one_by_one": [asdict(o) for o in alone], "concurrent": [asdict(o) for o in together]}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
