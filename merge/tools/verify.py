"""``merge verify``: the same processor output through PyTorch and the combined model, stage by stage.

Stages, in the order data flows: vision ``image_embeds`` and each DeepStack level (then the same for the videos'
rows when the prompt has videos), the merged input
embeddings, the 3-D position ids, prefill logits, each decode step's logits (teacher-forced with the
reference's tokens, so every step compares like with like), and the greedy tokens. An MoE folder with int8
activations runs first and PyTorch takes its expert choices and tokens (see ``INT4_SCALE``); the router logits
are then a stage too. Intermediate stages
come from a *debug copy* of the graph with extra outputs, created in memory; the shipped model is not
touched. The reference can be saved once (``--save-reference``) and reused (``--reference``) without
loading PyTorch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from merge.atomic import atomic_file
from merge.contract.config import ModelConfig
from merge.contract.folder import CombinedFolder
from merge.contract.manifest import BLOCK_LAYOUTS, Manifest
from merge.contract.names import (
    MERGED_INPUTS_EMBEDS,
    MERGED_POSITION_IDS,
    MOE_OPS,
    MOE_ROUTER_INPUT,
    VISION_DEEPSTACK_EMBEDS,
    VISION_IMAGE_EMBEDS,
)
from merge.contract.reading import open_file
from merge.errors import MergeError
from merge.space import nearest_existing

from .compare import FP32_SCALE, compare
from .fidelity import Fidelity, fidelity
from .tables import format_table as table_lines

log = logging.getLogger(__name__)

# Values of the combined graph exposed by the debug copy, with the stage names they feed.
DEBUG_OUTPUTS = {
    VISION_IMAGE_EMBEDS: "float",
    VISION_DEEPSTACK_EMBEDS: "float",
    MERGED_INPUTS_EMBEDS: "float",
    MERGED_POSITION_IDS: "int64",
}
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")  # absent from references saved before videos
# int4 folders are checked against PyTorch carrying the *same* 4-bit weights (dequantized), so the check
# separates graph mistakes from quantization error. What remains is MatMulNBits' int8 activations
# (accuracy_level 4): measured ~1e-2 of the logit scale on the presets; DeepStack or position mistakes move
# logits by the order of the scale itself.
INT4_SCALE = 5e-2
# An MoE folder whose activations are quantized at run time (int4 at accuracy level 4: int8 activations) moves its
# router logits by the activations' rounding, and where the k-th and (k+1)-th experts nearly tie the choice flips: a
# discrete jump in that token's output that no bound on logits can follow (measured at the 30B-A3B shape, 128
# experts top-8 over 48 layers: 13 of 16 prompt positions over the int4 bound against PyTorch's own routing). Its
# reference therefore takes the folder's expert choices (export.reference.ForcedRouting; weighted by PyTorch's own
# router probabilities) and is fed the folder's tokens: both sides then compute the same experts, and the router
# logits and every logits stage are judged at the int4 bound like a dense folder's. That a choice differs from
# PyTorch's own only at near ties follows from the router logits stage: if both sides' logits are within e of each
# other, an expert the folder ranks above PyTorch's k-th is within 2e of it there. How many differ is reported.
# An int8 vision part is checked against PyTorch with the same int8 (7-bit) weights; what remains is the run-time
# uint8 quantization of every product's input (measured on tiny: 2.1% of the vision outputs' scale, 2.1% of the
# logits').
INT8_SCALE = 5e-2
# A float16 KV cache rounds every key and value the attention reads to 11 significant bits (relative error up to
# 2^-11 = 4.9e-4 each, the rest of the decoder in fp32); measured on the tiny presets with fp32 weights: the logits
# within 1.2e-4 to 2.1e-4 of their scale. The bound leaves ~10x: a DeepStack or position mistake moves the logits by
# the order of the scale itself.
FP16_KV_SCALE = 2e-3


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
    fidelity: Fidelity | None = None  # the distributions against a reference's (KL, top-1): vs fp32 rows only

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
    """``--image`` files through the runtime's own loader (RGBA composited onto white there, as in ``run``)."""
    from merge.runtime.images import load_image

    return [load_image(path) for path in paths]


