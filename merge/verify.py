"""``merge verify``: the same processor output through PyTorch and the combined model, stage by stage.

Stages, in the order data flows: vision ``image_embeds``, each DeepStack level, the merged input
embeddings, the 3-D position ids, prefill logits, each decode step's logits (teacher-forced with the
reference's tokens, so every step compares like with like), and the greedy tokens. Intermediate stages
come from a *debug copy* of the graph with extra outputs, created in memory; the shipped model is not
touched. The reference can be saved once (``--save-reference``) and reused (``--reference``) without
loading PyTorch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .compare import FP32_SCALE, compare
from .errors import MergeError

log = logging.getLogger(__name__)

# Values of the combined graph exposed by the debug copy, with the stage names they feed.
DEBUG_OUTPUTS = {
    "vision/image_embeds": "float",
    "vision/deepstack_embeds": "float",
    "inputs_embeds": "float",
    "position_ids": "int64",
}
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
# int4 folders are checked against PyTorch carrying the *same* 4-bit weights (dequantized), so the check
# separates graph mistakes from quantization error. What remains is MatMulNBits' int8 activations
# (accuracy_level 4): measured ~1e-2 of the logit scale on the presets; DeepStack or position mistakes move
# logits by the order of the scale itself.
INT4_SCALE = 5e-2


@dataclass
class Stage:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    tolerance: str
    passed: bool
    counted: bool = True

    @property
    def status(self) -> str:
        if not self.counted:
            return "INFO"
        return "PASSED" if self.passed else "FAILED"


# -- inputs --------------------------------------------------------------------------------------------------

def default_images(count: int = 3, seed: int = 0):
    """A few test images of different sizes (non-square among them), with structure, not just noise."""
    from PIL import Image

    sizes = [(96, 64), (200, 120), (90, 90), (64, 160)][:count]
    rng = np.random.default_rng(seed)
    images = []
    for w, h in sizes:
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
        noise = rng.integers(0, 64, (h, w, 3))
        images.append(Image.fromarray(((base + noise) % 256).astype(np.uint8)))
    return images


def load_images(paths: list[str]):
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise MergeError(f"--image {path}: no such file")
        try:
            images.append(Image.open(p).convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise MergeError(f"--image {path}: not an image PIL can read ({exc})") from None
    return images


def prepare_inputs(folder: Path, prompt: str, images) -> dict[str, np.ndarray]:
    """Chat template and image processor from the combined folder."""
    from .tokenizer_files import build_inputs, load_preprocessors

    config = json.loads((folder / "config.json").read_text())
    tokenizer, processor = load_preprocessors(folder)
    return build_inputs(tokenizer, processor, prompt, images, config)


# -- reference (PyTorch) --------------------------------------------------------------------------------------

def use_int4_weights_(model, block_size: int, symmetric: bool, shared_table: bool = False) -> int:
    """Give the text decoder's linear layers (and the head) the exact weights the int4 model holds; with
    ``shared_table`` the token embeddings too (a tied int4 model reads them from the head's 4-bit blocks)."""
    import torch

    from .quantize import dequantize_int4, quantize_weight_int4

    def requantized(weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().float().numpy().T  # [in, out] as MatMulNBits sees it
        packed, scales, zero_points = quantize_weight_int4(np.ascontiguousarray(w), block_size, symmetric)
        return torch.from_numpy(dequantize_int4(packed, scales, zero_points, w.shape[0]).T.astype(np.float32))

    count = 0
    with torch.no_grad():
        for module in model.model.language_model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(requantized(module.weight))
                count += 1
        # The head is quantized on its own; an untied (or unshared) embedding table stays fp32.
        model.lm_head.weight = torch.nn.Parameter(requantized(model.lm_head.weight))
        if shared_table:
            model.model.language_model.embed_tokens.weight = model.lm_head.weight
    return count + 1


def torch_reference(model_folder: Path, inputs: dict[str, np.ndarray], new_tokens: int,
                    quantization: dict | None = None) -> dict[str, np.ndarray]:
    """Every stage's reference values from ``Qwen3VLForConditionalGeneration`` in fp32 (with the int4
    folder's own weights when ``quantization`` is given)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(model_folder, dtype=torch.float32).eval()
    if quantization:
        count = use_int4_weights_(model, int(quantization["block_size"]), bool(quantization["symmetric"]),
                                  shared_table=quantization.get("embedding_table") == "int4_blocks")
        log.info("reference: %d linear layers carry the int4 folder's weights", count)
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    has_images = inputs["image_grid_thw"].shape[0] > 0
    ref: dict[str, np.ndarray] = {}
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(t["input_ids"])
        if has_images:
            vision = model.model.visual(t["pixel_values"], grid_thw=t["image_grid_thw"])
            ref["vision/image_embeds"] = vision.pooler_output.numpy()
            ref["vision/deepstack_embeds"] = np.stack([d.numpy() for d in vision.deepstack_features])
            mask = (t["input_ids"] == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, vision.pooler_output)
        ref["inputs_embeds"] = embeds.numpy()
        positions, _ = model.model.get_rope_index(
            t["input_ids"], t["mm_token_type_ids"], t["image_grid_thw"] if has_images else None,
            attention_mask=t["attention_mask"],
        )
        ref["position_ids"] = positions.numpy()
        kwargs = {k: t[k] for k in INPUT_KEYS if has_images or k not in ("pixel_values", "image_grid_thw")}
        ref["prefill_logits"] = model(**kwargs).logits.numpy()
        gen = model.generate(**kwargs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref["tokens"] = gen.sequences[:, inputs["input_ids"].shape[1]:].numpy()
    ref["int4_block_size"] = np.array(int(quantization["block_size"]) if quantization else 0)
    ref["step_logits"] = np.stack([x.numpy() for x in gen.logits[1:]]) if len(gen.logits) > 1 else np.zeros(0)
    return ref


def save_reference(path: Path, inputs: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    arrays = {f"input/{k}": v for k, v in inputs.items()} | {f"ref/{k}": v for k, v in ref.items()}
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_reference(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    if not Path(path).is_file():
        raise MergeError(f"--reference {path}: no such file")
    data = np.load(path)
    inputs = {k[6:]: data[k] for k in data.files if k.startswith("input/")}
    ref = {k[4:]: data[k] for k in data.files if k.startswith("ref/")}
    missing = [k for k in (*INPUT_KEYS, "prefill_logits", "tokens") if k not in inputs and k not in ref]
    if missing:
        raise MergeError(f"--reference {path}: not a verify reference file (missing {missing})")
    return inputs, ref


# -- ONNX side ----------------------------------------------------------------------------------------------

def debug_session(folder: Path):
    """A session over an in-memory copy of the graph whose outputs include the intermediate stages."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    produced = {o for n in model.graph.node for o in n.output}
    missing = [name for name in DEBUG_OUTPUTS if name not in produced]
    if missing:
        raise MergeError(f"{folder}/model.onnx has no value(s) {missing}: not a model built by merge build")
    elem = {"float": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
    for name, kind in DEBUG_OUTPUTS.items():
        out = model.graph.output.add()
        out.name = name
        out.type.tensor_type.elem_type = elem[kind]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_run(folder: Path, inputs: dict[str, np.ndarray], forced: np.ndarray):
    from .runtime import CombinedModel

    model = CombinedModel(folder)
    model.session = debug_session(folder)
    model.output_names = [o.name for o in model.session.get_outputs()]
    return model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                          inputs["image_grid_thw"], max_new_tokens=forced.shape[1], forced_tokens=forced)


# -- comparison ----------------------------------------------------------------------------------------------

def _stage(name, actual, expected, *, mask=None, logits=False, int4=False, exact=False) -> Stage:
    """One stage through the shared comparator; int4 applies to logits only (vision and embeddings stay fp32)."""
    if mask is not None and actual.shape == expected.shape:
        actual, expected = actual[mask], expected[mask]
    c = compare(name, actual, expected, scale=0.0 if exact else INT4_SCALE if int4 else FP32_SCALE)
    top1 = None
    if logits and c.shape_ok:
        top1 = float((actual.argmax(-1) == expected.argmax(-1)).mean())
    tolerance = "exact" if exact else f"{c.bound:.1e}"
    return Stage(name, tuple(actual.shape), c.max_abs, c.max_rel, c.cosine, top1, tolerance, bool(c.passed))


def compare_stages(gen, ref: dict[str, np.ndarray], inputs: dict[str, np.ndarray], precision: str) -> list[Stage]:
    int4 = precision == "int4"
    outs = gen.prefill_outputs
    stages = []
    if inputs["image_grid_thw"].shape[0] > 0:
        stages.append(_stage("vision image_embeds", outs["vision/image_embeds"], ref["vision/image_embeds"]))
        for k in range(ref["vision/deepstack_embeds"].shape[0]):
            stages.append(_stage(f"deepstack level {k}", outs["vision/deepstack_embeds"][k],
                                 ref["vision/deepstack_embeds"][k]))
    stages.append(_stage("merged input embeddings", outs["inputs_embeds"], ref["inputs_embeds"]))
    real = inputs["attention_mask"].astype(bool)
    stages.append(_stage("3-D position ids", outs["position_ids"][:, real], ref["position_ids"][:, real], exact=True))
    stages.append(_stage("prefill logits", gen.prefill_logits, ref["prefill_logits"], mask=real, logits=True,
                         int4=int4))
    for i, step in enumerate(gen.step_logits):
        stages.append(_stage(f"decode step {i + 1} logits", step, ref["step_logits"][i], logits=True, int4=int4))
    agree = float((gen.tokens == ref["tokens"]).mean())
    stages.append(Stage("greedy tokens", tuple(gen.tokens.shape), float(agree < 1), 0.0, float("nan"), agree,
                        "all equal", agree == 1.0, counted=not int4))
    return stages


def format_table(stages: list[Stage]) -> str:
    head = f"{'stage':26} {'shape':>18} {'max_abs':>10} {'max_rel':>10} {'cosine':>10} {'top-1':>7} " \
           f"{'tolerance':>22}  status"
    lines = [head, "-" * len(head)]
    for s in stages:
        top1 = f"{s.top1:7.1%}" if s.top1 is not None else f"{'':7}"
        lines.append(f"{s.name:26} {s.shape!s:>18} {s.max_abs:10.2e} {s.max_rel:10.2e} {s.cosine:10.7f} {top1} "
                     f"{s.tolerance:>22}  {s.status}")
    failed = [s for s in stages if s.counted and not s.passed]
    lines.append(f"FAILED: first failing stage: {failed[0].name}" if failed
                 else f"PASSED: all {sum(s.counted for s in stages)} stages agree")
    return "\n".join(lines)


def verify(folder: Path, *, model_folder: Path | None, prompt: str, images, new_tokens: int,
           reference: Path | None = None, save_to: Path | None = None) -> list[Stage]:
    folder = Path(folder)
    if not (folder / "model.onnx").is_file():
        raise MergeError(f"{folder}: no model.onnx; build one with `python -m merge build --out {folder}`")
    manifest = json.loads((folder / "merge.json").read_text()) if (folder / "merge.json").is_file() else {}
    precision = manifest.get("precision", "fp32")
    quantization = manifest.get("quantization") if precision == "int4" else None
    if precision == "int4" and not quantization:
        raise MergeError(f"{folder}/merge.json: precision int4 but no quantization settings to rebuild the reference")
    if reference is not None:
        inputs, ref = load_reference(reference)
        saved = int(ref.get("int4_block_size", 0))
        wanted = int(quantization["block_size"]) if quantization else 0
        if saved != wanted:
            raise MergeError(
                f"--reference {reference} was made for a {'int4' if saved else 'fp32'} folder, but {folder} is "
                f"{precision}; save a reference against this folder"
            )
    else:
        if model_folder is None:
            raise MergeError("verify needs --model (the PyTorch reference) or --reference (a saved one)")
        inputs = prepare_inputs(folder, prompt, images)
        ref = torch_reference(model_folder, inputs, new_tokens, quantization)
        if save_to is not None:
            save_reference(save_to, inputs, ref)
    gen = onnx_run(folder, inputs, ref["tokens"])
    return compare_stages(gen, ref, inputs, precision)


def report_json(stages: list[Stage]) -> str:
    failed = [s.name for s in stages if s.counted and not s.passed]
    return json.dumps({"passed": not failed, "first_failing_stage": failed[0] if failed else None,
                       "stages": [asdict(s) | {"status": s.status} for s in stages]}, indent=2, default=float)
