"""Comparison tables of runs: one row per variant (or trial), written as Markdown and CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["SUMMARY_COLUMNS", "summary_rows", "format_markdown", "write_summary"]

# (metrics.json key, column title, format)
SUMMARY_COLUMNS: list[tuple[str, str, str]] = [
    ("variant", "variant", "{}"),
    ("status", "status", "{}"),
    ("val/acc1_best", "val/acc1_best", "{:.4f}"),
    ("val/acc1", "val/acc1", "{:.4f}"),
    ("val/acc5", "val/acc5", "{:.4f}"),
    ("val/loss", "val/loss", "{:.4f}"),
    ("model/params_m", "params (M)", "{:.3f}"),
    ("model/gflops", "GFLOPs", "{:.4f}"),
    ("model/throughput", "throughput (img/s)", "{:.1f}"),
    ("model/latency_ms", "latency (ms)", "{:.2f}"),
    ("epochs", "epochs", "{}"),
    ("wall_s", "wall (s)", "{:.1f}"),
    ("error", "error", "{}"),
]


def summary_rows(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the comparison table, from metrics.json contents."""
    return [{key: result.get(key) for key, _, _ in SUMMARY_COLUMNS} for result in results]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] = SUMMARY_COLUMNS) -> str:
    """A Markdown table; columns with no value in any row are left out."""
    used = [c for c in columns if any(row.get(c[0]) is not None for row in rows)]
    table = [[title for _, title, _ in used]]
    table += [[_cell(row.get(key), fmt).replace("|", "/") for key, _, fmt in used] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(used))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_summary(directory: Path, rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """Write summary.md and summary.csv into ``directory``; returns the Markdown table."""
    directory.mkdir(parents=True, exist_ok=True)
    table = format_markdown(rows)
    (directory / "summary.md").write_text((f"# {title}\n\n" if title else "") + table + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[key for key, _, _ in SUMMARY_COLUMNS])
    writer.writeheader()
    writer.writerows(rows)
    (directory / "summary.csv").write_text(buffer.getvalue())
    return table
