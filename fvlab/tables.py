"""Text formatting shared by every table fvlab writes: interval cells, Markdown tables, CSV text.

Bottom layer: imports nothing else of fvlab and no torch, so the report, the sweep and the CLI
format their tables one way.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

__all__ = ["Format", "interval", "interval_cell", "markdown_table", "csv_text"]

# A format string such as "{:.0f}", or a function from a number to its text.
Format = Union[str, Callable[[Any], str]]


def _apply(fmt: Format, value: Any) -> str:
    return fmt.format(value) if isinstance(fmt, str) else fmt(value)


def interval(lo: Any, hi: Any, fmt: Format = "{:.4g}") -> str:
    """``[lo, hi]``, or ``[n/a]`` when a bound is missing."""
    if lo is None or hi is None:
        return "[n/a]"
    return f"[{_apply(fmt, lo)}, {_apply(fmt, hi)}]"


def interval_cell(value: Any, lo: Any = None, hi: Any = None, fmt: Format = "{:.4g}") -> str:
    """``value [lo, hi]``; the value alone when a bound is missing; ``-`` without a value."""
    if value is None:
        return "-"
    shown = _apply(fmt, value)
    return f"{shown} {interval(lo, hi, fmt)}" if lo is not None and hi is not None else shown


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table padded to line up in a terminal too (a ``|`` inside a cell becomes ``/``)."""
    table = [[str(c) for c in header]] + [[str(c).replace("|", "/") for c in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def csv_text(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> str:
    """CSV with a header row of ``fields``: None is an empty cell, keys outside ``fields`` are left out."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()
