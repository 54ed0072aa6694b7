"""A command that needs an optional extra says so in one line, instead of failing on an import deep inside."""

from __future__ import annotations

import importlib.util

from merge.errors import MergeError

BUILD_MODULES = ("torch", "transformers", "safetensors", "onnx", "onnx_ir")
INSPECT_MODULES = ("onnx", "onnx_ir")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules, or a broken parent package
        return False


def require(command: str, modules: tuple[str, ...], extra: str = "build") -> None:
    missing = [m for m in modules if not _installed(m)]
    if missing:
        raise MergeError(f"`merge {command}` needs {', '.join(missing)}, which this installation lacks (the runtime "
                         f"alone runs folders): pip install 'qwen3vl-merge[{extra}]'")
