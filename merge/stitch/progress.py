"""Progress bars for long steps (tqdm: shown on a terminal, silent in logs and CI)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def tensor_writing_bar(description: str) -> Iterator:
    """A callback for ``onnx_ir.save``: one tick per tensor written, the tensor's name as the postfix."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=description, unit="tensor", disable=None, leave=False)

    def callback(tensor, info) -> None:
        if bar.total is None:
            bar.total = info.total
        bar.set_postfix_str(str(getattr(tensor, "name", ""))[-48:], refresh=False)
        bar.update(1)

    try:
        yield callback
    finally:
        bar.close()
