"""Run a combined folder with ONNX Runtime alone: no torch, no transformers modeling code.

A plain greedy loop drives the one model: the first call carries the prompt and all its images; later
calls carry one new token per row, no patches, the growing attention mask, the KV cache and the
``rope_deltas`` the previous call returned.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MergeError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
ROPE_DELTAS_OUT = "rope_deltas_out"


@dataclass
class Generation:
    tokens: np.ndarray  # [batch, new_tokens] int64: the model's own greedy choices
    prefill_logits: np.ndarray  # [batch, sequence, vocab]
    step_logits: list[np.ndarray] = field(default_factory=list)  # each [batch, vocab], for new tokens 1..n-1
    prefill_outputs: dict[str, np.ndarray] = field(default_factory=dict)  # every output of the first call
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.tokens.shape[1] - 1, 0) * self.tokens.shape[0]
        return steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class CombinedModel:
    """One ``onnxruntime.InferenceSession`` over ``COMBINED/model.onnx``."""

    def __init__(self, folder: Path | str, *, threads: int | None = None, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        path = self.folder / MODEL_FILE
        if not path.is_file():
            raise MergeError(f"{self.folder}: no {MODEL_FILE}; build one with `python -m merge build --out {folder}`")
        self.config = json.loads((self.folder / "config.json").read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        text = self.config["text_config"]
        self.num_kv_heads = int(text["num_key_value_heads"])
        self.head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
        self.patch_dim = int(inputs["pixel_values"].shape[1])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_images(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((0, self.patch_dim), np.float32), np.zeros((0, 3), np.int64)

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))

    def first_feeds(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None) -> dict:
        batch = input_ids.shape[0]
        if pixel_values is None:
            pixel_values, image_grid_thw = self.empty_images()
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, np.int64),
            "pixel_values": np.ascontiguousarray(pixel_values, np.float32),
            "image_grid_thw": np.ascontiguousarray(image_grid_thw, np.int64).reshape(-1, 3),
            "rope_deltas": np.zeros((batch, 1), np.int64),
        }
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), np.float32)
        feeds.update(dict.fromkeys(self.past_names, empty))
        return feeds

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        *,
        max_new_tokens: int = 32,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int = 0,
        on_token=None,
        forced_tokens: np.ndarray | None = None,
    ) -> Generation:
        """Greedy decoding. Rows that produced an EOS token continue with ``pad_token_id`` (as HF does).

        ``forced_tokens`` [batch, n] (teacher forcing) feeds those tokens instead of the model's own choices,
        so each step's logits can be compared with a reference run; ``tokens`` still holds the greedy choices.
        """
        input_ids = np.asarray(input_ids, np.int64)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask, np.int64)
        feeds = self.first_feeds(input_ids, attention_mask, pixel_values, image_grid_thw)
        start = time.perf_counter()
        out = self.forward(feeds)
        prefill_seconds = time.perf_counter() - start
        result = Generation(tokens=np.zeros((input_ids.shape[0], 0), np.int64), prefill_logits=out["logits"],
                            prefill_seconds=prefill_seconds, prefill_outputs=out)
        finished = np.zeros(input_ids.shape[0], bool)
        tokens = []
        logits = out["logits"][:, -1]
        start = time.perf_counter()
        for step in range(max_new_tokens):
            if step:
                result.step_logits.append(logits)
            token = np.where(finished, pad_token_id, logits.argmax(-1)).astype(np.int64)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if forced_tokens is not None:
                token = np.asarray(forced_tokens[:, step], np.int64)
            finished |= np.isin(token, list(eos_token_ids))
            if step == max_new_tokens - 1 or finished.all():
                break
            attention_mask = np.concatenate([attention_mask, np.ones((len(token), 1), np.int64)], axis=1)
            pv, grid = self.empty_images()
            feeds = {"input_ids": token[:, None], "attention_mask": attention_mask, "pixel_values": pv,
                     "image_grid_thw": grid, "rope_deltas": out[ROPE_DELTAS_OUT]}
            feeds.update({p: out[p.replace("past_key_values.", "present.")] for p in self.past_names})
            out = self.forward(feeds)
            logits = out["logits"][:, -1]
        result.decode_seconds = time.perf_counter() - start
        result.tokens = np.stack(tokens, axis=1)
        return result