def prepare_inputs(folder: CombinedFolder, prompt: str, images, min_pixels: int | None = None,
                   max_pixels: int | None = None, videos=(), fps: float | None = None,
                   max_frames: int | None = None) -> dict[str, np.ndarray]:
    """The folder's own chat template, tokenizer, image and video processors (the runtime's; tests hold them equal
    to transformers' processor), with the pixel budget and frame sampling given."""
    from merge.runtime.preprocess import Preprocessor

    pre = Preprocessor(folder, folder.config, min_pixels=min_pixels, max_pixels=max_pixels, fps=fps,
                       max_frames=max_frames)
    return pre.build_inputs(prompt, images, videos)


# -- the PyTorch model ---------------------------------------------------------------------------------------------

def known_config(spec: str) -> ModelConfig | None:
    """``--model``'s config when it is known without building or downloading anything: a preset's, or a local
    folder's config.json (None for a hub id: its config comes with the download)."""
    from merge.presets.shapes import PRESETS, preset_config

    if spec in PRESETS:
        return ModelConfig.from_dict(preset_config(spec), f"preset {spec}")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return ModelConfig.from_folder(folder)
    return None


def check_same_model(combined: CombinedFolder, config: ModelConfig, spec: str) -> None:
    """Refuse, before any weight is loaded, a ``--model`` whose shapes or special tokens differ from the folder's
    config.json: PyTorch would fail deep inside (or compare unrelated numbers)."""
    ours = combined.config
    differ = []
    for part, theirs_spec, ours_spec in (("text", config.text, ours.text), ("vision", config.vision, ours.vision)):
        for f in fields(ours_spec):
            theirs_value, ours_value = getattr(theirs_spec, f.name), getattr(ours_spec, f.name)
            if theirs_value != ours_value:
                differ.append(f"{part} {f.name} {theirs_value} vs {ours_value}")
    for key, value in ours.special_token_ids.items():
        if config.special_token_ids.get(key) != value:
            differ.append(f"{key} {config.special_token_ids.get(key)} vs {value}")
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        built_from = combined.manifest.source_model
        raise MergeError(f"--model {spec} is not the model {combined.path} was built from ({built_from}): "
                         f"{', '.join(differ[:3])}{more} (--model vs the folder's config.json)")


# -- reference (PyTorch, saved and loaded) ----------------------------------------------------------------------

MAX_REFERENCE_BYTES = 4 << 30  # a reference holds logits for a few prompts; past this it is not one of ours
# its arrays unpacked: logits barely compress, so a real reference unpacks to about its size on disk; a member
# that unpacks to much more is a zip bomb
MAX_REFERENCE_ARRAY_BYTES = 2 * MAX_REFERENCE_BYTES
REFERENCE_DTYPE_KINDS = "biufU"  # numbers and the precision string; never objects (pickle) or raw records


FP32_KEYS = ("prefill_logits", "tokens")  # what the vs fp32 rows need of the fp32 weights' reference


def save_reference(path: Path, inputs: dict[str, np.ndarray], ref: dict[str, np.ndarray], precision: str,
                   fp32: dict[str, np.ndarray] | None = None) -> None:
    """Inputs and reference; for a quantized folder also the fp32 weights' logits and tokens (``fp32``), so that
    ``--reference`` reports what quantizing cost without PyTorch too."""
    arrays = {f"input/{k}": v for k, v in inputs.items()} | {f"ref/{k}": v for k, v in ref.items()}
    arrays |= {f"fp32/{k}": fp32[k] for k in FP32_KEYS} if fp32 is not None else {}
    arrays["precision"] = np.array(precision)
    with atomic_file(path) as f:  # whole or not at all: Ctrl-C during the seconds of compressing leaves nothing
        np.savez_compressed(f, **arrays)


