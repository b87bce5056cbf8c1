"""The confirm table (fvlab/sweep/confirm.py): held-out figures, Holm over the whole table, the
reference found by state, no mark without evidence.

Each test builds a real journal study as a sweep leaves it and the confirm runs' metrics.json as
``fit_run`` writes them, so the table is read the way ``fvlab sweep`` and ``fvlab report`` read it.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from fvlab.runs import confirm_dir, trial_dir_name
from fvlab.sweep.confirm import confirmed_rows, confirmed_table

SEEDS = [1, 2, 3]
SPREAD = (-1, 0, 1)  # per-seed differences m - s, m, m + s: t = sqrt(3) m / s with 2 degrees of freedom


def p_value(m: float, s: float) -> float:
    """Two-sided paired-t p-value of the differences m - s, m, m + s, by hand (df 2)."""
    t = math.sqrt(3) * abs(m) / s
    return 1 - t / math.sqrt(2 + t * t)


def new_study(tmp_path: Path, directions: list[str]) -> optuna.Study:
    return optuna.create_study(study_name="confirmed", directions=directions,
                               storage=JournalStorage(JournalFileBackend(str(tmp_path / "study.journal"))))


def add_trial(study: optuna.Study, values: list[float] | None, reference: bool = False, **attrs) -> int:
    """A trial as a sweep worker tells it (values None: FAILED); its number."""
    trial = study.ask()
    trial.set_user_attr("run_name", trial_dir_name(trial.number))
    if reference:
        trial.set_user_attr("reference", True)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    if values is None:
        trial.set_user_attr("fail_reason", "interrupted")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, values)
    return trial.number


def write_confirm(study_dir: Path, number: int, per_seed: dict[str, list[float]]) -> None:
    """Trial ``number``'s confirm runs, one metrics.json per seed of SEEDS."""
    for index, seed in enumerate(SEEDS):
        run_dir = confirm_dir(study_dir, number, seed)
        run_dir.mkdir(parents=True)
        metrics = {"status": "complete", "seed": seed, **{k: v[index] for k, v in per_seed.items()}}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))


def shifted(base: list[float], m: float, s: float) -> list[float]:
    return [b + m + k * s for b, k in zip(base, SPREAD)]


REF_VAL, REF_TEST = [0.80, 0.82, 0.84], [0.78, 0.81, 0.83]


def test_a_confirm_table_with_a_test_split_cites_it_and_marks_only_it(tmp_path: Path) -> None:
    study = new_study(tmp_path, ["maximize", "maximize"])
    ref = add_trial(study, [0.85, 300.0], reference=True, throughput=300.0)
    fast = add_trial(study, [0.90, 200.0], throughput=200.0)
    accurate = add_trial(study, [0.95, 100.0], throughput=100.0)
    write_confirm(tmp_path, ref, {"val/acc1_best": REF_VAL, "test/acc1": REF_TEST})
    # fast: the same +0.01 on every seed's test accuracy (no spread: nothing to test), val +0.05.
    write_confirm(tmp_path, fast, {"val/acc1_best": shifted(REF_VAL, 0.05, 0.002),
                                   "test/acc1": [t + 0.01 for t in REF_TEST]})
    # accurate: +0.05 on val and on test, both with a small spread (p about 0.0005).
    write_confirm(tmp_path, accurate, {"val/acc1_best": shifted(REF_VAL, 0.05, 0.002),
                                       "test/acc1": shifted(REF_TEST, 0.05, 0.002)})
    rows = {row["trial"]: row for row in confirmed_rows(study, ["val/acc1_best", "model/throughput"], SEEDS, tmp_path)}
    assert list(rows) == ["0 (reference)", "1", "2"]
    values = shifted(REF_TEST, 0.05, 0.002)
    assert rows["2"]["test/acc1"] == f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"
    assert rows["2"]["Δ test/acc1"].startswith("+0.0500 [") and rows["2"]["Δ test/acc1"].endswith("] * (n=3)")
    # The val figures stay beside, with their interval, but unmarked: val chose these trials.
    assert rows["2"]["Δ val/acc1_best"].startswith("+0.0500 [") and "*" not in rows["2"]["Δ val/acc1_best"]
    assert rows["1"]["Δ test/acc1"] == "+0.0100 [n/a] (n=3)"  # equal differences: no interval, no mark
    assert rows["0 (reference)"]["Δ test/acc1"] == "reference"
    assert {row["on the front of the test means"] for row in rows.values()} == {"yes"}
    text = confirmed_table(study, ["val/acc1_best", "model/throughput"], SEEDS, tmp_path)
    # The family: trial 2's test Δ (trial 1's has no p-value).
    assert "Cite the held-out columns (test/acc1" in text and "the validation split chose these trials" in text
    assert "Holm's step-down over the 1 comparison of this table (the test-split Δ)" in text
    assert "never p = 0" in text


