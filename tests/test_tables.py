"""fvlab.tables: the one interval cell, Markdown table and CSV text every table of fvlab is written with."""

from __future__ import annotations

import math

from fvlab.tables import csv_text, interval, interval_cell, markdown_table


def test_interval_cell() -> None:
    assert interval_cell(1183.4, 1150.2, 1204.9, "{:.0f}") == "1183 [1150, 1205]"
    assert interval_cell(0.05, None, 0.06) == "0.05"  # a missing bound: the value alone
    assert interval_cell(None, 1.0, 2.0) == "-"
    assert interval_cell(0.62, 0.48, 0.74, lambda v: "n/a" if math.isnan(v) else f"{v:.2f}") == "0.62 [0.48, 0.74]"
    assert interval(-0.001, 0.0256, "{:+.4f}") == "[-0.0010, +0.0256]"
    assert interval(None, 0.1) == "[n/a]"


def test_markdown_table() -> None:
    assert markdown_table(["variant", "acc"], [["ct1", "0.9750"], ["a|b", 1]]).splitlines() == [
        "| variant | acc    |",
        "|---------|--------|",
        "| ct1     | 0.9750 |",
        "| a/b     | 1      |"]  # a | inside a cell would split the row


def test_csv_text() -> None:
    rows = [{"trial": 0, "run": "trial_0000", "extra": "left out"}, {"trial": 1, "run": None}]
    assert csv_text(rows, ["trial", "run"]) == "trial,run\r\n0,trial_0000\r\n1,\r\n"
