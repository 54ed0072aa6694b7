"""A PyTorch reference larger than memory: weights read from the checkpoint as each module runs.

``verify`` compares a folder with ``Qwen3VLForConditionalGeneration`` in fp32. An 8B model is ~35 GB in fp32,
more than this project's 24 GiB machines hold, so for models that do not fit the reference is built with its
parameters on the meta device (buffers such as the rotary frequencies stay real) and every module whose
weights are large reads them from the safetensors right before it runs (a forward pre-hook) and drops them
right after (a forward hook). The arithmetic is the same as with the whole model in memory (same fp32 weights,
same modules, same order), so the values are the same; only time is spent re-reading (and, for a quantized
folder, re-quantizing) the weights on every forward pass. Small parameters (norms, biases) are loaded once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

_READ_THREADS = max(1, min(4, os.cpu_count() or 1))  # experts read (and requantized) at once
RESIDENT_NUMEL = 1 << 22  # parameters smaller than this (16 MiB in fp32) stay loaded
class Weights(Protocol):
    """What the reference needs of a checkpoint (``merge.sources.checkpoint.Checkpoint`` is one)."""

    def __contains__(self, name: str) -> bool: ...
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def load(self, name: str) -> np.ndarray: ...


# (parameter name, its module, the checkpoint's fp32 weight) -> the weight the reference uses
Transform = Callable[[str, torch.nn.Module, np.ndarray], np.ndarray]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no initialisation cost); their
    buffers are computed as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def fp32_bytes(ckpt: Weights) -> int:
    """How much memory the checkpoint's parameters take in fp32."""
    return 4 * sum(int(np.prod(ckpt.shape(n), dtype=np.int64)) for n in ckpt.names())


def available_bytes() -> int:
    """MemAvailable (Linux), or 0 when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def streamed_model(model_folder: Path, ckpt: Weights, transform: Transform | None = None,
                   resident_numel: int = RESIDENT_NUMEL):
    """``Qwen3VLForConditionalGeneration`` (or the MoE one) in fp32 (config from ``model_folder``) whose weights of
    ``resident_numel`` elements or more are read from ``ckpt`` when their module runs; ``transform(name, module,
    weight)`` is applied to each weight as it is read (the quantized folder's weights). An expert stack stored in the
    published layout, [experts, in, out], is transposed to the parameter's [experts, out, in] first."""
    from .classes import is_expert_stack, model_classes_of

    config_class, model_class = model_classes_of(model_folder)
    config = config_class.from_pretrained(model_folder)
    with parameters_on_meta():
        model = model_class(config).float().eval()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    transform = transform or (lambda name, module, weight: weight)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def source_of(name: str) -> str:
        if name in ckpt:
            return name
        if name == "lm_head.weight" and tied:  # a tied checkpoint stores the table once, as the embedding
            return next(n for n in ckpt.names() if n.endswith("embed_tokens.weight"))
        raise KeyError(f"{model_folder}: the checkpoint has no tensor for parameter {name!r}")

    def read(name: str, module: torch.nn.Module) -> torch.nn.Parameter:
        weight = ckpt.load(source_of(name))
        if is_expert_stack(name) and tuple(weight.shape) != shapes[name]:
            weight = np.swapaxes(weight, 1, 2)  # as transformers' loader does (conversion_mapping)
        weight = transform(name, module, weight)
        return torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),
                                  requires_grad=False)

    rows = getattr(ckpt, "load_rows", None)
    if rows is not None and any(is_expert_stack(n) for n in shapes):
        # one expert at a time: transformers' eager experts index the stack by expert, and a decode step uses
        # top-k of them (grouped_mm would read the whole stack)
        model.set_experts_implementation("eager")

    def read_experts(name: str, module: torch.nn.Module) -> ExpertRows:
        stored = ckpt.shape(source_of(name))

        def expert(index: int) -> torch.Tensor:
            weight = rows(source_of(name), index, 1)
            if stored != shapes[name]:
                weight = np.swapaxes(weight, 1, 2)
            weight = transform(name, module, weight)[0]
            return torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))

        return ExpertRows(shapes[name], expert)

    first = next(n for n, _ in model.named_parameters())  # model.device reads it: it stays real
    streamed = 0
    for module_name, module in model.named_modules():
        own = list(module._parameters.items())
        if not own:
            continue
        names = {key: f"{module_name}.{key}" if module_name else key for key, p in own if p is not None}
        large = {key for key, p in own if p is not None and p.numel() >= resident_numel and names[key] != first}
        for key in set(names) - large:
            module._parameters[key] = read(names[key], module)
        if large:
            streamed += 1
            lazy = rows is not None and any(is_expert_stack(names[k]) for k in large)
            _stream(module, {k: names[k] for k in large},
                    lambda name, mod, lazy=lazy: read_experts(name, mod) if lazy and is_expert_stack(name)
                    else read(name, mod))
    log.info("reference: %d modules read their weights from %s as they run", streamed, model_folder)
    model.streamed_modules = streamed
    return model


def _stream(module: torch.nn.Module, names: dict[str, str], read) -> None:
    placeholders = {key: module._parameters[key] for key in names}

    def load(mod, args):
        for key, name in names.items():
            mod._parameters[key] = read(name, mod)
            if isinstance(mod._parameters[key], ExpertRows) and len(args) > 1:  # (hidden, top_k_index, weights)
                mod._parameters[key].prefetch(args[1])

    def drop(mod, args, output):
        for key in names:
            mod._parameters[key] = placeholders[key]

    module.register_forward_pre_hook(load)
    module.register_forward_hook(drop)


class ExpertRows:
    """An expert stack [experts, out, in] standing in for the parameter while its module runs: ``stack[e]`` reads
    (and transforms) expert ``e`` alone, once per forward pass."""

    def __init__(self, shape: tuple[int, ...], expert: Callable[[int], torch.Tensor]) -> None:
        self.shape = torch.Size(shape)
        self._expert = expert
        self._read: dict[int, torch.Tensor] = {}

    def prefetch(self, top_k_index: torch.Tensor) -> None:
        """Read the experts the tokens were routed to, several at a time (each read is independent)."""
        from concurrent.futures import ThreadPoolExecutor

        wanted = sorted({int(e) for e in top_k_index.reshape(-1).tolist()} - set(self._read))
        wanted = [e for e in wanted if 0 <= e < self.shape[0]]
        if len(wanted) > 1:
            with ThreadPoolExecutor(_READ_THREADS) as pool:
                for index, tensor in zip(wanted, pool.map(self._expert, wanted), strict=True):
                    self._read[index] = tensor

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = int(index)
        if not isinstance(index, int) or not -self.shape[0] <= index < self.shape[0]:
            raise TypeError(f"an expert stack is read one expert at a time, not with index {index!r}")
        index %= self.shape[0]
        if index not in self._read:
            self._read[index] = self._expert(index)
        return self._read[index]