def test_holm_runs_over_two_objectives_and_three_trials_by_hand(tmp_path: Path) -> None:
    """No test split: the marks are on the selection split, one Holm family of 2 x 3 comparisons."""
    study = new_study(tmp_path, ["maximize", "minimize"])
    ref = add_trial(study, [0.60, 0.05], reference=True)
    members = [add_trial(study, [0.9, 0.3]), add_trial(study, [0.8, 0.2]), add_trial(study, [0.7, 0.1])]
    ref_loss = [0.30, 0.32, 0.31]
    write_confirm(tmp_path, ref, {"val/acc1_best": REF_VAL, "val/loss": ref_loss})
    shifts = {  # trial -> (accuracy m, s), (loss m, s)
        members[0]: ((0.05, 0.002), (-0.05, 0.006)),
        members[1]: ((0.04, 0.008), (-0.03, 0.010)),
        members[2]: ((0.02, 0.020), (-0.01, 0.010))}
    for number, (acc, loss) in shifts.items():
        write_confirm(tmp_path, number, {"val/acc1_best": shifted(REF_VAL, *acc),
                                         "val/loss": shifted(ref_loss, *loss)})
    p = {(n, metric): p_value(*shift) for n, pair in shifts.items()
         for metric, shift in zip(("val/acc1_best", "val/loss"), pair)}
    # By hand, smallest first: .00053 <= .05/6 and .0048 <= .05/5 reject; .0131 > .05/4 stops.
    order = sorted(p, key=p.get)
    assert order[:3] == [(members[0], "val/acc1_best"), (members[0], "val/loss"), (members[1], "val/acc1_best")]
    assert p[order[0]] <= 0.05 / 6 and p[order[1]] <= 0.05 / 5 and 0.05 / 4 < p[order[2]] <= 0.05 / 2
    # (Holm within the accuracy column alone, a family of 3, would also mark trial 2's .0131.)
    rows = {row["trial"]: row for row in confirmed_rows(study, ["val/acc1_best", "val/loss"], SEEDS, tmp_path)}
    marked = {(int(t.split()[0]), m) for t, row in rows.items() for m in ("val/acc1_best", "val/loss")
              if "*" in row.get(f"Δ {m}", "")}
    assert marked == {(members[0], "val/acc1_best"), (members[0], "val/loss")}
    assert all(row["Δ val/acc1_best"].startswith("+") for t, row in rows.items() if "reference" not in t)
    text = confirmed_table(study, ["val/acc1_best", "val/loss"], SEEDS, tmp_path)
    assert "no test split, so Δ and its marks are on the selection split" in text
    assert "Holm's step-down over the 6 comparisons of this table" in text


def test_a_retried_reference_keeps_its_delta_and_its_label(tmp_path: Path) -> None:
    study = new_study(tmp_path, ["maximize", "maximize"])
    failed = add_trial(study, None, reference=True)  # Ctrl-C during trial 0: FAILED, queued again
    retry = add_trial(study, [0.85, 300.0], reference=True, throughput=300.0)
    member = add_trial(study, [0.95, 100.0], throughput=100.0)
    write_confirm(tmp_path, retry, {"val/acc1_best": REF_VAL})
    write_confirm(tmp_path, member, {"val/acc1_best": shifted(REF_VAL, 0.05, 0.01)})
    rows = {row["trial"]: row for row in confirmed_rows(study, ["val/acc1_best", "model/throughput"], SEEDS, tmp_path)}
    assert str(failed) not in rows and f"{retry} (reference)" in rows
    assert rows[f"{retry} (reference)"]["Δ val/acc1_best"] == "reference"
    assert rows[str(member)]["Δ val/acc1_best"].startswith("+0.0500 [")


def test_supernet_tau_is_taken_against_the_stand_alone_test_figures(tmp_path: Path) -> None:
    from scipy.stats import kendalltau

    study = new_study(tmp_path, ["maximize", "minimize"])
    study.set_user_attr("fvlab_spec", {"supernet": {"epochs": 1}})
    supernet = [0.50, 0.60, 0.55, 0.70, 0.80]
    val = [0.61, 0.70, 0.72, 0.75, 0.90]  # ranks like the supernet but for one swap
    test = [0.90, 0.75, 0.72, 0.70, 0.61]  # the reverse order
    for number, accuracy in enumerate(supernet):
        add_trial(study, [accuracy, 1.0 + accuracy], val_acc1_best=accuracy)
        write_confirm(tmp_path, number, {"val/acc1_best": [val[number]] * 3, "test/acc1": [test[number]] * 3})
    text = confirmed_table(study, ["val/acc1_best", "model/params_m"], SEEDS, tmp_path)
    tau = kendalltau(supernet, test).statistic
    assert tau < 0 and "and the stand-alone test/acc1 (mean over the confirm seeds; the test split" in text
    assert f"over 5 confirmed trials: τ = {tau:.2f}" in text
    assert pytest.approx(kendalltau(supernet, val).statistic) != tau
