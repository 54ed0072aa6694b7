"""The one table formatter (``verify`` and ``inspect``), and byte counts for people."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from merge.space import format_bytes


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = (),
                 indent: str = "  ") -> list[str]:
    """Lines of a plain-text table: a header, a rule, the rows; columns in ``right`` are right-aligned."""
    rows = [list(r) for r in rows]
    right = set(right)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return (indent + "  ".join(padded)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def human_bytes(count: int | None) -> str:
    return "-" if count is None else format_bytes(count, digits=1)
