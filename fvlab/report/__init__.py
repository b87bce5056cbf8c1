"""Tables and plots from runs and studies: ``fvlab fit``'s summary and ``fvlab report``.

- ``fvlab.report.stats``: seed statistics (mean ± std, paired differences), summary.md/.csv;
- ``fvlab.report.collect``: run directories, TensorBoard curves, Optuna studies;
- ``fvlab.report.plots``: the PNG figures;
- ``fvlab.report.command``: ``fvlab report DIR...``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from fvlab.report.stats import (PairedDifference, VariantStats, aggregate, format_summary,
                                markdown_table, paired_difference, summary_csv_rows, write_summary)

__all__ = ["PairedDifference", "VariantStats", "aggregate", "format_summary", "markdown_table",
           "paired_difference", "summary_csv_rows", "write_summary", "report_command",
           "summary_rows", "format_markdown", "SUMMARY_COLUMNS"]


def report_command(argv: Sequence[str]) -> int:
    """``fvlab report DIR... [--out DIR] [--storage URL --study-name NAME]``; returns the exit code."""
    from fvlab.report.command import report_command as run

    return run(argv)


# ---- one row per run (the table before seeds; kept for callers not yet moved) ----------

SUMMARY_COLUMNS: list[tuple[str, str, str]] = [
    ("variant", "variant", "{}"), ("status", "status", "{}"), ("val/acc1_best", "val/acc1_best", "{:.4f}"),
    ("val/acc1", "val/acc1", "{:.4f}"), ("val/acc5", "val/acc5", "{:.4f}"), ("val/loss", "val/loss", "{:.4f}"),
    ("model/params_m", "params (M)", "{:.3f}"), ("model/gflops", "GFLOPs", "{:.4f}"),
    ("model/throughput", "throughput (img/s)", "{:.1f}"), ("model/latency_ms", "latency (ms)", "{:.2f}"),
    ("epochs", "epochs", "{}"), ("wall_s", "wall (s)", "{:.1f}"), ("error", "error", "{}"),
]


def summary_rows(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run, from metrics.json contents (no seed statistics)."""
    return [{key: result.get(key) for key, _, _ in SUMMARY_COLUMNS} for result in results]


def format_markdown(rows: Sequence[dict[str, Any]],
                    columns: Sequence[tuple[str, str, str]] = SUMMARY_COLUMNS) -> str:
    """A Markdown table of ``summary_rows``; columns with no value in any row are left out."""
    def cell(value: Any, fmt: str) -> str:
        try:
            return "-" if value is None else fmt.format(value)
        except (ValueError, TypeError):
            return str(value)

    used = [c for c in columns if any(row.get(c[0]) is not None for row in rows)]
    return markdown_table([title for _, title, _ in used],
                          [[cell(row.get(key), fmt) for key, _, fmt in used] for row in rows])
