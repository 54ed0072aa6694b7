"""``verify``'s PyTorch side: every stage's reference values from ``Qwen3VLForConditionalGeneration``.

For int4 folders the reference carries the *same* 4-bit (and 8-bit) weights (quantized by the build's own
quantizers, :mod:`merge.quantize`, with the folder's method, block size, symmetry and per-matrix bits, and
dequantized by the format's functions, :mod:`merge.contract.quant`), so quantization error is not mistaken for a
graph error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import numpy as np

from merge.contract.names import VISION_DEEPSTACK_EMBEDS, VISION_IMAGE_EMBEDS
from merge.contract.quant import QuantSpec, dequantize_nbits_rows, dequantize_weight_int8
from merge.quantize import quantize_weight_int8, quantize_weight_nbits

from .classes import is_expert_stack

log = logging.getLogger(__name__)

INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
              "pixel_values_videos", "video_grid_thw")


def int4_weight(weight: np.ndarray, quant: QuantSpec, name: str = "") -> np.ndarray:
    """A Linear weight [out, in] as the int4 folder holds it (quantized as the build does, dequantized). ``name``
    (the PyTorch parameter's or module's) says which matrix it is: the kinds ``quant.eight_bit`` names are 8-bit."""
    w = np.ascontiguousarray(np.asarray(weight, np.float32).T)  # [in, out] as MatMulNBits sees it
    bits = quant.bits_for(name)
    packed, scales, zero_points = quantize_weight_nbits(w, bits, quant.block_for(w.shape[0]), quant.symmetric,
                                                        method=quant.method)
    return dequantize_nbits_rows(packed, scales, zero_points, w.shape[0], bits)


def int8_weight(weight: np.ndarray) -> np.ndarray:
    """A vision product's weight as the int8 vision part holds it (per-channel int8, dequantized)."""
    weight = np.asarray(weight, np.float32)
    flat = weight.reshape(weight.shape[0], -1)
    return dequantize_weight_int8(*quantize_weight_int8(flat)).reshape(weight.shape)


def int4_expert_stack(stack: np.ndarray, quant: QuantSpec, name: str) -> np.ndarray:
    """An expert stack [experts, out, in] (transformers' in-memory layout) as the int4 folder's QMoE holds it: each
    expert quantized as a Linear weight is (:func:`int4_weight`; QMoE's blocks are MatMulNBits' blocks, one row per
    output, so fc1's interleaving of gate and up rows changes nothing), dequantized."""
    _, out, k = stack.shape  # gate_up_proj [E, 2 * width, hidden], down_proj [E, hidden, width]
    hidden, width = (k, out // 2) if "gate_up" in name.rsplit(".", 1)[-1] else (out, k)
    spec = dataclasses.replace(quant, block_size=quant.expert_block_size(hidden, width))
    # always 4 bits: --eight-bit names the dense matrices; "down_proj" in an expert stack's name must not pick 8
    return np.stack([int4_weight(expert, spec) for expert in np.asarray(stack, np.float32)])


def use_int4_weights_(model, quant: QuantSpec, shared_table: bool = False) -> int:
    """Give the text decoder's linear layers, expert stacks (and the head) the exact weights the int4 model holds;
    with ``shared_table`` the token embeddings too (a tied int4 model reads them from the head's 4-bit blocks). An
    MoE router (not a Linear) keeps its fp32 weights, as the int4 folder does."""
    import torch

    from .classes import EXPERT_STACKS

    def requantized(weight: torch.Tensor, name: str) -> torch.Tensor:
        return torch.from_numpy(int4_weight(weight.detach().float().numpy(), quant, name))

    count = 0
    with torch.no_grad():
        for name, module in model.model.language_model.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(requantized(module.weight, name))
                count += 1
        for name, param in model.model.language_model.named_parameters():
            if name.endswith(tuple(stack.split(".", 1)[1] for stack in EXPERT_STACKS)) and ".experts." in name:
                param.copy_(torch.from_numpy(int4_expert_stack(param.detach().float().numpy(), quant, name)))
                count += 1
        # The head is quantized on its own; an untied (or unshared) embedding table stays fp32.
        model.lm_head.weight = torch.nn.Parameter(requantized(model.lm_head.weight, "lm_head"))
        if shared_table:
            model.model.language_model.embed_tokens.weight = model.lm_head.weight
    return count + 1


def use_int8_vision_weights_(model) -> int:
    """Give the vision tower's products (the patch embedding and every linear layer) the exact weights an int8
    vision part holds (per-channel int8, dequantized)."""
    import torch

    count = 0
    with torch.no_grad():
        for module in model.model.visual.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv3d):
                module.weight.copy_(torch.from_numpy(int8_weight(module.weight.detach().float().numpy())))
                count += 1
    return count


