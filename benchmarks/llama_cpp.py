"""llama.cpp for the side-by-side benchmarks: built from the llama-cpp-python source distribution on PyPI, and the
preset folders converted with its own converter (GGUF f16 or f32, Q4_0, Q4_K_M, and the vision projector in f32 and
f16); ``llama-perplexity``'s KL divergence of a quantized GGUF against its f32 base.

Everything lives under one folder (``--llama-dir``, default ``~/.cache/qwen3vl-merge/llama.cpp``) and is reused
when present. Two things the stock recipe needs here:

- AMX off at compile time (``-mno-amx-*``): llama.cpp's AMX path crashes on these virtual machines (SIGSEGV at
  ``ldtilecfg``), and ``GGML_AMX_*=OFF`` is ignored by native builds;
- the presets' generated tokenizer has a pre-tokenizer hash the converter does not know: a scratch copy of the
  converter maps it to ``qwen2`` (the Qwen2 split regex it uses).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from merge.space import require_free_space

VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp is what gets built
TARGETS = ("llama-bench", "llama-batched-bench", "llama-mtmd-cli", "llama-quantize", "llama-completion",
           "llama-perplexity")
AMX_OFF = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CONVERTER_PACKAGES = ["torch==2.13.0", "transformers>=5,<6", "numpy", "sentencepiece", "safetensors",
                      "protobuf>=4.21,<5", "pillow"]


def default_dir() -> Path:
    return Path(os.environ.get("QWEN3VL_MERGE_CACHE") or Path.home() / ".cache" / "qwen3vl-merge") / "llama.cpp"


def _run(cmd: list[str], log: Path, **kw) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); see {log}")


def source_dir(root: Path) -> Path:
    sdist = root / "sdist"
    tree = sdist / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not tree.is_dir():
        sdist.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={VERSION}", "-d", str(sdist)], root / "build.log")
        with tarfile.open(sdist / f"llama_cpp_python-{VERSION}.tar.gz") as archive:
            archive.extractall(sdist, filter="data")
    return tree.resolve()  # the real path: its .git file is relative, a symlinked path makes ninja loop


# This build's logger is a leaked singleton whose queue is not flushed at exit (common/log.cpp says so): a run whose
# last lines come just before it ends (llama-perplexity's statistics) lost them, exit status 0, in most runs on the
# tiny preset. llama-perplexity's main flushes it before returning, in the scratch source.
PERPLEXITY_END = "    llama_backend_free();\n\n    return 0;\n}"
LOG_FLUSH = "    common_log_flush(common_log_main());  // qwen3vl-merge: print the statistics before exit\n"


def _flush_perplexity_log(src: Path) -> bool:
    """Add the flush to llama-perplexity's source; True when it was added now (the binary must be built again)."""
    path = src / "tools" / "perplexity" / "perplexity.cpp"
    text = path.read_text()
    if LOG_FLUSH in text:
        return False
    if text.count(PERPLEXITY_END) != 1:
        raise RuntimeError(f"{path}: the end of main() is not where the log flush goes; look at the source")
    path.write_text(text.replace(PERPLEXITY_END, LOG_FLUSH + PERPLEXITY_END))
    return True


def ensure_built(root: Path) -> Path:
    """The binaries' folder, building them on first use (about 5 minutes on 2 cores)."""
    root = Path(root)
    bin_dir = root / "build" / "bin"
    src = source_dir(root)
    patched = _flush_perplexity_log(src)
    if all((bin_dir / t).is_file() for t in TARGETS) and not patched:
        return bin_dir
    log = root / "build.log"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src), "-B", str(root / "build"), *generator, "-DCMAKE_BUILD_TYPE=Release",
          "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_SERVER=OFF", f"-DCMAKE_C_FLAGS={AMX_OFF}", f"-DCMAKE_CXX_FLAGS={AMX_OFF}"], log)
    _run(["cmake", "--build", str(root / "build"), "-j", str(os.cpu_count() or 2), "--target", *TARGETS], log)
    return bin_dir


def ensure_converter(root: Path) -> tuple[Path, Path]:
    """(python, convert_hf_to_gguf.py) of a converter that knows the presets' tokenizer."""
    root = Path(root)
    src = source_dir(root)
    venv = root / "venv"
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _run([str(python), "-m", "pip", "install", "--quiet", *CONVERTER_PACKAGES, "-e", str(src / "gguf-py")],
             root / "build.log")
    work = root / "convert"
    script = work / "convert_hf_to_gguf.py"
    if not script.is_file():
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "convert_hf_to_gguf.py", script)
        if (src / "conversion").is_dir():
            shutil.copytree(src / "conversion", work / "conversion", dirs_exist_ok=True)
    return python, script


