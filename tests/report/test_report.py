"""Seed statistics (mean ± std, paired intervals), summary.md/.csv, and `fvlab report`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fvlab.report import aggregate, write_summary
from fvlab.stats import holm, paired_difference

pytestmark = pytest.mark.filterwarnings("ignore")

# Student-t quantiles t(0.975, df), from a printed table (not computed the way the code does).
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463}
MODEL = {"model/params_m": 2.5, "model/gflops": 0.1, "model/throughput": 700.0, "model/latency_ms": 4.4,
         "precision": "32-true"}


def run(variant: str, seed: int, acc: float | None = None, status: str = "complete", **extra) -> dict:
    result = {"experiment": "ablate", "variant": variant, "seed": seed, "status": status, **extra}
    if acc is not None:
        result.update({"val/acc1_best": acc, "val/acc1": acc - 0.01, "val/loss": 1.0 - acc, **MODEL})
    return result


def seeded_results() -> list[dict]:
    """Four seeds; c lost seed 3 to a NaN; d never ran seed 2 and seed 3 is still to run."""
    return [
        *(run("ref", s, a) for s, a in enumerate([0.80, 0.84, 0.82, 0.86])),
        *(run("b", s, a) for s, a in enumerate([0.86, 0.85, 0.90, 0.87])),
        *(run("c", s, a) for s, a in enumerate([0.90, 0.95, 0.91])),
        run("c", 3, status="failed", error="FloatingPointError: loss is nan"),
        run("d", 0, 0.70), run("d", 1, 0.75), run("d", 3, status="not run"),
    ]


def test_mean_sample_std_and_paired_intervals_match_hand_computation() -> None:
    variants = {v.variant: v for v in aggregate(seeded_results(), reference="ref")}
    ref, b, c, d = variants["ref"], variants["b"], variants["c"], variants["d"]
    assert ref.is_reference and ref.difference is None
    # ref: mean 0.83; deviations -.03 .01 -.01 .03 -> sum of squares .002 / 3
    assert ref.mean["val/acc1_best"] == pytest.approx(0.83)
    assert ref.std["val/acc1_best"] == pytest.approx(math.sqrt(0.002 / 3))
    assert ref.mean["val/loss"] == pytest.approx(0.17)
    # c: seeds 0-2 only (seed 3 failed): mean .92, deviations -.02 .03 -.01 -> .0014 / 2
    assert c.n == 3 and c.mean["val/acc1_best"] == pytest.approx(0.92)
    assert c.std["val/acc1_best"] == pytest.approx(math.sqrt(0.0007))
    assert [r["seed"] for r in c.failed] == [3]
    # b - ref per seed: .06 .01 .08 .01 -> mean .04, sd sqrt(.0038/3), t(3) -> not significant
    sd = math.sqrt(0.0038 / 3)
    half = T975[3] * sd / 2
    assert b.difference.n == 4 and b.difference.mean == pytest.approx(0.04)
    assert (b.difference.low, b.difference.high) == pytest.approx((0.04 - half, 0.04 + half), abs=1e-6)
    assert not b.difference.excludes_zero
    # c - ref over the seeds both completed (0, 1, 2): .10 .11 .09 -> sd .01, t(2)
    half = T975[2] * 0.01 / math.sqrt(3)
    assert c.difference.seeds == [0, 1, 2]
    assert (c.difference.low, c.difference.high) == pytest.approx((0.10 - half, 0.10 + half), abs=1e-6)
    assert c.difference.excludes_zero
    # d - ref: -.10 -.09 -> mean -.095, sd sqrt(.00005), t(1)
    half = T975[1] * math.sqrt(0.00005) / math.sqrt(2)
    assert (d.difference.low, d.difference.high) == pytest.approx((-0.095 - half, -0.095 + half), abs=1e-6)
    assert d.difference.excludes_zero and d.n == 2 and d.missing_seeds == [2, 3]
    assert d.seeds_cell() == "2/4 (2 missing)" and c.seeds_cell() == "3/4 (1 failed)"
    assert d.model["model/throughput"] == 700.0 and d.precision == "32-true"


def test_paired_difference_pairs_by_seed_not_by_position() -> None:
    diff = paired_difference({1: 0.9, 2: 0.8, 5: 0.7}, {2: 0.7, 1: 0.6, 9: 0.1}, "ref")
    assert diff.seeds == [1, 2] and diff.mean == pytest.approx(0.2)
    # .9-.6 = .3 and .8-.7 = .1: sd sqrt(.02)
    assert diff.low == pytest.approx(0.2 - T975[1] * math.sqrt(0.02) / math.sqrt(2), abs=1e-6)


def test_write_summary_table_notes_and_csv(tmp_path: Path) -> None:
    text = write_summary(tmp_path, seeded_results(), title="ablate", reference="ref",
                         variant_order=["ref", "b", "c", "d"])
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:5]] == ["variant", "seeds", "val/acc1_best",
                                                             "Δ vs ref [95% CI]"]
    c_row = next(line for line in lines if line.startswith("| c "))
    low, high = 0.10 - T975[2] * 0.01 / math.sqrt(3), 0.10 + T975[2] * 0.01 / math.sqrt(3)
    assert "0.9200 ± 0.0265" in c_row and f"+0.1000 [{low:+.4f}, {high:+.4f}] *" in c_row
    b_row = next(line for line in lines if line.startswith("| b "))
    assert "+0.0400 [" in b_row and "] *" not in b_row
    assert "reference" in next(line for line in lines if line.startswith("| ref "))
    # Holm's family: b and c (d pairs 2 seeds, too few for a mark); the legend names its size.
    assert any(line.startswith("± is the sample standard deviation") and "* marks a difference that "
               "Holm's step-down over the 2 comparisons of this table that can carry a mark" in line
               and "A mark needs at least 3 pairs" in line and "unadjusted 95%" in line for line in lines)
    d_row = next(line for line in lines if line.startswith("| d "))
    assert "] *" not in d_row and "no mark possible: d pairs 2 seeds with the reference" in text
    assert "failed: c seed 3: FloatingPointError: loss is nan (left out of the statistics)" in lines
    assert "missing: d seed 2 (not run yet)" in lines and "missing: d seed 3 (not run yet)" in lines
    assert (tmp_path / "summary.md").read_text().startswith("# ablate\n\n| variant")
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    runs = [r for r in rows if r["kind"] == "run"]
    means = {r["variant"]: r for r in rows if r["kind"] == "mean"}
    assert len(runs) == 15 and list(means) == ["ref", "b", "c", "d"]
    assert float(means["c"]["val/acc1_best"]) == pytest.approx(0.92)
    assert float(means["c"]["val/acc1_best_std"]) == pytest.approx(math.sqrt(0.0007))
    assert means["c"]["n_complete"] == "3" and means["c"]["n_failed"] == "1"
    assert means["d"]["n_missing"] == "2" and means["c"]["delta_excludes_zero"] == "True"
    assert float(means["b"]["delta_ci_low"]) == pytest.approx(0.04 - T975[3] * math.sqrt(0.0038 / 3) / 2)


def test_one_seed_has_no_interval_and_still_prints(tmp_path: Path) -> None:
    text = write_summary(tmp_path, [run("no_carrier", 0, 0.95), run("ct1", 0, 0.97)])
    ct1 = next(line for line in text.splitlines() if line.startswith("| ct1 "))
    assert "+0.0200 [n/a]" in ct1 and "0.9700 ± n/a" in ct1 and "pair" not in ct1
    assert "n/a: fewer than two seeds completed in both ct1 and the reference" in text


def test_paired_t_p_values_by_hand() -> None:
    # df 2: two-sided p = 1 - t / sqrt(2 + t^2); diffs .10 .11 .09 -> t = .1 / (.01 / sqrt 3) = sqrt 300
    diff = paired_difference({0: 0.90, 1: 0.95, 2: 0.91}, {0: 0.80, 1: 0.84, 2: 0.82})
    assert diff.p_value == pytest.approx(1 - math.sqrt(300 / 302), rel=1e-6)
    # df 1: p = 1 - (2 / pi) atan|t|; diffs .10 .11 -> t = .105 / (sqrt(.00005) / sqrt 2) = 21
    assert paired_difference({0: 0.9, 1: 0.95}, {0: 0.8, 1: 0.84}).p_value == \
        pytest.approx(1 - 2 / math.pi * math.atan(21), rel=1e-6)
    # The same Δ on every seed: no spread to test, so no p-value and no interval (never p = 0) ...
    for same in (paired_difference({0: 0.75, 1: 0.5}, {0: 0.5, 1: 0.25}),
                 paired_difference({0: 0.75, 1: 0.5}, {0: 0.75, 1: 0.5}),
                 # ... also when they differ in the last bit: 1/270 twice, p was 1e-14.
                 paired_difference({1: 251 / 270, 2: 247 / 270}, {1: 250 / 270, 2: 246 / 270}),
                 paired_difference({1: 251 / 270, 2: 247 / 270, 3: 200 / 270}, {1: 250 / 270, 2: 246 / 270, 3: 199 / 270})):
        assert same.equal and same.p_value is None and same.low is None and not same.can_mark
    assert paired_difference({0: 0.9}, {0: 0.8}).p_value is None
    # Two pairs have a p-value but never carry a mark.
    assert not paired_difference({0: 0.9, 1: 0.95}, {0: 0.8, 1: 0.84}).can_mark and diff.can_mark
    # Holm at 0.05 over 3: sorted .01 < .05/3 rejects, .03 > .05/2 stops (unadjusted, all three would).
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]
    # None is no comparison: over 2, .02 < .05/2 and .04 < .05 both reject (over 3 neither would).
    assert holm([0.02, None, 0.04]) == [True, False, True]
    assert holm([]) == [] and holm([None]) == [False] and holm([0.06, 0.001], alpha=0.1) == [True, True]


def test_summary_marks_by_holm_over_the_tables_comparisons(tmp_path: Path) -> None:
    ref = [0.80, 0.82, 0.84]
    # Per-seed differences m - s, m, m + s: t = sqrt(3) m / s, df 2, p = 1 - t / sqrt(2 + t^2).
    shifts = {"a": (0.10, 0.010), "b": (0.05, 0.018), "c": (0.05, 0.017)}
    results = [run("ref", s, a) for s, a in enumerate(ref)]
    for name, (m, sd) in shifts.items():
        results += [run(name, s, a + m + k * sd) for s, (a, k) in enumerate(zip(ref, (-1, 0, 1)))]
    p = {name: 1 - (t := math.sqrt(3) * m / sd) / math.sqrt(2 + t * t) for name, (m, sd) in shifts.items()}
    assert p["a"] < 0.05 / 3 and 0.05 / 2 < p["c"] < p["b"] < 0.05  # .0033, .0364, .0406
    text = write_summary(tmp_path, results, reference="ref", variant_order=["ref", "a", "b", "c"])
    variants = {v.variant: v for v in aggregate(results, reference="ref")}
    rows = {name: next(line for line in text.splitlines() if line.startswith(f"| {name} ")) for name in shifts}
    for name in shifts:
        assert variants[name].difference.p_value == pytest.approx(p[name], rel=1e-4)
        assert variants[name].difference.low > 0  # every unadjusted interval excludes zero ...
    assert "] *" in rows["a"] and "] *" not in rows["b"] and "] *" not in rows["c"]  # ... Holm keeps one
    assert "Holm" in text and "unadjusted" in text
    means = {r["variant"]: r for r in csv.DictReader((tmp_path / "summary.csv").open()) if r["kind"] == "mean"}
    assert [means[n]["delta_significant"] for n in shifts] == ["True", "False", "False"]
    assert float(means["b"]["delta_p_value"]) == pytest.approx(p["b"], rel=1e-4)


def test_missing_seed_shows_the_pair_count_and_one_seed_prints_na(tmp_path: Path) -> None:
    results = [*(run("ref", s, a) for s, a in enumerate([0.80, 0.82, 0.84])),
               *(run("full", s, a) for s, a in enumerate([0.85, 0.88, 0.89])),
               run("gap", 0, 0.90), run("gap", 1, 0.93), run("gap", 2, status="failed", error="boom"),
               run("lone", 0, 0.90)]
    text = write_summary(tmp_path, results, reference="ref", variant_order=["ref", "full", "gap", "lone"])
    row = {name: next(line for line in text.splitlines() if line.startswith(f"| {name} "))
           for name in ("ref", "full", "gap", "lone")}
    # gap's mean is over seeds 0, 1 (0.9150) and ref's over 0-2 (0.8200): Δ pairs seeds 0, 1 only.
    assert "0.9150 ± " in row["gap"] and "+0.1050 [" in row["gap"] and "(n=2 pairs)" in row["gap"]
    assert "pairs)" not in row["full"] and "pair" not in row["ref"]
    assert "0.9000 ± n/a" in row["lone"] and "+0.1000 [n/a] (n=1 pair)" in row["lone"]


# ---- fvlab report ----------------------------------------------------------------------

PNG_SIZE = (880, 550)  # plots.FIGSIZE x plots.DPI


def write_run(run_dir: Path, metrics: dict | None, arch: dict, curve: list[float] = ()) -> Path:
    """A run directory as `fvlab fit` leaves it: config.yaml, metrics.json, TensorBoard events."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir.mkdir(parents=True)
    config = {"name": "ablate", "variant": run_dir.parent.name if run_dir.name.startswith("seed_")
              else run_dir.name, "model": {"arch": {"name": "fastervit_tiny", "window_size": None, **arch}}}
    (run_dir / "config.yaml").write_text("# fvlab: resolved config\n" + json.dumps(config))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    writer = SummaryWriter(str(run_dir))
    for epoch, value in enumerate(curve):  # as Lightning logs them: the epoch scalar at the same step
        writer.add_scalar("val/acc1", value, global_step=10 * epoch + 9)
        writer.add_scalar("epoch", epoch, global_step=10 * epoch + 9)
    if curve and metrics is None:
        writer.add_scalar("model/throughput", 650.0, global_step=0)
    writer.close()
    return run_dir