def quantized_weights(quant: QuantSpec | None, shared_table: bool, vision_int8: bool):
    """The streamed reference's transform: each weight, as it is read, becomes what the folder holds (the same
    choice of weights as :func:`use_int4_weights_` and :func:`use_int8_vision_weights_`)."""
    import torch

    def transform(name: str, module, weight: np.ndarray) -> np.ndarray:
        if quant is not None:
            if name == "lm_head.weight" or (shared_table and name.endswith("embed_tokens.weight")
                                            and "language_model" in name):
                return int4_weight(weight, quant, "lm_head")  # a shared table is the head's own blocks
            if (name.startswith("model.language_model.") and isinstance(module, torch.nn.Linear)
                    and name.endswith(".weight")):
                return int4_weight(weight, quant, name)
            if name.startswith("model.language_model.") and is_expert_stack(name):
                return int4_expert_stack(weight, quant, name)
        if vision_int8 and name.startswith("model.visual.") and name.endswith(".weight") and isinstance(
                module, torch.nn.Linear | torch.nn.Conv3d):
            return int8_weight(weight)
        return weight

    return transform


def load_model(model_folder: Path, quant: QuantSpec | None = None, shared_table: bool = False,
               vision_int8: bool = False, stream: bool | None = None, weights=None):
    """``Qwen3VLForConditionalGeneration`` (or ``Qwen3VLMoeForConditionalGeneration``) in fp32, eval mode, carrying
    the weights a quantized folder holds:
    the decoder's 4-bit ones when ``quant``, the vision part's int8 ones (7-bit codes) when ``vision_int8``.

    ``stream``: read each module's weights from ``weights`` (the folder's checkpoint, an
    :class:`export.streamed.Weights`) as it runs, for models whose fp32 weights do not fit in memory; ``None``
    chooses so when they would take more than 80% of the memory available now (and ``weights`` is given)."""
    import torch

    from .classes import model_classes_of

    if weights is not None and getattr(weights, "seeded", False):
        stream = True  # weights drawn when read (merge.sources.seeded): transformers' loader cannot read them
    if stream is None and weights is not None:
        from export.streamed import available_bytes, fp32_bytes

        need, have = fp32_bytes(weights), available_bytes()
        stream = bool(have) and need > 0.8 * have
        if stream:
            log.info("reference: %.1f GiB of fp32 weights, %.1f GiB available: weights are read as modules run",
                     need / 2**30, have / 2**30)
    if stream:
        from export.streamed import streamed_model

        if weights is None:
            raise ValueError("a streamed reference needs the checkpoint (weights=)")
        return streamed_model(model_folder, weights, quantized_weights(quant, shared_table, vision_int8))
    model = model_classes_of(model_folder)[1].from_pretrained(model_folder, dtype=torch.float32).eval()
    if quant is not None:
        count = use_int4_weights_(model, quant, shared_table=shared_table)
        log.info("reference: %d linear layers carry the int4 folder's weights", count)
    if vision_int8:
        log.info("reference: %d vision products carry the int8 weights", use_int8_vision_weights_(model))
    return model


def sparse_routers(model) -> list:
    """The routers (``mlp.gate``) of a Qwen3-VL-MoE model's sparse layers, in layer order (none for a dense model)."""
    layers = model.model.language_model.layers
    return [layer.mlp.gate for layer in layers if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]