def load_reference(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str,
                                        dict[str, np.ndarray] | None]:
    """(inputs, reference, precision, the fp32 weights' reference or None) from a file written by
    ``--save-reference``; read without pickle."""
    path = Path(path)
    # a regular file only: a FIFO, socket or device is refused in one line, never waited on
    with open_file(path, f"--reference {path}") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_REFERENCE_BYTES:
            raise MergeError(f"--reference {path}: {size} bytes, larger than any verify reference")
        _check_arrays(path, f)
        f.seek(0)
        try:
            with np.load(f, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError) as exc:  # not a zip, a pickled array, a truncated file
            raise MergeError(f"--reference {path}: not a verify reference file ({exc})") from None
    inputs = {k[6:]: v for k, v in arrays.items() if k.startswith("input/")}
    ref = {k[4:]: v for k, v in arrays.items() if k.startswith("ref/")}
    fp32 = {k[5:]: v for k, v in arrays.items() if k.startswith("fp32/")} or None
    if "pixel_values" in inputs and not all(k in inputs for k in VIDEO_KEYS):
        inputs["pixel_values_videos"] = np.zeros((0, inputs["pixel_values"].shape[-1]), np.float32)
        inputs["video_grid_thw"] = np.zeros((0, 3), np.int64)
    needed = ("prefill_logits", "tokens", "step_logits", "inputs_embeds", "position_ids")
    missing = [k for k in INPUT_KEYS if k not in inputs] + [k for k in needed if k not in ref]
    if missing or "precision" not in arrays:
        raise MergeError(f"--reference {path}: not a verify reference file (missing {missing or ['precision']})")
    ids = inputs["input_ids"]
    checks = {
        "input_ids": ids.ndim == 2 and ids.dtype == np.int64,
        "attention_mask": inputs["attention_mask"].shape == ids.shape,
        "image_grid_thw": inputs["image_grid_thw"].ndim == 2 and inputs["image_grid_thw"].shape[1:] == (3,),
        "pixel_values": inputs["pixel_values"].ndim == 2,
        "video_grid_thw": inputs["video_grid_thw"].ndim == 2 and inputs["video_grid_thw"].shape[1:] == (3,),
        "pixel_values_videos": inputs["pixel_values_videos"].ndim == 2,
        "prefill_logits": ref["prefill_logits"].shape[:2] == ids.shape,
        "tokens": ref["tokens"].ndim == 2 and ref["tokens"].shape[0] == ids.shape[0],
        # one decode step's logits per token after the first
        "step_logits": len(ref["step_logits"]) == ref["tokens"].shape[-1] - 1,
    }
    if "fed_tokens" in ref:  # an MoE folder's: the tokens and expert choices its reference took (see INT4_SCALE)
        fed, choices = ref["fed_tokens"], ref.get("expert_choices", np.zeros(0))
        checks["fed_tokens"] = fed.shape == ref["tokens"].shape and fed.dtype == np.int64
        checks["expert_choices"] = choices.ndim == 3 and choices.shape[1] == ids.size
        checks["step_expert_choices"] = ref.get("step_expert_choices", np.zeros(0)).ndim == 4
        checks["router_logits"] = ref.get("router_logits", np.zeros(0)).shape[:2] == choices.shape[:2]
    if fp32 is not None:  # saved beside a quantized folder's reference: both entries, shaped like the reference's
        logits, tokens = fp32.get("prefill_logits", np.zeros(0)), fp32.get("tokens", np.zeros(0))
        checks["fp32 prefill_logits"] = logits.shape == ref["prefill_logits"].shape
        checks["fp32 tokens"] = tokens.ndim == 2 and tokens.shape[0] == ids.shape[0]
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise MergeError(f"--reference {path}: {', '.join(bad)} {'has' if len(bad) == 1 else 'have'} the wrong "
                         f"shape or type for input_ids {ids.shape}")
    return inputs, ref, str(arrays["precision"]), fp32


def _check_arrays(path: Path, source) -> None:
    """Each array's .npy header inside the zip against the member's unpacked size, and their sum against a bound,
    before anything is unpacked: numpy allocates what a header claims (10**10 elements) before reading a byte."""
    import math
    import zipfile

    from numpy.lib import format as npy

    def refuse(why: str) -> MergeError:
        return MergeError(f"--reference {path}: not a verify reference file ({why})")

    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
            total = sum(m.file_size for m in members)
            if total > MAX_REFERENCE_ARRAY_BYTES:
                raise refuse(f"its arrays unpack to {total} bytes, more than the {MAX_REFERENCE_ARRAY_BYTES} a "
                             "reference may hold")
            for member in members:
                with archive.open(member) as f:
                    if f.read(len(npy.MAGIC_PREFIX)) != npy.MAGIC_PREFIX:
                        continue  # numpy gives such a member as its bytes: counted in the total above
                    f.seek(0)
                    version = npy.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = npy.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = npy.read_array_header_2_0(f)
                    else:
                        raise refuse(f"{member.filename} is a .npy of version {version}")
                    if dtype.kind not in REFERENCE_DTYPE_KINDS or dtype.hasobject:
                        raise refuse(f"{member.filename} holds {dtype}")
                    claimed = math.prod(shape) * dtype.itemsize
                    held = member.file_size - f.tell()
                    if claimed != held:
                        raise refuse(f"{member.filename}'s header claims shape {shape} of {dtype}, {claimed} bytes, "
                                     f"but it holds {held}")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise refuse(str(exc) or type(exc).__name__) from None