def _teach_hash(script: Path, log: Path) -> bool:
    """Map the hash the converter just refused (printed on its ``chkhsh:`` line) to qwen2, in the scratch copy."""
    found = re.findall(r"chkhsh:\s*([0-9a-f]{64})", log.read_text(errors="replace"))
    if not found:
        return False
    chkhsh = found[-1]
    for path in [script.parent / "conversion" / "base.py", script]:
        if not path.is_file():
            continue
        text = path.read_text()
        marker = "        res = None\n"
        start = text.find("def get_vocab_base_pre")
        at = text.find(marker, start)
        if start < 0 or at < 0:
            continue
        if chkhsh in text:
            return False
        insert = (f"        if chkhsh == \"{chkhsh}\":  # qwen3vl-merge presets: byte-level BPE, Qwen2 split\n"
                  "            res = \"qwen2\"\n")
        path.write_text(text[: at + len(marker)] + insert + text[at + len(marker):])
        return True
    return False


QUANT_KINDS = ("Q4_0", "Q4_K_M")


def convert(root: Path, model_folder: Path, name: str, kinds: tuple[str, ...] = QUANT_KINDS,
            projector: bool = True) -> dict[str, Path]:
    """GGUF files of a Hugging Face folder: the text model in ``kinds`` and, with ``projector``, the vision projector
    (f32, f16). The 4-bit kinds are quantized from an f16 conversion, removed once they exist (an 8B model's f16
    file alone is 16 GB); with ``"f32"`` among the kinds they are quantized from the f32 conversion instead, which
    is kept (the base a fidelity comparison measures them against)."""
    root = Path(root)
    bin_dir = ensure_built(root)
    python, script = ensure_converter(root)
    out = root / "gguf" / name
    out.mkdir(parents=True, exist_ok=True)
    files = {"f16": out / f"{name}-f16.gguf", "f32": out / f"{name}-f32.gguf", "Q4_0": out / f"{name}-Q4_0.gguf",
             "Q4_K_M": out / f"{name}-Q4_K_M.gguf", "mmproj-f32": out / f"mmproj-{name}-f32.gguf",
             "mmproj-f16": out / f"mmproj-{name}-f16.gguf"}
    base = "f32" if "f32" in kinds else "f16"
    log = out / "convert.log"
    env = {**os.environ, "PYTHONPATH": str(source_dir(root) / "gguf-py")}
    missing = [k for k in kinds if not files[k].is_file()]
    if missing:  # f16 is about the bf16 checkpoint's size, f32 twice that; each 4-bit file about 0.3 of it
        checkpoint = sum(f.stat().st_size for f in Path(model_folder).glob("*.safetensors"))
        what = f"llama.cpp's {'/'.join(missing)} of {name}"
        need = (2 if base == "f32" else 1) * (not files[base].is_file()) + 0.3 * len(set(missing) & set(QUANT_KINDS))
        require_free_space(out, int(checkpoint * need), what)
    jobs = [(base, ["--outtype", base])] if missing else []
    if projector:
        jobs += [("mmproj-f32", ["--mmproj", "--outtype", "f32"]), ("mmproj-f16", ["--mmproj", "--outtype", "f16"])]
    for key, args in jobs:
        if files[key].is_file():
            continue
        command = [str(python), str(script), str(model_folder), *args, "--outfile", str(files[key])]
        try:
            _run(command, log, env=env)
        except RuntimeError:
            if not _teach_hash(script, log):
                raise
            _run(command, log, env=env)
    for kind in missing:
        if kind in QUANT_KINDS:
            _run([str(bin_dir / "llama-quantize"), str(files[base]), str(files[kind]), kind, "2"], log)
    files["f16"].unlink(missing_ok=True)
    return {k: v for k, v in files.items() if v.is_file()}


# -- KL divergence with llama-perplexity ---------------------------------------------------------------------------

