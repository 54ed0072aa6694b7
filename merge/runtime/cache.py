"""A KV cache the attention writes in place: one buffer per past tensor, of a fixed capacity, bound (ONNX Runtime
IOBinding) both as ``past_key_values.*`` and as ``present.*``.

Without it each call returns ``present`` = past + new, a fresh copy of the whole cache that the next call takes
back: at long contexts the copying costs more than the attention reading it. With it the decoder's
GroupQueryAttention sees ``present`` bound to the memory of ``past`` and appends the new keys and values there,
at the position the attention mask gives (every row's past is the mask's length minus the new tokens).

The model's contract allows both: a past tensor either holds exactly the past, or is longer than the call's
attention mask (not equal: a decode step whose mask was not grown must still fail the model's check). A client
without IOBinding keeps feeding ``present`` back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from merge.contract.names import KV_CACHE_IN_PLACE, present_name
from merge.errors import MergeError

# the build sets it to "1": the model accepts past buffers of a capacity. A fact the graph carries for any binding;
# the Python runtime decides by the folder's format (merge.contract.manifest) and checks the model carries it
METADATA_KEY = KV_CACHE_IN_PLACE


ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # what a KV cache may hold


def kv_cache_dtype(session, past_names: Sequence[str]) -> np.dtype:
    """The type of the session's ``past_key_values.*`` inputs (one for all of them): float32 or float16."""
    types = {i.type for i in session.get_inputs() if i.name in set(past_names)}
    if len(types) != 1 or next(iter(types)) not in ORT_TYPES:
        raise MergeError(f"the model's past_key_values inputs are of type(s) {sorted(types)}, not all one of "
                         f"{sorted(ORT_TYPES)}")
    return np.dtype(ORT_TYPES[types.pop()])


class InPlaceCache:
    """Past and present in the same buffers, room for ``capacity`` positions (each buffer holds one more: the model
    takes a past tensor as a buffer only when it is longer than the call's attention mask)."""

    def __init__(self, session, past_names: Sequence[str], batch: int, kv_heads: int, head_dim: int,
                 capacity: int):
        import onnxruntime as ort

        if capacity <= 0:
            raise MergeError(f"a KV cache needs a positive capacity, got {capacity}")
        self.session = session
        self.capacity = 0
        self.dtype = kv_cache_dtype(session, past_names)  # float32, or float16: half the bytes
        self.arrays: dict[str, np.ndarray] = dict.fromkeys(past_names, np.zeros((batch, kv_heads, 0, head_dim),
                                                                                self.dtype))
        self.buffers: dict = {}
        self._ortvalue = ort.OrtValue.ortvalue_from_numpy
        self.reserve(capacity)
        self.output_names = [o.name for o in session.get_outputs()
                             if o.name not in {present_name(p) for p in past_names}]
        # optional-typed inputs (logits_to_keep): bound as OrtValues. Run through session.run instead, a call would
        # get ``present`` back as a fresh copy of the whole cache (a transient of the cache's size on every prefill
        # call that keeps one position's logits: 3.5 GiB at 16k on 2B)
        self.optional = {i.name for i in session.get_inputs() if i.type.startswith("optional(")}

    def reserve(self, capacity: int) -> None:
        """Room for at least ``capacity`` positions: larger buffers, what is written so far copied over (once per
        growth; grow geometrically, as :meth:`merge.runtime.model.CombinedModel.generate` does)."""
        if capacity <= self.capacity:
            return
        grown = {}
        for name, old in self.arrays.items():
            array = np.zeros((*old.shape[:2], capacity + 1, old.shape[3]), self.dtype)
            array[:, :, :old.shape[2]] = old
            grown[name] = array
        # the arrays own the memory; the OrtValues wrap it (no copy), so the model's writes show in the arrays
        self.arrays = grown
        self.buffers = {name: self._ortvalue(array) for name, array in grown.items()}
        self.capacity = capacity

    def replace(self, arrays: dict[str, np.ndarray]) -> None:
        """Take ``arrays`` (one per past tensor, each [batch, kv_heads, capacity + 1, head_dim] of the cache's type,
        C-ordered)
        as the buffers: a batch whose rows changed (:mod:`merge.runtime.engine` lays its rows out anew)."""
        if set(arrays) != set(self.arrays):
            raise MergeError("a KV cache's buffers are replaced by one array per past tensor")
        shapes = {a.shape for a in arrays.values()}
        if len(shapes) != 1 or any(a.dtype != self.dtype or not a.flags.c_contiguous for a in arrays.values()):
            raise MergeError(f"a KV cache's buffers are C-ordered {self.dtype} arrays of one shape, got "
                             f"{sorted(shapes)} of {sorted({str(a.dtype) for a in arrays.values()})}")
        (shape,) = shapes
        if len(shape) != 4 or shape[2] < 2:
            raise MergeError(f"a KV cache's buffers are [batch, kv_heads, capacity + 1, head_dim], got {shape}")
        self.arrays = dict(arrays)
        self.buffers = {name: self._ortvalue(array) for name, array in self.arrays.items()}
        self.capacity = shape[2] - 1

    def run(self, feeds: dict[str, np.ndarray], run_options=None) -> dict[str, np.ndarray]:
        """One call (``run_options``: ``onnxruntime.RunOptions``, or none); the outputs other than ``present.*``
        (those are in the buffers)."""
        total = feeds["attention_mask"].shape[1]
        if total > self.capacity:
            raise MergeError(f"the call needs {total} positions in the KV cache but it holds {self.capacity}")
        for name in feeds:
            if name in self.buffers:
                raise MergeError(f"{name} is the in-place cache's own buffer; do not feed it")
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if name in self.optional:  # bind_cpu_input refuses an optional-typed input; an OrtValue of it binds
                # (np.require, not ascontiguousarray: that makes a scalar 1-D)
                binding.bind_ortvalue_input(name, self._ortvalue(np.require(value, requirements="C")))
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:  # ONNX Runtime allocates these; they come back in this order
            binding.bind_output(name)
        for name, buffer in self.buffers.items():
            binding.bind_ortvalue_input(name, buffer)
            self._bind_present(binding, present_name(name), buffer)
        self.session.run_with_iobinding(binding, run_options)
        values = binding.get_outputs()[:len(self.output_names)]
        return {name: value.numpy() for name, value in zip(self.output_names, values, strict=True)}

    def _bind_present(self, binding, name: str, buffer) -> None:
        binding.bind_ortvalue_output(name, buffer)  # the same memory as the past: written in place