# -- ONNX side ----------------------------------------------------------------------------------------------

def debug_graph(folder: CombinedFolder, routers: bool = False) -> tuple[bytes, list[str]]:
    """The folder's graph (as its loader read it) with the intermediate stages as extra outputs, and (``routers``)
    each sparse layer's router logits, the values its experts node reads: (the graph, those values' names in
    layer order)."""
    import onnx

    model = onnx.load_from_string(folder.model_bytes)
    produced = {o for n in model.graph.node for o in n.output}
    missing = [name for name in DEBUG_OUTPUTS if name not in produced]
    if missing:
        raise MergeError(f"{folder.model_path} has no value(s) {missing}: not a model built by merge build")
    router_values = [n.input[MOE_ROUTER_INPUT] for n in model.graph.node if (n.domain, n.op_type) in MOE_OPS] \
        if routers else []
    elem = {"float": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
    for name, kind in (DEBUG_OUTPUTS | dict.fromkeys(router_values, "float")).items():
        out = model.graph.output.add()
        out.name = name
        out.type.tensor_type.elem_type = elem[kind]
    return model.SerializeToString(), router_values


def onnx_run(folder: CombinedFolder, inputs: dict[str, np.ndarray], forced: np.ndarray | None,
             new_tokens: int | None = None, routers: bool = False):
    """(the folder's generation on ``inputs`` through the debug copy, fed ``forced`` tokens (or its own: then
    ``new_tokens`` of them); the names of the router logits every call kept when ``routers``, in layer order)."""
    from merge.runtime import CombinedModel

    graph, values = debug_graph(folder, routers)
    # the whole prompt in one call: the debug outputs (embeddings, positions) then cover all of it
    model = CombinedModel(folder, model_bytes=graph, prefill_chunk=None)
    gen = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                         inputs["image_grid_thw"], max_new_tokens=forced.shape[1] if forced is not None else new_tokens,
                         forced_tokens=forced, pixel_values_videos=inputs.get("pixel_values_videos"),
                         video_grid_thw=inputs.get("video_grid_thw"), keep_outputs=values)
    return gen, values


# -- comparison ----------------------------------------------------------------------------------------------

def _stage(name, actual, expected, *, scale: float, mask=None, logits=False) -> Stage:
    """One stage through the shared comparator (``scale`` 0: exact)."""
    if mask is not None and actual.shape == expected.shape:
        actual, expected = actual[mask], expected[mask]
    c = compare(name, actual, expected, scale=scale)
    top1 = None
    if logits and c.shape_ok:
        top1 = float((actual.argmax(-1) == expected.argmax(-1)).mean())
    tolerance = "exact" if scale == 0 else f"{c.bound:.1e}"
    return Stage(name, tuple(actual.shape), c.max_abs, c.max_rel, c.cosine, top1, tolerance, bool(c.passed))


