"""Tables and plots from runs and studies: ``fvlab fit``'s summary and ``fvlab report``.

- ``fvlab.report.stats``: the seed statistics of :mod:`fvlab.stats` as tables, summary.md/.csv;
- ``fvlab.report.collect``: run directories, TensorBoard curves, Optuna studies;
- ``fvlab.report.plots``: the PNG figures;
- ``fvlab.report.command``: ``fvlab report DIR...``.
"""

from __future__ import annotations

from typing import Sequence

from fvlab.report.stats import VariantStats, aggregate, format_summary, summary_csv_rows, write_summary

__all__ = ["VariantStats", "aggregate", "format_summary", "summary_csv_rows", "write_summary", "report_command"]


def report_command(argv: Sequence[str]) -> int:
    """``fvlab report DIR... [--out DIR] [--storage URL --study-name NAME]``; returns the exit code."""
    from fvlab.report.command import report_command as run

    return run(argv)
