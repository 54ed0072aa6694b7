"""Qwen3-VL's text decoder written op by op from the checkpoint, with ONNX Runtime's fused CPU ops.

The same graph the ONNX Runtime GenAI model builder writes for Qwen3-VL (its layout is what the stitch passes
and the runtime rely on, see :mod:`merge.stitch.decoder`), but every weight is an ``ir.LazyTensor`` read from
the safetensors when the model is saved, one tensor at a time. The builder loads the whole checkpoint
through ``from_pretrained`` and writes an fp32 decoder before anything is quantized (an 8B model: ~30 GB of
memory and disk); here a build holds about one weight at a time, in whatever precision it is written.

Per layer (``layers.{i}/...``)::

    input_norm      SimplifiedLayerNormalization (layer 0) or SkipSimplifiedLayerNormalization: the residual sum
                    of the previous layer's MLP output and its post-attention residual, normalized
    attn/q_proj ... MatMul per projection (weights [in, out]); a bias Add where the checkpoint has one
    attn/q_norm     per-head RMSNorm (Reshape to heads, SimplifiedLayerNormalization, Reshape back)
    attn/q_rotary   MRotaryEmbedding: interleaved 3-D rotary positions from position_ids [3, batch, sequence]
    attn/attention  GroupQueryAttention over the past keys and values (outputs present.{i}.key/value)
    post_attention_norm  SkipSimplifiedLayerNormalization (output 3: the residual the next layer adds to)
    mlp/...         gate_proj, up_proj, SiLU (Sigmoid, Mul), their product, down_proj; in a sparse layer of
                    Qwen3-VL-MoE instead mlp/router (MatMul to the router logits) and mlp/experts (MoE), see graphs.moe

then ``final_norm`` (SkipSimplifiedLayerNormalization) and ``lm_head`` (MatMul to ``logits``; a tied model's head
reads the token table, transposed). The inputs are ``inputs_embeds``, ``attention_mask``, ``position_ids`` and
the past keys and values; the outputs ``logits`` and ``present.*``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from merge.contract.config import ModelConfig, TextSpec
from merge.contract.names import (
    ATTENTION_MASK,
    DECODER_INPUTS_EMBEDS,
    DECODER_POSITION_IDS,
    DECODER_SCOPE,
    GQA_ATTENTION_BIAS,
    GQA_SEQLENS_K,
    GQA_TOTAL_SEQUENCE_LENGTH,
    LOGITS,
    LOGITS_TO_KEEP,
    MS_DOMAIN,
    OPSET,
    mlp_output,
    past_name,
    present_name,
)
from merge.errors import MergeError

from .builder import FLOAT, FLOAT16, INT32, INT64, GraphBuilder, make_model, tensor_input
from .moe import MoeWriter
from .vision import Weights

TEXT_PREFIXES = ("model.language_model.", "model.", "language_model.model.")
HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")
MROPE_INTERLEAVED = 1  # MRotaryEmbedding's mrope_layout: Qwen3-VL interleaves t, h, w over the frequencies
PADDING_BIAS = -1e9  # the attention bias at padded keys: finite, so a fully padded row stays NaN-free
# ... and in float16 (a KV cache in float16 takes its bias in float16: -1e9 would be -inf there). Far below any
# score (|q.k| / sqrt(d) of normalized heads), and far enough from float16's largest value (65504) that a score
# added to it stays finite
PADDING_BIAS_FP16 = -3e4
KV_CACHE_TYPES = {"float32": FLOAT, "float16": FLOAT16}  # what the past and present tensors may hold
SEQUENCE_AXIS = 1


@dataclass(frozen=True)
class DecoderOptions:
    """What the combined model needs of the decoder, built in rather than patched in afterwards. All off, the
    graph is the GenAI builder's (a test holds it equal to the builder's export; the benchmarks' bare decoder).

    - ``scope``: every node, value and initializer name starts with ``{scope}/`` (graph inputs and outputs keep
      the contract's names), so the combined graph reads by part in Netron.
    - ``left_padding``: each GroupQueryAttention gets a key padding bias from ``attention_mask`` and
      ``seqlens_k = total - 1`` for every row. GQA alone takes a row's length from the mask and assumes its tokens
      start at position 0, which is wrong for the left-padded rows of a batch; unpadded rows compute as before.
    - ``kv_cache``: the type of the past and present keys and values, ``"float32"`` or ``"float16"`` (half the
      bytes: 1.8 GiB less at 16k on 2B). With float16 each GroupQueryAttention takes its query, key, value and
      padding bias cast to float16 and its output is cast back (``attn/to_fp16/*``, ``attn/from_fp16``); every
      other value stays float32.
    - ``logits_to_keep``: an optional input (transformers' name; default 0 = every position, from an initializer a
      fed value overrides): the head runs on the last ``logits_to_keep`` positions only. Generating needs the last
      position alone, and the head is a large share of a prefill (2B: 311M of the decoder's 1.72B parameters).
    """

    scope: str = ""
    left_padding: bool = False
    logits_to_keep: bool = False
    kv_cache: str = "float32"

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHE_TYPES:
            raise MergeError(f"kv_cache {self.kv_cache!r}: choose one of {', '.join(KV_CACHE_TYPES)}")

    @property
    def kv_type(self) -> ir.DataType:
        return KV_CACHE_TYPES[self.kv_cache]


COMBINED = DecoderOptions(scope=DECODER_SCOPE, left_padding=True, logits_to_keep=True)  # what the stitch builds on


class DecoderGraph:
    """Builds the decoder into a :class:`GraphBuilder`; one method per part of a layer."""

    def __init__(self, config: ModelConfig, ckpt: Weights, options: DecoderOptions = DecoderOptions()) -> None:
        self.config = config
        self.text: TextSpec = config.text
        self.ckpt = ckpt
        self.options = options
        self.where = getattr(ckpt, "folder", "the checkpoint")  # for messages
        self.b = GraphBuilder(options.scope)
        self.prefix = ckpt.find_prefix(TEXT_PREFIXES, "embed_tokens.weight")
        if not self.text.mrope_section:
            raise MergeError(f"{config.where} text_config: no rope_parameters.mrope_section; the decoder's 3-D "
                             "rotary positions cannot be laid out")
        self.eps = self.text.rms_norm_eps
        self.experts = None if self.text.moe is None else MoeWriter(
            self.b, ckpt, self.prefix, self.text.hidden_size, self.text.moe, self.where)

    # -- types and shapes (the builder's value_info: inspect and Netron show every value's shape) -------
    @staticmethod
    def typed(value: ir.Value, dims, dtype: ir.DataType = FLOAT) -> ir.Value:
        value.type = ir.TensorType(dtype)
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in dims])
        return value

    def hidden(self, value: ir.Value, last: int) -> ir.Value:
        """A [batch, sequence, last] float value."""
        return self.typed(value, ["batch_size", "sequence_length", last])

    # -- weights -----------------------------------------------------------------------------------
    def _param(self, hf_name: str, name: str, *, transpose: bool = False, full_name: bool = False) -> ir.Value:
        """A checkpoint tensor as a lazy float32 initializer; ``transpose`` turns a Linear's [out, in] into the
        [in, out] that MatMul multiplies by."""
        full = hf_name if full_name else self.prefix + hf_name
        shape = tuple(self.ckpt.shape(full))
        if transpose:
            shape = shape[::-1]

        def load() -> np.ndarray:
            array = self.ckpt.load(full)
            return array.T if transpose else array

        return self.b.weight(name, shape, load)

    def linear(self, x: ir.Value, hf_module: str, name: str) -> ir.Value:
        """``x @ W.T (+ b)`` of a checkpoint Linear: MatMul by the transposed weight (the form MatMulNBits
        quantizes), then the bias if the checkpoint has one."""
        b = self.b
        out_dim = self.ckpt.shape(self.prefix + hf_module + ".weight")[0]
        with b.scope(name):
            y = b.op("MatMul", [x, self._param(hf_module + ".weight", "weight", transpose=True)], name="MatMul")
            if self.prefix + hf_module + ".bias" in self.ckpt:
                y = b.op("Add", [self.hidden(y, out_dim), self._param(hf_module + ".bias", "bias")], name="add_bias")
        return self.hidden(y, out_dim)

    def _check_shape(self, hf_name: str, expected: tuple[int, ...]) -> None:
        shape = tuple(self.ckpt.shape(self.prefix + hf_name))
        if shape != expected:
            raise MergeError(f"{self.where}: {self.prefix + hf_name} has shape "
                             f"{list(shape)}, but config.json says {list(expected)}")

    # -- parts -------------------------------------------------------------------------------------
    def rotary_caches(self) -> tuple[ir.Value, ir.Value]:
        """cos and sin of position x inverse frequency, [max_position_embeddings, head_dim / 2], computed when
        the model is written."""
        t = self.text
        theta = t.rope_theta
        shape = (t.max_position_embeddings, t.head_dim // 2)

        def angles() -> np.ndarray:
            exponents = np.arange(0, t.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(t.head_dim)
            inv_freq = np.float32(1.0) / (np.float32(theta) ** exponents)
            positions = np.arange(t.max_position_embeddings, dtype=np.float32)
            return np.outer(positions, inv_freq).astype(np.float32)

        with self.b.scope("rotary"):
            cos = self.b.weight("cos_cache", shape, lambda: np.cos(angles()))
            sin = self.b.weight("sin_cache", shape, lambda: np.sin(angles()))
        return cos, sin

    def mask_lengths(self, attention_mask: ir.Value, embeds: ir.Value) -> dict[int, ir.Value]:
        """GroupQueryAttention's inputs from the mask, by input position: ``seqlens_k`` [batch] (int32),
        ``total_sequence_length`` (int32 scalar), and with ``left_padding`` the key padding ``attention_bias``.

        Without left padding ``seqlens_k`` is each row's tokens - 1 (GQA then assumes the tokens sit at the start of
        the row). With it every row counts as full length and the padded keys get a large negative bias::

            attention_mask [B, T]   0 0 1 1 1         (a row with two pads on the left)
            seqlens_k      [B]      T - 1             (every row)
            attention_bias [B,1,S,T]  -1e9 -1e9 0 0 0   (the same for each of the S query positions)
        """
        b = self.b
        with b.scope("attention_mask"):
            total = b.op("Shape", [attention_mask], {"start": 1, "end": 2}, name="total")
            total = b.op("Squeeze", [self.typed(total, [1], INT64)], name="total_scalar")
            total = b.op("Cast", [self.typed(total, [], INT64)], {"to": INT32}, name="total_sequence_length")
            total = self.typed(total, [], INT32)
            inputs = {GQA_TOTAL_SEQUENCE_LENGTH: total}
            if not self.options.left_padding:
                tokens = b.op("ReduceSum", [attention_mask, b.const([1], "axis")], {"keepdims": 0}, name="tokens")
                last = b.op("Sub", [self.typed(tokens, ["batch_size"], INT64), b.const(np.int64(1), "one")],
                            name="last")
                seqlens = b.op("Cast", [self.typed(last, ["batch_size"], INT64)], {"to": INT32}, name="seqlens_k")
                inputs[GQA_SEQLENS_K] = self.typed(seqlens, ["batch_size"], INT32)
                return inputs
            batch = self.typed(b.op("Shape", [attention_mask], {"start": 0, "end": 1}, name="batch"), [1], INT64)
            last = b.op("Sub", [total, b.const(np.int32(1), "one")], name="last_position")
            seqlens = b.op("Expand", [self.typed(last, [], INT32), batch], name="seqlens_k")
            inputs[GQA_SEQLENS_K] = self.typed(seqlens, ["batch_size"], INT32)
            mask = b.op("Cast", [attention_mask], {"to": FLOAT}, name="mask_float")
            pads = b.op("Sub", [mask, b.const(np.float32(1), "one_float")], name="mask_minus_one")
            half = self.options.kv_cache == "float16"
            large = np.float32(-(PADDING_BIAS_FP16 if half else PADDING_BIAS))
            key_bias = b.op("Mul", [pads, b.const(large, "large")], name="key_bias")
            if half:  # GroupQueryAttention takes its bias in the cache's type
                key_bias = b.op("Cast", [self.typed(key_bias, ["batch_size", "total_sequence_length"])],
                                {"to": FLOAT16}, name="key_bias_fp16")
                self.typed(key_bias, ["batch_size", "total_sequence_length"], FLOAT16)
            key_bias = b.op("Unsqueeze", [key_bias, b.const([1, 2], "axes")], name="key_bias_4d")  # [B, 1, 1, T]
            shape = b.op("Concat", [batch, b.const([1], "one_head"),
                                    b.op("Shape", [embeds], {"start": 1, "end": 2}, name="sequence"),
                                    b.op("Shape", [attention_mask], {"start": 1, "end": 2}, name="total_length")],
                         {"axis": 0}, name="bias_shape")
            bias = b.op("Expand", [key_bias, shape], name="attention_bias")
            inputs[GQA_ATTENTION_BIAS] = self.typed(
                bias, ["batch_size", 1, "sequence_length", "total_sequence_length"], self.options.kv_type)
        return inputs

    def head_norm(self, x: ir.Value, hf_module: str, name: str, heads: int) -> ir.Value:
        """Qwen3's RMSNorm over each head's features."""
        b, d = self.b, self.text.head_dim
        with b.scope(name):
            per_head = b.op("Reshape", [x, self.shapes["per_head"]], name="heads")
            rows = ["batch_size", f"sequence_length * {heads}", d]
            normed = b.op("SimplifiedLayerNormalization",
                          [self.typed(per_head, rows), self._param(hf_module + ".weight", "weight")],
                          {"epsilon": self.eps, "axis": -1, "stash_type": 1}, name="norm")
            joined = b.op("Reshape", [self.typed(normed, rows), self.shapes[heads]], name="joined")
            return self.hidden(joined, heads * d)

    def rotary(self, x: ir.Value, positions: ir.Value, cos: ir.Value, sin: ir.Value, heads: int, name: str):
        return self.hidden(self.b.op("MRotaryEmbedding", [x, positions, cos, sin],
                         {"interleaved": 0, "rotary_embedding_dim": 0, "num_heads": heads,
                          "mrope_section": list(self.text.mrope_section), "mrope_layout": MROPE_INTERLEAVED,
                          "is_packed_batching": 0}, name=name, domain=MS_DOMAIN), heads * self.text.head_dim)

    def skip_norm(self, x: ir.Value, skip: ir.Value, hf_weight: str, name: str, *,
                  residual: bool = True) -> tuple[ir.Value, ir.Value | None]:
        """SkipSimplifiedLayerNormalization: (normalized ``x + skip``, ``x + skip`` when ``residual``)."""
        b = self.b
        weight = self._param(hf_weight, f"{name}/weight")
        node = b.node(ir.Node(MS_DOMAIN, "SkipSimplifiedLayerNormalization", [x, skip, weight],
                              attributes=[ir.AttrFloat32("epsilon", self.eps)], num_outputs=4 if residual else 1,
                              name=name))  # outputs 1 and 2 (mean, inverse deviation) stay absent
        node_name = node.name
        for absent in node.outputs[1:3]:
            absent.name = ""  # an empty name: the optional output is not computed
        node.outputs[0].name = f"{node_name}/output"
        out = self.hidden(node.outputs[0], self.text.hidden_size)
        if not residual:
            return out, None
        node.outputs[3].name = f"{node_name}/residual"
        return out, self.hidden(node.outputs[3], self.text.hidden_size)

    def attention(self, i: int, x: ir.Value, positions: ir.Value, caches, lengths, past) -> ir.Value:
        b, t = self.b, self.text
        hf = f"layers.{i}.self_attn."
        with b.scope("attn"):
            q = self.linear(x, hf + "q_proj", "q_proj")
            k = self.linear(x, hf + "k_proj", "k_proj")
            v = self.linear(x, hf + "v_proj", "v_proj")
            q = self.head_norm(q, hf + "q_norm", "q_norm", t.num_heads)
            k = self.head_norm(k, hf + "k_norm", "k_norm", t.num_kv_heads)
            q = self.rotary(q, positions, *caches, t.num_heads, "q_rotary")
            k = self.rotary(k, positions, *caches, t.num_kv_heads, "k_rotary")
            half = self.options.kv_cache == "float16"
            if half:  # GroupQueryAttention takes one type for its query, keys, values and cache
                with b.scope("to_fp16"):
                    q, k, v = (self.typed(b.op("Cast", [x], {"to": FLOAT16}, name=n),
                                          ["batch_size", "sequence_length", x.shape[-1]], FLOAT16)
                               for x, n in ((q, "q"), (k, "k"), (v, "v")))
            inputs: list[ir.Value | None] = [q, k, v, past[0], past[1]]
            inputs += [None] * (max(lengths) + 1 - len(inputs))
            for position, value in lengths.items():
                inputs[position] = value
            out, present_k, present_v = b.op_multi(
                "GroupQueryAttention", inputs,
                {"num_heads": t.num_heads, "kv_num_heads": t.num_kv_heads, "scale": float(t.head_dim) ** -0.5,
                 "local_window_size": -1, "softcap": 0.0, "do_rotary": 0, "rotary_interleaved": 0},
                num_outputs=3, name="attention", domain=MS_DOMAIN)
            out.name = b.scoped("attention/output")
            self.typed(out, ["batch_size", "sequence_length", t.num_heads * t.head_dim], self.options.kv_type)
            if half:
                out = self.hidden(b.op("Cast", [out], {"to": FLOAT}, name="from_fp16"), t.num_heads * t.head_dim)
            present_k.name, present_v.name = present_name(past[0].name), present_name(past[1].name)
            self.presents[i, "key"], self.presents[i, "value"] = present_k, present_v
            return self.linear(out, hf + "o_proj", "o_proj")

    def mlp(self, i: int, x: ir.Value) -> ir.Value:
        b = self.b
        hf = f"layers.{i}.mlp."
        if self.experts is not None and self.text.moe.is_sparse(i):
            with b.scope("mlp"):
                out = self.experts.mlp(i, x, self.typed)
            out.name = mlp_output(i, self.options.scope)  # DeepStack's anchor, as for a dense layer
            return out
        with b.scope("mlp"):
            gate = self.linear(x, hf + "gate_proj", "gate_proj")
            up = self.linear(x, hf + "up_proj", "up_proj")
            width = gate.shape[-1]
            with b.scope("act"):
                act = b.op("Mul", [gate, self.hidden(b.op("Sigmoid", [gate]), width)], name="SiLU")
            product = b.op("Mul", [self.hidden(act, width), up], name="gate_times_up")
            out = self.linear(self.hidden(product, width), hf + "down_proj", "down_proj")
            out.name = mlp_output(i, self.options.scope)  # DeepStack's anchor, found by this name
            return out

    def head_weight(self) -> ir.Value:
        """The head as a MatMul weight [hidden, vocab]: ``lm_head.weight`` transposed, or the token table for a
        tied model."""
        t = self.text
        if self.config.tie_word_embeddings:
            hf, full = self.prefix + "embed_tokens.weight", True
        else:
            hf = next((n for n in HEAD_NAMES if n in self.ckpt), None)
            if hf is None:
                raise MergeError(f"{self.where}: tie_word_embeddings is false but "
                                 f"the checkpoint has no head ({' or '.join(HEAD_NAMES)})")
            full = True
        shape = tuple(self.ckpt.shape(hf))
        if shape != (t.vocab_size, t.hidden_size):
            raise MergeError(f"{self.where}: {hf} has shape {list(shape)}, not "
                             f"[vocab_size, hidden_size] = [{t.vocab_size}, {t.hidden_size}]")
        return self._param(hf, "lm_head/weight", transpose=True, full_name=full)

    # -- the whole decoder -------------------------------------------------------------------------
    def build(self) -> ir.Model:
        t, b = self.text, self.b
        self._check_shape("embed_tokens.weight", (t.vocab_size, t.hidden_size))
        for i in range(t.num_layers):
            self._check_shape(f"layers.{i}.self_attn.q_proj.weight", (t.num_heads * t.head_dim, t.hidden_size))
            self._check_shape(f"layers.{i}.self_attn.k_proj.weight", (t.num_kv_heads * t.head_dim, t.hidden_size))
        embeds = tensor_input(DECODER_INPUTS_EMBEDS, FLOAT, ["batch_size", "sequence_length", t.hidden_size])
        mask = tensor_input(ATTENTION_MASK, INT64, ["batch_size", "total_sequence_length"])
        positions = tensor_input(DECODER_POSITION_IDS, INT64, [3, "batch_size", "sequence_length"])
        pasts = {(i, kind): tensor_input(past_name(i, kind), self.options.kv_type,
                                         ["batch_size", t.num_kv_heads, "past_sequence_length", t.head_dim])
                 for kind in ("key", "value") for i in range(t.num_layers)}
        self.presents: dict[tuple[int, str], ir.Value] = {}
        with b.scope("shapes"):  # shared by every layer's head norms
            self.shapes = {"per_head": b.const([0, -1, t.head_dim], "per_head")}
            for heads in (t.num_heads, t.num_kv_heads):
                if heads not in self.shapes:
                    self.shapes[heads] = b.const([0, -1, heads * t.head_dim], f"{heads}_heads_joined")
        caches = self.rotary_caches()
        lengths = self.mask_lengths(mask, embeds)
        hidden, residual, mlp_out = None, embeds, None
        for i in range(t.num_layers):
            with b.scope(f"layers.{i}"):
                if i == 0:
                    hidden = self.hidden(b.op(
                        "SimplifiedLayerNormalization",
                        [embeds, self._param("layers.0.input_layernorm.weight", "input_norm/weight")],
                        {"epsilon": self.eps, "axis": -1, "stash_type": 1}, name="input_norm"), t.hidden_size)
                else:
                    hidden, residual = self.skip_norm(residual, mlp_out, f"layers.{i}.input_layernorm.weight",
                                                      "input_norm")
                attn = self.attention(i, hidden, positions, caches, lengths, (pasts[i, "key"], pasts[i, "value"]))
                hidden, residual = self.skip_norm(residual, attn, f"layers.{i}.post_attention_layernorm.weight",
                                                  "post_attention_norm")
                mlp_out = self.mlp(i, hidden)
        hidden, _ = self.skip_norm(residual, mlp_out, "norm.weight", "final_norm", residual=False)
        optional = []
        if self.options.logits_to_keep:
            keep = self.keep_input()
            optional.append(keep)
            with b.scope("logits_to_keep"):
                keep = self.fed_or_zero(keep)
                start = b.op("Neg", [keep], name="start")  # -k: the last k positions; -0 = 0: all of them
                starts = b.op("Unsqueeze", [start, b.const([0], "axes")], name="starts")
                hidden = b.op("Slice", [hidden, starts, b.const([np.iinfo(np.int64).max], "ends"),
                                        b.const([SEQUENCE_AXIS], "axis")], name="hidden")
                self.typed(hidden, ["batch_size", "logits_sequence_length", t.hidden_size])
        logits = b.op("MatMul", [hidden, self.head_weight()], name="lm_head")
        logits.name = LOGITS
        self.typed(logits, ["batch_size", "logits_sequence_length" if optional else "sequence_length", t.vocab_size])
        for value in self.presents.values():
            self.typed(value, ["batch_size", t.num_kv_heads, "total_sequence_length", t.head_dim],
                       self.options.kv_type)
        inputs = [mask, positions, embeds, *pasts.values(), *optional]
        outputs = [logits, *(self.presents[key] for key in pasts)]  # every layer's key, then the values, as the pasts
        return make_model(b, inputs, outputs, name="decoder", opset_imports={"": OPSET, MS_DOMAIN: 1})

    def keep_input(self) -> ir.Value:
        """The input ``logits_to_keep``: an *optional* int64 scalar (``optional(tensor(int64))``), so a client may
        leave it out. Not an initializer that a fed value overrides: ONNX Runtime warns about every such input on
        every load, in every binding."""
        return tensor_input(LOGITS_TO_KEEP, INT64, [], optional=True)

    def fed_or_zero(self, keep: ir.Value) -> ir.Value:
        """The value fed as ``keep``, or 0 (every position) when the call left it out::

            fed = OptionalHasElement(logits_to_keep)
            If(fed): then OptionalGetElement(logits_to_keep)   else 0
        """
        b = self.b
        fed = b.op("OptionalHasElement", [keep], name="fed")
        with b.subgraph() as then:
            value = then.op("OptionalGetElement", [keep], name="value")
            then_branch = then.graph("then", [self.typed(value, [], INT64)])
        with b.subgraph() as absent:
            zero = absent.op("Constant", [], {"value": ir.tensor(np.array(0, np.int64))}, name="every_position")
            else_branch = absent.graph("else", [self.typed(zero, [], INT64)])
        kept = b.op("If", [fed], {"then_branch": then_branch, "else_branch": else_branch}, name="value")
        return self.typed(kept, [], INT64)


def build_decoder_model(ckpt: Weights, config: ModelConfig, options: DecoderOptions = DecoderOptions()) -> ir.Model:
    """The decoder graph of ``config`` with lazy weights from ``ckpt`` (nothing is read until it is saved)."""
    return DecoderGraph(config, ckpt, options).build()