class ForcedRouting:
    """Each sparse layer takes the experts given for it, call by call (``choices[call][layer]``: [rows, k] indexes,
    rows in the call's batch-major token order), weighted as the model weights its own choice (softmax over all the
    experts, the chosen ones' probabilities divided by their sum); the router logits each layer computed are kept
    (``logits[call][layer]``). A quantized folder's int8 activations move router logits a little and, where two
    experts nearly tie for the k-th place, change the choice: with the folder's choices the two sides compute the
    same experts and differ only by rounding."""

    def __init__(self, model, choices: list[list[np.ndarray]]) -> None:
        self.routers = sparse_routers(model)
        self.choices = choices
        self.logits: list[list[np.ndarray]] = []
        self.handles = []

    def __enter__(self) -> ForcedRouting:
        for index, router in enumerate(self.routers):
            self.handles.append(router.register_forward_hook(
                lambda module, args, output, index=index: self._route(index, output)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _route(self, layer: int, output):
        import torch

        logits = output[0]
        if layer == 0:
            self.logits.append([])
        call = len(self.logits) - 1
        self.logits[call].append(logits.detach().float().numpy().copy())
        if call >= len(self.choices):
            raise ValueError(f"the reference made call {call + 1}, but expert choices were given for "
                             f"{len(self.choices)}")
        chosen = torch.from_numpy(np.asarray(self.choices[call][layer], np.int64))
        if chosen.shape[0] != logits.shape[0] or chosen.shape[1] != output[2].shape[1]:
            raise ValueError(f"layer {layer}, call {call}: expert choices {tuple(chosen.shape)} for router logits "
                             f"{tuple(logits.shape)} choosing {output[2].shape[1]}")
        probs = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, chosen)
        return logits, (probs / probs.sum(dim=-1, keepdim=True)).to(logits.dtype), chosen


def torch_reference(model, inputs: dict[str, np.ndarray], new_tokens: int, *, forced_tokens: np.ndarray | None = None,
                    routing: list[list[np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """Every stage's reference values for ``inputs`` (the processor's output): vision, DeepStack, merged
    embeddings, 3-D positions, prefill logits, the greedy tokens and each decode step's logits.

    ``forced_tokens`` [batch, new_tokens]: the tokens fed after each step instead of the model's own (``tokens`` is
    then the model's own choice at each step, given those). ``routing``: the experts each sparse layer takes, call by
    call (:class:`ForcedRouting`); the router logits the prompt's call computed are then in ``router_logits``
    [sparse layers, rows, experts]."""
    import torch

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    present = {kind: kind_grid in inputs and inputs[kind_grid].shape[0] > 0
               for kind, kind_grid in (("image", "image_grid_thw"), ("video", "video_grid_thw"))}
    ref: dict[str, np.ndarray] = {}
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(t["input_ids"])
        features, deepstack = [], []
        for kind, pixels, grid, token in (("image", "pixel_values", "image_grid_thw", model.config.image_token_id),
                                          ("video", "pixel_values_videos", "video_grid_thw",
                                           model.config.video_token_id)):
            if not present[kind]:
                continue
            vision = model.model.visual(t[pixels], grid_thw=t[grid])
            features.append(vision.pooler_output.numpy())
            deepstack.append(np.stack([d.numpy() for d in vision.deepstack_features]) if vision.deepstack_features
                             else np.zeros((0, *vision.pooler_output.shape), np.float32))  # a config without it
            mask = (t["input_ids"] == token).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, vision.pooler_output)
        if features:  # the combined model's order: the images' rows, then the videos'
            ref[VISION_IMAGE_EMBEDS] = np.concatenate(features)
            ref[VISION_DEEPSTACK_EMBEDS] = np.concatenate(deepstack, axis=1)
        ref["inputs_embeds"] = embeds.numpy()
        positions, _ = model.model.get_rope_index(
            t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"] if present["image"] else None,
            t["video_grid_thw"].clone() if present["video"] else None, attention_mask=t["attention_mask"],
        )
        ref["position_ids"] = positions.numpy()
        kwargs = {k: t[k] for k in INPUT_KEYS if k in t}
        for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
            if not present[kind]:
                kwargs.pop(pixels, None)
                kwargs.pop(grid, None)
        # one pass over the prompt: generate's own first forward; its final norm's output (every position) is kept
        # and the head applied to it here (generate computes the last position's logits only). A streamed reference
        # reads (and requantizes) its weights on every pass: a second pass would double verify's time.
        kept: list[torch.Tensor] = []
        hook = model.model.language_model.norm.register_forward_hook(
            lambda module, args, output: kept.append(output) if not kept else None)
        if forced_tokens is not None:
            kwargs["logits_processor"] = _forcing(forced_tokens, new_tokens)
        forced = ForcedRouting(model, routing) if routing is not None else None
        try:
            with forced if forced is not None else contextlib.nullcontext():
                gen = model.generate(**kwargs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        finally:
            hook.remove()
        ref["prefill_logits"] = model.lm_head(kept[0]).numpy()
    if forced is not None:
        ref["router_logits"] = np.stack(forced.logits[0])
    if forced_tokens is None:
        ref["tokens"] = gen.sequences[:, inputs["input_ids"].shape[1]:].numpy()
    else:
        ref["tokens"] = np.stack([x.argmax(-1).numpy() for x in gen.logits], axis=1)
    ref["step_logits"] = np.stack([x.numpy() for x in gen.logits[1:]]) if len(gen.logits) > 1 else np.zeros(0)
    return ref


def _forcing(tokens: np.ndarray, new_tokens: int):
    """A logits processor for ``generate`` choosing ``tokens[:, step]`` at each step (the raw logits, which
    ``output_logits`` returns, are left as computed)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    tokens = np.asarray(tokens, np.int64)
    if tokens.ndim != 2 or tokens.shape[1] < new_tokens:
        raise ValueError(f"forced tokens {tokens.shape} do not cover {new_tokens} new tokens")

    class Force(LogitsProcessor):
        def __init__(self) -> None:
            self.step = 0

        def __call__(self, input_ids, scores):
            chosen = torch.from_numpy(tokens[:, self.step])
            self.step += 1
            forced = torch.full_like(scores, -torch.inf)
            forced.scatter_(1, chosen[:, None], 0.0)
            return forced

    return LogitsProcessorList([Force()])