def kl_base(bin_dir: Path, gguf: Path, text: Path, base: Path, ctx: int, chunks: int, threads: int) -> dict:
    """``llama-perplexity --kl-divergence-base``: the base model's log-probabilities over ``text`` (chunks of
    ``ctx`` tokens, the second half of each scored) stored in ``base``."""
    from benchmarks import machine

    result = machine.measured_run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c",
                                   str(ctx), "--chunks", str(chunks), "-b", str(ctx), "-t", str(threads),
                                   "--kl-divergence-base", str(base)])
    if result["returncode"] or not base.is_file():
        raise RuntimeError(f"llama-perplexity --kl-divergence-base failed ({result['returncode']}): "
                           f"{(result['stdout'] + result['stderr']).strip().splitlines()[-3:]}")
    return result


KL_LINES = {"kl_mean": r"Mean\s+KLD:\s+(\S+)", "kl_p99": r"99\.0%\s+KLD:\s+(\S+)", "top1": r"Same top p:\s+(\S+)"}


def kl_divergence(bin_dir: Path, gguf: Path, base: Path, ctx: int, threads: int) -> dict:
    """``llama-perplexity --kl-divergence`` of ``gguf`` against ``base``: mean and 99th-percentile KL(base || gguf),
    top-1 agreement ("Same top p") and the positions scored, as it prints them."""
    from benchmarks import machine

    result = machine.measured_run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-c", str(ctx), "-b", str(ctx),
                                   "-t", str(threads), "--kl-divergence-base", str(base), "--kl-divergence"])
    log = result["stdout"] + result["stderr"]
    found = {key: re.search(pattern, log) for key, pattern in KL_LINES.items()}
    if result["returncode"] or not all(found.values()):
        raise RuntimeError(f"llama-perplexity --kl-divergence printed no statistics (exit status "
                           f"{result['returncode']}): {log.strip().splitlines()[-3:]}")
    figures = {key: float(m[1]) + 0.0 for key, m in found.items()}  # + 0.0: its "-0.000000" is 0
    figures["top1"] /= 100
    _, chunks = read_kl_base_header(base)
    figures["positions"] = chunks * (ctx - 1 - ctx // 2)
    figures["seconds"] = result["seconds"]
    return figures


def read_kl_base_header(path: Path) -> tuple[int, int]:
    """(n_ctx, n_chunk) of a ``--kl-divergence-base`` file."""
    import struct

    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise RuntimeError(f"{path}: not a llama-perplexity log-probabilities file")
        n_ctx, _, n_chunk = struct.unpack("<Iii", f.read(12))
    return n_ctx, n_chunk


def read_kl_base(path: Path):
    """The tokens [n_chunk, n_ctx] and the scored positions' log-probabilities [n_chunk * (n_ctx - 1 - n_ctx/2),
    vocab] of a ``--kl-divergence-base`` file (stored as 16 bits per value with a scale and an offset per row)."""
    import struct

    import numpy as np

    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise RuntimeError(f"{path}: not a llama-perplexity log-probabilities file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", f.read(12))
        tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), "<i4").reshape(n_chunk, n_ctx)
        row = 2 * ((n_vocab + 1) // 2) + 4
        rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
        data = f.read(2 * row * rows)
        if len(data) != 2 * row * rows or f.read(1):
            raise RuntimeError(f"{path}: {len(data)} bytes of log-probabilities where {n_chunk} chunks of {n_ctx} "
                               f"tokens hold {2 * row * rows}: an incomplete run")
        raw = np.frombuffer(data, "<u2").reshape(rows, row)
    scale_min = raw[:, :4].copy().view("<f4")  # [rows, 2]: scale, minimum log-probability
    log_probs = raw[:, 4:4 + n_vocab].astype(np.float32) * scale_min[:, :1] + scale_min[:, 1:2]
    return tokens, log_probs


def stored_format(logits):
    """``logits`` [rows, vocab] as ``--kl-divergence-base`` stores a model's: log-probabilities within 16 nats of
    the largest in 16-bit steps, every smaller one raised to the bottom of that window (tools/perplexity's
    ``log_softmax``). PyTorch's logits in this format compare with a stored file like with like: the format alone
    moves a flat distribution over 151,936 tokens by a KL of ~6e-4."""
    import numpy as np

    logits = np.asarray(logits, np.float32)
    top = logits.max(-1, keepdims=True)
    bottom = np.maximum(logits.min(-1, keepdims=True), top - 16)
    log_sum = np.log(np.exp((logits - top).astype(np.float64)).sum(-1, keepdims=True)).astype(np.float32)
    scale = (top - bottom) / 65535
    steps = np.where(logits > bottom, np.rint((logits - bottom) / np.where(scale > 0, scale, 1)), 0)
    return (steps * scale + (bottom - top - log_sum)).astype(np.float32)