def compare_stages(gen, ref: dict[str, np.ndarray], inputs: dict[str, np.ndarray], manifest: Manifest, *,
                   routers: list[str] = (), top_k: int = 0, replayed: bool = False) -> list[Stage]:
    """Every stage against the reference. Bounds: fp32 where both sides compute in fp32; the quantized bound
    where the folder quantizes activations at run time (int4 decoder, int8 vision: the reference already carries
    the same weights), for the stages downstream of it. ``routers``: the debug outputs holding each sparse layer's
    router logits, for an MoE folder whose reference took the folder's expert choices (top ``top_k``; see
    :data:`INT4_SCALE`); ``replayed``: that reference was saved earlier (its choices must be this run's)."""
    images = inputs["image_grid_thw"].shape[0] > 0
    videos = "video_grid_thw" in inputs and inputs["video_grid_thw"].shape[0] > 0
    vision_int8 = manifest.vision_precision == "int8" and (images or videos)
    vision_scale = INT8_SCALE if vision_int8 else FP32_SCALE
    logits_scale = INT4_SCALE if manifest.precision == "int4" else vision_scale
    if manifest.kv_cache == "float16":
        logits_scale = max(logits_scale, FP16_KV_SCALE)
    outs = gen.prefill_outputs
    stages = []
    # the vision outputs hold the images' rows, then the videos': one group of stages per modality
    merge_unit = manifest_merge_unit(inputs, outs)
    image_rows = int(inputs["image_grid_thw"].prod(axis=1).sum()) // merge_unit if images else 0
    for kind, rows, present in (("image", slice(0, image_rows), images), ("video", slice(image_rows, None), videos)):
        if not present:
            continue
        prefix = "" if kind == "image" else "video "
        stages.append(_stage(f"vision {kind}_embeds", outs[VISION_IMAGE_EMBEDS][rows], ref[VISION_IMAGE_EMBEDS][rows],
                             scale=vision_scale))
        for k in range(ref[VISION_DEEPSTACK_EMBEDS].shape[0]):
            stages.append(_stage(f"{prefix}deepstack level {k}", outs[VISION_DEEPSTACK_EMBEDS][k][rows],
                                 ref[VISION_DEEPSTACK_EMBEDS][k][rows], scale=vision_scale))
    stages.append(_stage("merged input embeddings", outs[MERGED_INPUTS_EMBEDS], ref["inputs_embeds"],
                         scale=vision_scale))
    real = inputs["attention_mask"].astype(bool)
    stages.append(_stage("3-D position ids", outs[MERGED_POSITION_IDS][:, real], ref["position_ids"][:, real],
                         scale=0.0))
    if routers:
        stages += routing_stages(gen, ref, routers, top_k, real.reshape(-1), logits_scale, replayed)
    stages.append(_stage("prefill logits", gen.prefill_logits, ref["prefill_logits"], mask=real, logits=True,
                         scale=logits_scale))
    for i, step in enumerate(gen.step_logits):
        stages.append(_stage(f"decode step {i + 1} logits", step, ref["step_logits"][i], logits=True,
                             scale=logits_scale))
    agree = float((gen.tokens == ref["tokens"]).mean())
    # greedy tokens are reported, not judged (a near tie may go either way)
    quantized = manifest.precision != "fp32" or vision_int8 or manifest.kv_cache != "float32"
    stages.append(Stage("greedy tokens", tuple(gen.tokens.shape), float(agree < 1), 0.0, float("nan"), agree,
                        "all equal", agree == 1.0, counted=not quantized))
    return stages


def routing_stages(gen, ref: dict[str, np.ndarray], routers: list[str], top_k: int, real: np.ndarray,
                   scale: float, replayed: bool) -> list[Stage]:
    """The router logits of the prompt's call (every sparse layer, the real positions) against the reference's,
    and how many of the folder's expert choices differ from PyTorch's own top k there (reported). A reference
    saved earlier must have taken the choices this run made (else its logits are for other experts)."""
    ours = np.stack([gen.prefill_outputs[name] for name in routers])[:, real]
    theirs = ref["router_logits"][:, real] if ref["router_logits"].shape[:2] == (len(routers), real.size) \
        else ref["router_logits"]
    stages = [_stage(f"router logits ({len(routers)} layers)", ours, theirs, scale=scale)]
    if stages[0].shape != tuple(theirs.shape):
        return stages
    made = folder_choices(gen, routers, top_k)
    chosen = np.sort(made[0][:, real], axis=-1)
    own = np.sort(np.stack([top_k_choices(layer, top_k) for layer in theirs]), axis=-1)
    same = float((chosen == own).all(axis=-1).mean())
    stages.append(Stage("expert choices as PyTorch's own", tuple(chosen.shape[:2]), float(same < 1), 0.0,
                        float("nan"), same, f"top {top_k}; reported", same == 1.0, counted=False))
    if replayed:
        saved = [ref.get(key, np.zeros(0)) for key in ("expert_choices", "step_expert_choices")]
        equal = all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(made, saved, strict=True))
        stages.append(Stage("expert choices as the reference's", tuple(saved[0].shape[:2]), float(not equal), 0.0,
                            float("nan"), float(equal), "exact", equal))
    return stages


