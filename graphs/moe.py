"""A sparse layer's MLP of Qwen3-VL-MoE: the router and the experts, as ONNX Runtime's ``com.microsoft.MoE``.

transformers' ``Qwen3VLMoeTextSparseMoeBlock``, per token ``x`` [hidden]::

    logits  = x @ gate.weight.T                        router/MatMul (fp32: routing is a discrete choice)
    p       = softmax(logits); top k of p, divided by their sum
    out     = sum over the chosen e of p_e * down_e(silu(gate_e(x)) * up_e(x))

``com.microsoft.MoE`` (CPU, ONNX Runtime 1.32) computes exactly this from the router logits with
``normalize_routing_weights=1`` (softmax over the chosen k logits, which equals softmax, top k, renormalise) and
``activation_type=swiglu`` with ``swiglu_fusion=1``: gate and up fused into fc1 [experts, 2 * width, hidden],
*interleaved* row by row (gate 0, up 0, gate 1, up 1, ...; the CPU kernel refuses the other layouts), and its SwiGLU
``G * sigmoid(alpha * G) * (L + beta)`` with Qwen's constants, alpha 1 and beta 0, and no clamp (``swiglu_limit``
left out: infinite). gpt-oss's 1.702, beta 1 and limit 7 are a different activation; the attributes are written
explicitly so that no default decides. Measured against numpy (tiny shapes, outputs of ~140): 3e-5.

The weights are lazy, one expert stack per initializer, read from the checkpoint when the model is saved, in either
layout a checkpoint has (see :func:`expert_stacks`). The int4 build turns the node into ``QMoE`` with 4-bit
experts (:mod:`merge.stitch.passes.quantize_int4`); the router stays a float MatMul there too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from merge.contract.config import MoeSpec
from merge.contract.names import MS_DOMAIN
from merge.errors import MergeError

from .builder import GraphBuilder
from .vision import Weights

# Qwen's SwiGLU: silu(gate) * up. The op's swiglu is G * sigmoid(alpha * G) * (L + beta), clamped at swiglu_limit.
SWIGLU_ALPHA = 1.0
SWIGLU_BETA = 0.0
SWIGLU_INTERLEAVED = 1  # swiglu_fusion: gate and up fused into fc1, interleaved row by row (the CPU's only layout)
ROUTER = "router"
EXPERTS = "experts"


def moe_attributes(moe: MoeSpec) -> dict:
    """The attributes of the experts' ``MoE`` node (and of its int4 form, ``QMoE``, with the bits added)."""
    return {"k": moe.num_experts_per_tok, "activation_type": "swiglu", "swiglu_fusion": SWIGLU_INTERLEAVED,
            "activation_alpha": SWIGLU_ALPHA, "activation_beta": SWIGLU_BETA, "normalize_routing_weights": 1,
            "use_sparse_mixer": 0}


def expert_stacks(ckpt: Weights, prefix: str, layer: int, hidden: int, moe: MoeSpec, where: str):
    """The checkpoint names of layer ``layer``'s router and expert stacks, and whether each stack is stored
    transposed, after checking their shapes.

    The published Qwen3-VL-MoE safetensors store ``mlp.experts.gate_up_proj`` as [experts, hidden, 2 * width] (gate
    columns first) and ``mlp.experts.down_proj`` as [experts, width, hidden]; transformers 5.x's ``save_pretrained``
    writes its in-memory layout, [experts, 2 * width, hidden] and [experts, hidden, width]. Both are read, told apart
    by shape; a square stack (hidden equal to 2 * width or to width) cannot be told apart and is refused."""
    e, width = moe.num_experts, moe.moe_intermediate_size
    base = f"{prefix}layers.{layer}.mlp."
    router = base + "gate.weight"
    names = {"router": router, "gate_up": base + "experts.gate_up_proj", "down": base + "experts.down_proj"}
    for name in names.values():
        if name not in ckpt:
            raise MergeError(f"{where}: layer {layer} is sparse (config: {e} experts) but the checkpoint has no {name}")
    shape = tuple(ckpt.shape(router))
    if shape != (e, hidden):
        raise MergeError(f"{where}: {router} has shape {list(shape)}, but config.json says [num_experts, hidden_size] "
                         f"= [{e}, {hidden}]")
    transposed = {}
    for key, (rows, cols) in (("gate_up", (hidden, 2 * width)), ("down", (width, hidden))):
        name = names[key]
        shape = tuple(ckpt.shape(name))
        published, in_memory = (e, rows, cols), (e, cols, rows)
        if rows == cols and shape == published:
            raise MergeError(f"{where}: {name} is square {list(shape)} (hidden_size {hidden}, moe_intermediate_size "
                             f"{width}): whether it is stored [experts, in, out] (published) or [experts, out, in] "
                             "(transformers' save_pretrained) cannot be told from its shape")
        if shape not in (published, in_memory):
            raise MergeError(f"{where}: {name} has shape {list(shape)}, but config.json says {list(published)} "
                             f"(or {list(in_memory)} as transformers saves it)")
        transposed[key] = shape == published
    return names, transposed


class MoeWriter:
    """Writes sparse layers' MLPs into the decoder's builder (``decoder/layers.{i}/mlp/router``, ``.../experts``)."""

    def __init__(self, b: GraphBuilder, ckpt: Weights, prefix: str, hidden: int, moe: MoeSpec, where: str) -> None:
        self.b = b
        self.ckpt = ckpt
        self.prefix = prefix
        self.hidden = hidden
        self.moe = moe
        self.where = where

    def mlp(self, layer: int, x: ir.Value, typed) -> ir.Value:
        """Layer ``layer``'s mixture of experts on ``x`` [batch, sequence, hidden]; ``typed(value, dims)`` gives a
        float value its shape. Call inside the layer's ``mlp`` scope."""
        b, moe, e, width = self.b, self.moe, self.moe.num_experts, self.moe.moe_intermediate_size
        names, transposed = expert_stacks(self.ckpt, self.prefix, layer, self.hidden, moe, self.where)
        ckpt = self.ckpt
        with b.scope(ROUTER):
            router = names["router"]
            weight = b.weight("weight", (self.hidden, e), lambda: ckpt.load(router).T)
            logits = typed(b.op("MatMul", [x, weight], name="MatMul"), ["batch_size", "sequence_length", e])
            flat = b.op("Reshape", [logits, b.const([-1, e], "token_rows")], name="logits")
            flat = typed(flat, ["tokens", e])
        with b.scope(EXPERTS):
            gate_up, gate_up_t = names["gate_up"], transposed["gate_up"]
            down, down_t = names["down"], transposed["down"]

            def fc1() -> np.ndarray:
                stack = ckpt.load(gate_up)  # -> [experts, 2 * width, hidden], gate rows then up rows
                stack = np.swapaxes(stack, 1, 2) if gate_up_t else stack
                gate, up = stack[:, :width], stack[:, width:]
                return np.stack([gate, up], axis=2).reshape(e, 2 * width, self.hidden)  # interleaved

            def fc2() -> np.ndarray:
                stack = ckpt.load(down)  # -> [experts, hidden, width]
                return np.swapaxes(stack, 1, 2) if down_t else stack

            w1 = b.weight("gate_up_interleaved", (e, 2 * width, self.hidden), fc1)
            w2 = b.weight("down", (e, self.hidden, width), fc2)
            out = b.op("MoE", [x, flat, w1, None, w2], moe_attributes(moe), name="MoE", domain=MS_DOMAIN)
        return typed(out, ["batch_size", "sequence_length", self.hidden])