def hand_built_experiment(root: Path) -> Path:
    """ref and ct4 over seeds 0-2 (ct4's seed 2 failed), slow (dominated), and a running variant."""
    exp = root / "ablate"
    accs = {"ref": [0.80, 0.84, 0.82], "ct4": [0.90, 0.95, None], "slow": [0.70, 0.72, 0.74]}
    speeds = {"ref": 700.0, "ct4": 500.0, "slow": 400.0}
    for variant, values in accs.items():
        for seed, acc in enumerate(values):
            metrics = run(variant, seed, acc) if acc is not None else \
                run(variant, seed, status="failed", error="FloatingPointError: loss is nan")
            metrics.update({"model/throughput": speeds[variant], "epochs": 2, "wall_s": 5.0})
            write_run(exp / variant / f"seed_{seed}", metrics,
                      {"ct_size": 4 if variant == "ct4" else None, "hat": variant != "slow"},
                      [0.5, acc or 0.4])
    write_run(exp / "running" / "seed_0", None, {"ct_size": 1, "hat": True}, [0.3, 0.6, 0.65])
    return exp


def test_report_of_hand_built_runs(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from fvlab.cli import main

    exp = hand_built_experiment(tmp_path)
    assert main(["report", str(exp)]) == 0
    out = capsys.readouterr().out
    md = (exp / "report" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in md.splitlines() if line.startswith("| ") and not line.startswith("| variant")}
    header = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| variant")).split("|")[1:-1]]
    assert header[:4] == ["variant", "ct_size", "hat", "seeds"]  # window_size is the same everywhere
    cell = lambda variant, column: rows[variant][header.index(column)]  # noqa: E731
    assert cell("ref", "ct_size") == "1" and cell("ct4", "ct_size") == "4" and cell("slow", "hat") == "false"
    assert cell("ref", "val/acc1_best") == f"0.8200 ± {math.sqrt(0.0008 / 2):.4f}"
    assert cell("ct4", "val/acc1_best") == f"0.9250 ± {math.sqrt(0.00125):.4f}"
    assert cell("ct4", "seeds") == "2/3 (1 failed)"
    # ct4 - ref over seeds 0, 1: .10 and .11 -> mean .105, sd sqrt(.00005), t(1); ref's mean has 3 seeds.
    # Two pairs carry no mark, so Holm's family is slow alone (p .013 < .05): marked.
    half = T975[1] * math.sqrt(0.00005) / math.sqrt(2)
    assert cell("ct4", "Δ vs ref [95% CI]") == f"+0.1050 [{0.105 - half:+.4f}, {0.105 + half:+.4f}] (n=2 pairs)"
    assert cell("slow", "Δ vs ref [95% CI]").endswith("] *")
    assert "Holm's step-down over the 1 comparison of this table" in md
    # Pareto (accuracy against throughput): ref is fastest, ct4 most accurate, slow loses on both.
    assert (cell("ref", "Pareto"), cell("ct4", "Pareto"), cell("slow", "Pareto")) == ("yes", "yes", "")
    assert cell("running (running)", "val/acc1_best") == "0.6500 ± n/a"
    assert cell("running (running)", "seeds") == "0/3 (1 running, 2 missing)"
    assert "failed: ct4 seed 2: FloatingPointError: loss is nan (left out of the statistics)" in md
    assert "running: running seed 0 (its latest figures are shown)" in md
    assert "| ct4 " in out and "report.md" in out
    for name in ("accuracy_vs_throughput", "accuracy_vs_gflops", "val_acc1_per_epoch"):
        assert f"]({name}.png)" in md
        with Image.open(exp / "report" / f"{name}.png") as image:
            assert image.size == PNG_SIZE
    means = {r["variant"]: r for r in csv.DictReader((exp / "report" / "report.csv").open()) if r["kind"] == "mean"}
    assert float(means["slow"]["val/acc1_best"]) == pytest.approx(0.72) and means["slow"]["pareto"] == "False"


def test_report_of_several_experiments_is_one_table(tmp_path: Path, capsys) -> None:
    from fvlab.cli import main

    runs = tmp_path / "runs"
    hand_built_experiment(runs)
    other = runs / "window"
    for seed in (0, 1):
        write_run(other / "w2" / f"seed_{seed}", {**run("w2", seed, 0.6 + seed / 10), "experiment": "window"},
                  {"window_size": 2})
    assert main(["report", str(runs / "ablate"), str(other)]) == 0
    md = (runs / "report" / "report.md").read_text()  # the directories' common parent
    assert "| ablate/ct4 " in md and "| window/w2 " in md and "Δ vs reference [95% CI]" in md
    assert "| window/w2 " in capsys.readouterr().out


@pytest.mark.parametrize("make", ["empty", "missing", "unrelated", "file"])
def test_report_of_nothing_is_bad_input(tmp_path: Path, capsys, make: str) -> None:
    from fvlab.cli import main

    target = tmp_path / "runs"
    if make == "empty":
        target.mkdir()
    elif make == "unrelated":
        (target / "notes").mkdir(parents=True)
        (target / "notes" / "a.txt").write_text("hello")
    elif make == "file":
        target.write_text("x")
    before = sorted(tmp_path.rglob("*"))
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fvlab report: error:") and "study.journal" in err and "metrics.json" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def make_study(study_dir: Path):
    """A real journal study as `fvlab sweep` leaves it: trials with user_attrs and run directories."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir.mkdir(parents=True)
    storage = JournalStorage(JournalFileBackend(str(study_dir / "study.journal")))
    study = optuna.create_study(study_name="hat_search", storage=storage, directions=["maximize", "maximize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(["val/acc1_best", "model/throughput"])
    space = {"model.arch.ct_size": optuna.distributions.CategoricalDistribution([0, 1, 2]),
             "model.arch.window_size": optuna.distributions.CategoricalDistribution([2, 4])}
    table = [(0.90, 800.0, 0.2, "complete"), (0.93, 600.0, 0.3, "complete"), (0.85, 900.0, 0.1, "complete"),
             (0.80, 500.0, 0.4, "complete"), (0.95, 300.0, 0.9, "infeasible"), (None, 700.0, 0.2, "pruned"),
             (None, None, None, "failed"), (None, 200.0, 0.8, "infeasible")]
    for acc, speed, gflops, state in table:
        trial = study.ask(space)
        run_dir = study_dir / f"trial_{trial.number:04d}"
        metrics = {"experiment": "hat_search", "variant": run_dir.name, "seed": 0, "epochs": 2,
                   "wall_s": 10.0, "status": state if state != "infeasible" else "complete"}
        trial.set_user_attr("run_dir", str(run_dir))
        if gflops is not None:
            attrs = {"params_m": 1.5, "gflops": gflops, "throughput": speed, "latency_ms": 2.0}
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            trial.set_constraint("max_gflops", gflops - 0.5)
            metrics.update({"model/gflops": gflops, "model/throughput": speed})
        if acc is not None:
            trial.set_user_attr("val_acc1_best", acc)
            metrics["val/acc1_best"] = acc
            study.tell(trial, [acc, speed])
        elif state == "infeasible":  # as fvlab sweep does it: pruned before training, with the reason
            trial.set_user_attr("pruned_reason", "infeasible, not trained: model/gflops=0.8 > max_gflops 0.5")
            study.tell(trial, state=TrialState.PRUNED)
        elif state == "pruned":
            trial.set_user_attr("pruned_reason", "pruned at epoch 1: below the median")
            metrics["error"] = "pruned at epoch 1: below the median"
            study.tell(trial, state=TrialState.PRUNED)
        else:
            metrics["error"] = "FloatingPointError: loss is nan"
            study.tell(trial, state=TrialState.FAIL)
        write_run(run_dir, metrics, {"ct_size": trial.params["model.arch.ct_size"]})
    return study


def test_report_of_a_study_with_pruned_failed_and_infeasible_trials(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from fvlab.cli import main

    study_dir = tmp_path / "runs" / "hat_search"
    make_study(study_dir)
    assert main(["report", str(study_dir)]) == 0
    out = capsys.readouterr().out
    md = (study_dir / "report" / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| #")]
    assert len(lines) == 8  # the trial directories are rows of the study, not an experiment
    state = {line.split("|")[1].strip(): line for line in lines}
    assert "| complete " in state["#0"] and "| infeasible " in state["#4"]
    assert "| pruned " in state["#5"] and "pruned at epoch 1: below the median" in state["#5"]
    assert "| failed " in state["#6"] and "FloatingPointError: loss is nan" in state["#6"]
    pareto = {t for t, line in state.items() if "| yes " in line}
    assert pareto == {"#0", "#1", "#2"}  # #3 dominated; #4 infeasible though most accurate
    assert "| infeasible " in state["#7"] and "infeasible, not trained: model/gflops=0.8 > max_gflops" in state["#7"]
    assert "Variants" not in md and "8 trials, 4 complete, 2 infeasible, 1 pruned, 1 failed" in out
    for name in ("accuracy_vs_throughput", "study_history_0", "study_history_1", "study_importances",
                 "study_pareto_front", "study_hypervolume"):
        with Image.open(study_dir / "report" / f"{name}.png") as image:
            assert image.size == PNG_SIZE, name
    trials = [r for r in csv.DictReader((study_dir / "report" / "report.csv").open()) if r["kind"] == "trial"]
    assert [r["status"] for r in trials][4:] == ["infeasible", "pruned", "failed", "infeasible"]


def test_a_study_reached_twice_is_reported_once(tmp_path: Path) -> None:
    from fvlab.cli import main

    study_dir = tmp_path / "runs" / "hat_search"
    make_study(study_dir)
    (tmp_path / "link").symlink_to(study_dir)
    # The directory, a symlink to it, its parent, and its journal again as --storage.
    assert main(["report", str(study_dir), str(tmp_path / "link"), str(tmp_path / "runs"), "--storage",
                 str(tmp_path / "link" / "study.journal"), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.count("Trials of study hat_search") == 1 and "Variants" not in md
    assert len([line for line in md.splitlines() if line.startswith("| #")]) == 8


def test_report_from_storage_with_one_complete_trial_skips_importances(tmp_path: Path, capsys) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from fvlab.cli import main

    journal = tmp_path / "one.journal"
    study = optuna.create_study(study_name="single", storage=JournalStorage(JournalFileBackend(str(journal))),
                                direction="maximize")
    study.optimize(lambda t: t.suggest_float("model.lr", 1e-4, 1e-2, log=True), n_trials=1)
    assert main(["report", "--storage", str(journal), "--study-name", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "--study-name 'nope' is not in --storage" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["report", "--storage", str(journal), "--study-name", "single", "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "](study_history.png)" in md and "parameter importances need at least two complete trials" in md


def test_report_of_a_real_two_seed_fit(tmp_path: Path, capsys) -> None:
    import yaml
    from PIL import Image

    from fvlab.cli import main

    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "exp", "seed_everything": 0, "seeds": [0, 1],
        "model": {"arch": {"name": "fastervit_micro"}, "lr": 1e-3},
        "data": {"class_path": "fvlab.data.SyntheticDataModule",
                 "init_args": {"image_size": 32, "num_classes": 4, "in_chans": 3, "num_samples": 64,
                               "val_samples": 32, "batch_size": 16}},
        "trainer": {"max_epochs": 2, "limit_train_batches": 1, "limit_val_batches": 1,
                    "log_every_n_steps": 1, "num_sanity_val_steps": 0},
        "ablation": {"ct1": {"model.arch.ct_size": 1}}}, sort_keys=False))
    assert main(["fit", str(experiment), "--runs-dir", str(tmp_path / "runs")]) == 0
    root = tmp_path / "runs" / "exp"
    assert main(["report", str(root)]) == 0
    capsys.readouterr()
    md = (root / "report" / "report.md").read_text()
    for variant in ("ct1",):
        row = next(line for line in md.splitlines() if line.startswith(f"| {variant} "))
        summary = next(line for line in (root / "summary.md").read_text().splitlines()
                       if line.startswith(f"| {variant} "))
        for metric in ("val/acc1_best", "test/acc1"):
            accs = [json.loads((root / variant / f"seed_{s}" / "metrics.json").read_text())[metric]
                    for s in (0, 1)]
            mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / math.sqrt(2)  # sample std of two values
            assert f"{mean:.4f} ± {std:.4f}" in row and "| 2/2 " in row, metric
            assert f"{mean:.4f} ± {std:.4f}" in summary, metric
    assert "| reference " in next(line for line in md.splitlines() if line.startswith("| ct1 "))
    from fvlab.report.collect import read_run

    assert [epoch for epoch, _ in read_run(root / "ct1" / "seed_1").curve] == [1, 2]
    with Image.open(root / "report" / "val_acc1_per_epoch.png") as image:
        assert image.size == PNG_SIZE
    # The same runs reached through several paths (parent, experiment, run, symlink) count once.
    (tmp_path / "link").symlink_to(root)
    assert main(["report", str(tmp_path / "runs"), str(root), str(root / "ct1"), str(tmp_path / "link"),
                 "--out", str(tmp_path / "twice")]) == 0
    again = (tmp_path / "twice" / "report.md").read_text()
    assert next(line for line in again.splitlines() if line.startswith("| ct1 ")) == \
        next(line for line in md.splitlines() if line.startswith("| ct1 "))


def test_report_plots_throughput_against_batch_size_from_profile_json(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from fvlab.cli import main

    exp = hand_built_experiment(tmp_path)
    rows = [{"name": name, "batch_size": b, "backend": "eager", "model/throughput": rate * b / (b + 1),
             "model/throughput_lo": 0.9 * rate * b / (b + 1), "model/throughput_hi": 1.1 * rate * b / (b + 1)}
            for name, rate in (("ref", 700.0), ("ct4", 500.0)) for b in (1, 8, 32)]
    (exp / "profile.json").write_text(json.dumps(rows))
    assert main(["report", str(exp)]) == 0
    md = (exp / "report" / "report.md").read_text()
    assert "](throughput_vs_batch.png)" in md
    with Image.open(exp / "report" / "throughput_vs_batch.png") as image:
        assert image.size == PNG_SIZE