def folder_choices(gen, routers: list[str], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The experts the folder chose: the prompt's call [sparse layers, rows, k], and each decode call's [steps,
    sparse layers, batch, k] (QMoE takes the top k of the router logits it is fed: the debug outputs)."""
    prefill = np.stack([top_k_choices(gen.prefill_outputs[name], top_k) for name in routers])
    steps = [np.stack([top_k_choices(out[name], top_k) for name in routers]) for out in gen.step_outputs]
    batch = gen.tokens.shape[0]
    return prefill, (np.stack(steps) if steps else np.zeros((0, len(routers), batch, top_k), np.int64))


def top_k_choices(logits: np.ndarray, k: int) -> np.ndarray:
    """[rows, k] the k largest router logits' experts per row, largest first (ties: the lower index first). Only
    the set matters: the reference weights the chosen experts by its own router probabilities."""
    return np.argsort(-logits, axis=-1, kind="stable")[:, :k]


def manifest_merge_unit(inputs: dict[str, np.ndarray], outs: dict[str, np.ndarray]) -> int:
    """Patches per vision feature row (spatial merge squared), from the call's own patch and feature counts."""
    patches = int(inputs["image_grid_thw"].prod(axis=1).sum())
    if "video_grid_thw" in inputs:
        patches += int(inputs["video_grid_thw"].prod(axis=1).sum())
    rows = outs[VISION_IMAGE_EMBEDS].shape[0]
    return max(patches // rows, 1) if rows else 1


STAGE_COLUMNS = ["stage", "shape", "max_abs", "max_rel", "cosine", "top-1", "tolerance", "status"]


def format_table(stages: list[Stage]) -> str:
    rows = [[s.name, str(s.shape), f"{s.max_abs:.2e}", f"{s.max_rel:.2e}", f"{s.cosine:.7f}",
             f"{s.top1:.1%}" if s.top1 is not None else "", s.tolerance, s.status] for s in stages]
    lines = table_lines(STAGE_COLUMNS, rows, right=range(1, 7), indent="")
    lines += [f"{s.name}: {s.fidelity.line()}" for s in stages if s.fidelity is not None]
    failed = [s for s in stages if s.counted and not s.passed]
    lines.append(f"FAILED: first failing stage: {failed[0].name}" if failed
                 else f"PASSED: all {sum(s.counted for s in stages)} stages agree")
    return "\n".join(lines)


def verify(folder: Path | CombinedFolder, *, model_folder: Path | None, prompt: str, images, new_tokens: int,
           reference: Path | None = None, save_to: Path | None = None, min_pixels: int | None = None,
           max_pixels: int | None = None, videos=(), fps: float | None = None,
           max_frames: int | None = None, stream: bool | None = None) -> list[Stage]:
    """Compare ``folder`` with PyTorch (``model_folder``) or with a saved reference, stage by stage. ``stream``:
    PyTorch reads its weights as modules run (``None``: when the fp32 model would not fit in memory)."""
    combined = folder if isinstance(folder, CombinedFolder) else CombinedFolder.open(folder)
    manifest = combined.manifest
    if save_to is not None:
        check_writable(save_to, combined)
    routed = routed_by_folder(combined)
    top_k = combined.config.text.moe.num_experts_per_tok if routed else 0
    fp32 = gen = None
    if reference is not None:
        inputs, ref, saved, fp32 = load_reference(reference)
        if saved != precision_key(manifest):
            raise MergeError(f"--reference {reference} was made for a {saved} folder, but {folder} is "
                             f"{precision_key(manifest)}; save a reference against this folder")
        if routed and "fed_tokens" not in ref:
            raise MergeError(f"--reference {reference} holds no expert choices: an MoE folder with int8 activations "
                             f"is checked with PyTorch taking its expert choices (saved before verify did so); save "
                             f"a reference against this folder")
    else:
        if model_folder is None:
            raise MergeError("verify needs --model (the PyTorch reference) or --reference (a saved one)")
        if new_tokens < 1:
            raise MergeError(f"--max-new-tokens must be at least 1, got {new_tokens}")
        from export.reference import load_model, torch_reference

        inputs = prepare_inputs(combined, prompt, images, min_pixels, max_pixels, videos, fps, max_frames)
        from merge.sources.checkpoint import Checkpoint

        weights = Checkpoint(model_folder)
        if routed:  # the folder first (its session freed before PyTorch loads): PyTorch takes its expert choices
            gen, routers = onnx_run(combined, inputs, None, new_tokens, routers=True)
        model = load_model(model_folder, manifest.quantization, shared_table=manifest.embedding_table in BLOCK_LAYOUTS,
                           vision_int8=manifest.vision_precision == "int8", stream=stream, weights=weights)
        if routed:  # and its tokens (see INT4_SCALE)
            prefill, steps = folder_choices(gen, routers, top_k)
            calls = [list(prefill), *(list(step) for step in steps)]
            ref = torch_reference(model, inputs, new_tokens, forced_tokens=gen.tokens, routing=calls)
            ref |= {"fed_tokens": gen.tokens, "expert_choices": prefill, "step_expert_choices": steps}
        else:
            ref = torch_reference(model, inputs, new_tokens)
        del model
        if quantized_folder(manifest):  # what quantizing cost: the same call against the fp32 weights
            fp32 = torch_reference(load_model(model_folder, stream=stream, weights=weights), inputs, new_tokens)
        if save_to is not None:
            save_reference(save_to, inputs, ref, precision_key(manifest), fp32)
    if gen is None:
        gen, routers = onnx_run(combined, inputs, ref["fed_tokens"] if routed else ref["tokens"], routers=routed)
    stages = compare_stages(gen, ref, inputs, manifest, routers=routers, top_k=top_k, replayed=reference is not None)
    if fp32 is not None and quantized_folder(manifest):
        stages += against_fp32(gen, fp32, inputs)
    return stages


def routed_by_folder(combined: CombinedFolder) -> bool:
    """An MoE folder whose decoder quantizes its activations at run time: its reference takes the folder's expert
    choices (see :data:`INT4_SCALE`)."""
    quant = combined.manifest.quantization
    return combined.config.is_moe and quant is not None and quant.accuracy_level not in (0, 1)


def quantized_folder(manifest: Manifest) -> bool:
    return manifest.precision != "fp32" or manifest.vision_precision != "fp32"


def against_fp32(gen, fp32: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> list[Stage]:
    """Reported, not judged: a quantized folder against PyTorch with the fp32 weights (the error quantizing the
    weights adds, which the stages above leave out by giving the reference the same quantized weights), with the
    next-token distributions' KL divergence KL(fp32 || folder) and top-1 agreement over the prompt's positions."""
    real = inputs["attention_mask"].astype(bool)
    prefill = _stage("vs fp32: prefill logits", gen.prefill_logits, fp32["prefill_logits"], mask=real, logits=True,
                     scale=INT4_SCALE)
    if gen.prefill_logits.shape == fp32["prefill_logits"].shape:
        prefill.fidelity = fidelity(gen.prefill_logits[real], fp32["prefill_logits"][real])
    steps = min(len(gen.tokens[0]), len(fp32["tokens"][0]))
    agree = float((gen.tokens[:, :steps] == fp32["tokens"][:, :steps]).mean()) if steps else float("nan")
    greedy = Stage("vs fp32: greedy tokens", tuple(gen.tokens.shape), float(agree < 1), 0.0, float("nan"), agree,
                   "reported", agree == 1.0, counted=False)
    return [replace(prefill, tolerance="reported", counted=False), greedy]


def precision_key(manifest: Manifest) -> str:
    """What a saved reference was computed for: the decoder's precision with its quantization scheme (block size,
    zero points, method, 8-bit matrices where they differ from the first int4 scheme, so a reference for one
    scheme is not used for another) and the vision part's precision."""
    vision = "" if manifest.vision_precision == "fp32" else f"+vision-{manifest.vision_precision}"
    return manifest.decoder_scheme + vision


def check_writable(path: Path, combined: CombinedFolder | None = None) -> None:
    """Refuse, before any long work, an output path that cannot be written or is one of the folder's files."""
    import os

    path = Path(path)
    if combined is not None and path.resolve().parent == combined.path.resolve():
        raise MergeError(f"{path}: will not write into the combined folder {combined.path}")
    if path.is_dir():
        raise MergeError(f"{path} is a folder, not a file to write")
    if path.is_symlink():
        raise MergeError(f"{path} is a symbolic link; will not write through it")
    if path.exists() and not os.access(path, os.W_OK):
        raise MergeError(f"{path}: not writable")
    parent = nearest_existing(path.parent)  # the folders to create: the nearest existing one must take them
    if not parent.is_dir():
        raise MergeError(f"{path}: cannot be written ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"{path}: cannot be written (the folder {parent} is not writable)")


def write_report(path: Path, stages: list[Stage]) -> None:
    """``--json``: the report, written whole or not at all."""
    with atomic_file(path) as f:
        f.write((report_json(stages) + "\n").encode())


def report_json(stages: list[Stage]) -> str:
    failed = [s.name for s in stages if s.counted and not s.passed]
    return json.dumps({"passed": not failed, "first_failing_stage": failed[0] if failed else None,
                       "stages": [asdict(s) | {"status": s.status} for s in stages]}, indent=2, default=float)
