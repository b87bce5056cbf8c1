"""Sweep workers and storages (fvlab.sweep.workers, .storage): faults, kills, retries, budgets
and heartbeats, on the journal file and on PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from fvlab.cli import main

from helpers import BASE, ROOT, UNTRAINED, journal_study, run_sweep, write_sweep

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- faults and workers, on the journal file and on PostgreSQL --------------------------------


@pytest.fixture(params=["journal", "postgresql"])
def storage(request) -> str | None:
    """None (the default journal file) or the URL of a fresh PostgreSQL database."""
    if request.param == "journal":
        return None
    return request.getfixturevalue("postgres_url")


def load_study(tmp_path: Path, name: str, storage: str | None) -> optuna.Study:
    if storage is None:
        return journal_study(tmp_path / "runs" / name / "study.journal", name)
    return optuna.load_study(study_name=name, storage=storage)


def fvlab_process(*args: str, stdout: Path | None = None) -> subprocess.Popen:
    code = "import sys; from fvlab.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT,
                            stdout=stdout.open("w") if stdout else subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def assert_budget_spent(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    from fvlab.sweep.workers import count_budget

    trials = study.get_trials()
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == n_trials and count_budget(study) == (n_trials, 0)
    runs = [t.user_attrs["run_name"] for t in finished]
    assert len(set(runs)) == n_trials  # no trial ran twice
    return trials


# One architecture: its model metrics are measured once and shared through the study.
LR_ONLY = {"model.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}


PASSWORD = "s3cret-pw"  # the test server trusts local connections: accepted and ignored


def test_kill_9_then_rerun_resumes_in_its_own_run_directory(tmp_path: Path, storage: str | None, capsys) -> None:
    if storage is not None:
        storage = storage.replace("://fvlab@", f"://fvlab:{PASSWORD}@")
    sweep = write_sweep(tmp_path, study="killed", n_trials=3, space=LR_ONLY,
                        objectives={"val/acc1_best": "maximize"},
                        overrides={"trainer.limit_train_batches": 4, "trainer.max_epochs": 4})
    extra = ["--storage", storage] if storage else []
    log = tmp_path / "killed.out"
    process = fvlab_process("sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"), *extra, stdout=log)
    victim = tmp_path / "runs" / "killed" / "trial_0001" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not victim.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGKILL)  # in the middle of trial 1's fit, after its first epoch
    _, killed_err = process.communicate()
    running = [t.number for t in load_study(tmp_path, "killed", storage).get_trials()
               if t.state == TrialState.RUNNING]
    assert running == [1]
    assert run_sweep(tmp_path, sweep, *extra) == 0
    trials = assert_budget_spent(load_study(tmp_path, "killed", storage), 3)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [1] and "ended while running it" in failed[0].user_attrs["fail_reason"]
    retry = next(t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 1)
    assert retry.state == TrialState.COMPLETE and retry.params == failed[0].params
    # Its own directory, continued from the killed attempt's last.ckpt (not started over).
    assert retry.user_attrs["run_name"] == f"trial_{retry.number:04d}" != "trial_0001"
    assert retry.user_attrs["resumed"]["global_step"] >= 2  # at least the first epoch (64 images, batch 32)
    study_dir = tmp_path / "runs" / "killed"
    assert not (study_dir / "trial_0001" / "metrics.json").exists()  # what the killed attempt left
    assert json.loads((study_dir / retry.user_attrs["run_name"] / "metrics.json").read_text())["status"] \
        == "complete"
    # The report's row of the killed attempt shows what it wrote (no accuracy), not the retry's.
    report = ["report", str(study_dir), "--out", str(tmp_path / "report")]
    assert main(report + (["--storage", storage, "--study-name", "killed"] if storage else [])) == 0
    import csv

    from fvlab.report.collect import read_run

    rows = {int(r["trial"]): r for r in csv.DictReader((tmp_path / "report" / "report.csv").open())
            if r["kind"] == "trial"}
    own = read_run(study_dir / "trial_0001").metrics.get("val/acc1_best")  # from its events
    assert rows[1]["status"] == "failed" and rows[1]["wall_s"] == ""  # no final figures: it was killed
    assert rows[1]["val/acc1_best"] == ("" if own is None else str(own))
    assert rows[retry.number]["wall_s"] and float(rows[retry.number]["val/acc1_best"]) >= 0
    if storage is not None:  # the password is never printed or written
        out = capsys.readouterr()
        assert "fvlab:***@" in out.out
        written = [f.read_text(errors="ignore") for f in tmp_path.rglob("*")
                   if f.is_file() and f.suffix in (".md", ".json", ".csv", ".yaml", ".txt")]
        assert any("***" in text for text in written)  # report.md names its masked source
        for text in (out.out, out.err, killed_err, log.read_text(), *written):
            assert PASSWORD not in text


def test_retry_gets_its_own_tag_and_a_trial_killed_4_times_is_given_up(tmp_path: Path) -> None:
    import socket

    from fvlab.sweep.storage import MAX_RETRIES, recover_dead_trials, open_storage
    from fvlab.sweep.workers import count_budget

    storage = open_storage(None, tmp_path / "study.journal")
    study = optuna.create_study(study_name="s", storage=storage)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = {"host": socket.gethostname(), "pid": gone.pid, "start": "gone"}
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    for attempt in range(MAX_RETRIES + 1):
        trial.set_user_attr("fvlab_process", dead)  # the worker running it was killed
        trial.set_user_attr("run_dir", f"runs/s/trial_{trial.number:04d}")
        assert recover_dead_trials(study, storage) == [(trial.number, attempt < MAX_RETRIES)]
        if attempt == MAX_RETRIES:
            break
        trial = study.ask()  # the queued retry, RUNNING before its worker tags it
        assert "fvlab_process" not in trial.user_attrs  # not the dead worker's tag
        assert recover_dead_trials(study, storage) == []  # so no other worker fails the live retry
        assert trial.user_attrs["resume_from"][0] == f"runs/s/trial_{trial.number - 1:04d}"
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * (MAX_RETRIES + 1)
    assert "not retried: killed 4 times" in trials[-1].user_attrs["fail_reason"]
    assert count_budget(study) == (1, 0)  # the given-up trial counts once


def test_two_workers_finish_exactly_n_trials(tmp_path: Path, storage: str | None, capsys) -> None:
    sweep = write_sweep(tmp_path, study="parallel", n_trials=4, space=LR_ONLY,
                        objectives={"val/acc1_best": "maximize"})
    extra = ["--storage", storage] if storage else []
    assert run_sweep(tmp_path, sweep, "--workers", "2", *extra) == 0
    trials = assert_budget_spent(load_study(tmp_path, "parallel", storage), 4)
    assert len(trials) == 4
    assert len({t.user_attrs["fvlab_process"]["pid"] for t in trials}) == 2  # both workers trained
    capsys.readouterr()
    # A rerun with its budget met starts nothing: not even a worker process.
    assert run_sweep(tmp_path, sweep, "--workers", "2", *extra) == 0
    out = capsys.readouterr().out
    assert "[parallel] all 4 trial(s) have run" in out and "worker(s)" not in out
    assert len(load_study(tmp_path, "parallel", storage).get_trials()) == 4


def test_two_sweeps_started_together_share_the_budget_and_propose_differently(tmp_path: Path,
                                                                               storage: str | None) -> None:
    from fvlab.sweep.attrs import WORKERS_ATTR
    from fvlab.sweep.workers import count_budget

    sweep = write_sweep(tmp_path, study="together", n_trials=4, **UNTRAINED)
    extra = ["--storage", storage] if storage else []
    processes = [fvlab_process("sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"), *extra)
                 for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    assert not any("Traceback" in e for e in errors), errors
    study = load_study(tmp_path, "together", storage)
    trials = study.get_trials()
    assert len(trials) == 4 and count_budget(study) == (4, 0)
    assert all(t.state == TrialState.PRUNED for t in trials)
    assert study.user_attrs[WORKERS_ATTR] == 2
    first: dict[int, dict] = {}
    for t in trials:
        first.setdefault(t.user_attrs["fvlab_process"]["pid"], t.params)
    assert len(first) == 2  # both took trials
    one, two = first.values()
    assert one != two  # distinct sampler seeds


def test_a_single_fixed_seed_worker_reproduces_its_search(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, n_trials=2, **UNTRAINED)
    searches = []
    for name in ("first", "again"):
        assert run_sweep(tmp_path, sweep, "--study-name", name) == 0
        searches.append([t.params for t in load_study(tmp_path, name, None).get_trials()])
    assert searches[0] == searches[1] and len({str(p) for p in searches[0]}) == 2


def wait_for_first_checkpoint(process: subprocess.Popen, study_dir: Path) -> Path:
    """Wait (up to 240 s) until trial 0 wrote last.ckpt, its sweep still running; the checkpoint."""
    checkpoint = study_dir / "trial_0000" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read()
    return checkpoint


def test_a_worker_beats_while_its_trial_runs_and_a_silent_one_is_retried(tmp_path: Path, postgres_url: str,
                                                                      monkeypatch) -> None:
    # Another machine's view: only the heartbeat (1 s, 2 s grace here) tells a live trial from a dead one.
    from fvlab.sweep import storage as storages

    for name, value in (("HEARTBEAT_INTERVAL", 1), ("GRACE_PERIOD", 2)):
        monkeypatch.setattr(storages, name, value)
    sweep = write_sweep(tmp_path, study="beats", n_trials=2, space=LR_ONLY, objectives={"val/acc1_best": "maximize"},
                        overrides={"trainer.max_epochs": 1000, "trainer.limit_train_batches": 2})  # killed long before
    code = ("import sys; from fvlab.sweep import storage; storage.HEARTBEAT_INTERVAL, storage.GRACE_PERIOD = 1, 2; "
            "from fvlab.cli import main; sys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", code, "sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"),
                                "--storage", postgres_url], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_checkpoint(process, tmp_path / "runs" / "beats")
        study = optuna.load_study(study_name="beats", storage=storages.open_storage(postgres_url, tmp_path / "x"))
        time.sleep(3)  # longer than the grace period: only its heartbeat keeps the trial alive
        optuna.storages.fail_stale_trials(study)
        assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    finally:
        process.kill()  # no Ctrl-C, no goodbye: a machine that went away
        process.communicate()
    time.sleep(3)
    optuna.storages.fail_stale_trials(study)  # as another machine's worker does before each trial
    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL and retry.state == TrialState.WAITING and retry.params == dead.params
    assert retry.user_attrs["resume_from"] == [dead.user_attrs["run_dir"]]  # continues from its checkpoint
    assert "fvlab_process" not in retry.user_attrs


def test_sigterm_records_the_running_trial_as_interrupted(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, study="stopped", n_trials=2, space=LR_ONLY,
                        objectives={"val/acc1_best": "maximize"},
                        overrides={"trainer.max_epochs": 1000, "trainer.limit_train_batches": 2})  # killed long before
    process = fvlab_process("sweep", str(sweep), "--runs-dir", str(tmp_path / "runs"))
    try:
        checkpoint = wait_for_first_checkpoint(process, tmp_path / "runs" / "stopped")
        process.send_signal(signal.SIGTERM)  # Lightning turns it into SystemExit inside fit
        assert process.wait(timeout=120) == 1
        assert "interrupted" in process.stderr.read()
    finally:
        process.kill()  # a no-op once it ended; a hang must not train on for 1000 epochs
        process.communicate()
    trials = load_study(tmp_path, "stopped", None).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["fail_reason"] == "interrupted"
    assert trials[1].params == trials[0].params  # queued again: a rerun resumes it
    metrics = json.loads((checkpoint.parent.parent / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"].startswith("interrupted")


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_are_valid(path: Path, monkeypatch) -> None:
    import argparse

    from fvlab.sweep.command import prepare_sweep
    from fvlab.sweep.space import load_sweep

    monkeypatch.chdir(ROOT)
    sweep = load_sweep(path.relative_to(ROOT))
    assert sweep.n_trials and sweep.study == path.stem
    if "imagenet" not in path.name:  # needs an ImageNet folder
        args = argparse.Namespace(sweep=str(path.relative_to(ROOT)), n_trials=None, timeout=None, workers=1,
                                  study_name=None, storage=None, runs_dir="runs")
        prepare_sweep(args)  # every space key exists in the resolved base config


def test_confirm_reports_fresh_seeds_beside_the_selecting_run(tmp_path: Path, capsys) -> None:
    slow = {**BASE, "model": {**BASE["model"], "lr": 1.0e-4}}  # a reference that a sampled lr beats
    sweep = write_sweep(tmp_path, study="confirmed", n_trials=2, space=LR_ONLY, sampler={"name": "random", "seed": 1},
                        objectives={"val/acc1_best": "maximize"}, confirm={"seeds": [5]}, base=slow)
    capsys.readouterr()
    assert run_sweep(tmp_path, sweep, "--confirm") == 2  # no search yet: nothing to confirm
    assert "--confirm: no study at" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert run_sweep(tmp_path, sweep) == 0
    study_dir = tmp_path / "runs" / "confirmed"
    study = journal_study(study_dir / "study.journal", "confirmed")
    best, reference = study.best_trial, study.get_trials()[0]
    assert best.number != reference.number  # so the reference is confirmed too, and compared with

    def confirmed(trial) -> dict:
        run = study_dir / "confirm" / f"trial_{trial.number:04d}" / "seed_5"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["seed"] == 5
        assert yaml.safe_load((run / "config.yaml").read_text())["model"] == \
            yaml.safe_load((study_dir / trial.user_attrs["run_name"] / "config.yaml").read_text())["model"]
        return metrics

    fresh, base = confirmed(best)["val/acc1_best"], confirmed(reference)["val/acc1_best"]
    # The fresh seed alone (one sample: n/a spread), the selecting run beside it, never averaged in.
    row = [str(best.number), "5", f"{fresh:.4g} ± n/a", f"{best.values[0]:.4g}", f"{fresh - base:+.4f} [n/a] (n=1)"]
    reference_row = ["0 (reference)", "5", f"{base:.4g} ± n/a", f"{reference.values[0]:.4g}", "reference"]

    def rows(text: str) -> list[list[str]]:  # a markdown table's cells, whatever the column padding
        return [[cell.strip() for cell in line.strip().strip("|").split("|")][:5]
                for line in text.splitlines() if line.startswith("|")]

    table = (study_dir / "pareto.md").read_text()
    assert "Confirmed over fresh seeds" in table and row in rows(table) and reference_row in rows(table)
    assert "not averaged in" in table and "Holm" in table
    # fvlab report shows the same table (read from the runs on disk, without the sweep file).
    assert main(["report", str(study_dir), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Front of study confirmed confirmed over seeds" in report
    assert row in rows(report) and reference_row in rows(report)
    assert "Variants of confirmed_confirm" not in report  # the confirm runs are not an experiment
    # A rerun (or --confirm) trains nothing again: the confirm runs are complete.
    run = study_dir / "confirm" / f"trial_{best.number:04d}" / "seed_5"
    stamp = (run / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run_sweep(tmp_path, sweep, "--confirm") == 0
    assert "complete, skipped" in capsys.readouterr().out
    assert (run / "metrics.json").stat().st_mtime_ns == stamp
    assert len(journal_study(study_dir / "study.journal", "confirmed").get_trials()) == 2


def test_confirmed_throughput_shows_its_interval() -> None:
    from optuna.distributions import FloatDistribution
    from fvlab.sweep.confirm import _architecture_cell

    trial = optuna.trial.create_trial(value=0.5, params={"model.lr": 1e-3},
                                      distributions={"model.lr": FloatDistribution(1e-4, 1e-2)},
                                      user_attrs={"throughput": 1234.5, "throughput_lo": 1200.0,
                                                  "throughput_hi": 1250.0, "gflops": 0.05})
    assert _architecture_cell(trial, "model/throughput") == "1234 [1200, 1250]"  # not ± 0
    assert _architecture_cell(trial, "model/gflops") == "0.05"


# ---- the grid sampler: seeded orders, one grid shared by workers and reruns -------------------


def test_grid_sampler_order_is_seeded_and_workers_share_the_grid(tmp_path: Path) -> None:
    from fvlab.sweep.storage import open_storage
    from fvlab.sweep.workers import GridSampler

    steps = [0.1 + i * 0.1 for i in range(3)]  # a stepped range as the space lists it: 0.1 + 2 * 0.1 != 0.3
    space = {"b": [1, 2], "a": steps}
    assert GridSampler(space, seed=5).points == GridSampler(space, seed=5).points  # a seed repeats its order
    assert len({str(GridSampler(space, seed=s).points) for s in range(5)}) > 1
    every = [(a, b) for a in steps for b in (1, 2)]
    assert sorted((p["a"], p["b"]) for p in GridSampler(space, seed=5).points) == every
    storage = open_storage(None, tmp_path / "study.journal")
    optuna.create_study(study_name="grid", storage=storage).enqueue_trial({"a": 0.3, "b": 2})  # the reference
    workers = [optuna.load_study(study_name="grid", storage=storage, sampler=GridSampler(space, seed=s))
               for s in (1, 2)]
    for number in range(6):  # as the workers do: queue a point (none waiting), ask, draw its parameters
        study = workers[number % 2]
        if not any(t.state == TrialState.WAITING for t in study.get_trials()):
            study.sampler.enqueue_next(study)
        trial = study.ask()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 0.1 + 2 * 0.1 lies a rounding error above the range
            trial.suggest_float("a", 0.1, 0.3, step=0.1)
        trial.suggest_int("b", 1, 2)
        if number == 2:
            study.tell(trial, 1.0)  # finished or running, a point is held
    points = {(round(t.params["a"], 9), t.params["b"]) for t in workers[0].get_trials()}
    assert len(workers[0].get_trials()) == 6 and len(points) == 6
    with pytest.raises(RuntimeError, match="queued with their point"):
        workers[0].ask().suggest_int("b", 1, 2)


def test_a_grid_is_visited_once_over_reruns(tmp_path: Path, capsys) -> None:
    # Six points, each pruned before training. Every rerun's worker draws another seed (its index in
    # the study), and so another order: it must still take only points that no trial holds.
    space = {"model.arch.ct_size": {"choices": [1, 2]}, "model.lr": {"choices": [1.0e-3, 3.0e-3, 1.0e-2]}}
    sweep = write_sweep(tmp_path, study="grid", n_trials=None,
                        **{**UNTRAINED, "space": space, "sampler": {"name": "grid", "seed": 0}})
    for n_trials in (2, 4, 6):
        assert run_sweep(tmp_path, sweep, "--n-trials", str(n_trials)) == 0
    study = journal_study(tmp_path / "runs" / "grid" / "study.journal", "grid")
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.PRUNED for t in trials)
    assert trials[0].user_attrs["reference"] and trials[0].params["model.lr"] == 3.0e-3
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    assert study.user_attrs["fvlab_workers_started"] == 3
    capsys.readouterr()
    assert run_sweep(tmp_path, sweep, "--n-trials", "8") == 0  # capped at the grid's 6: nothing to run
    assert "[grid] all 6 trial(s) have run; every grid point has run" in capsys.readouterr().out
    assert len(study.get_trials()) == 6 and study.user_attrs["fvlab_workers_started"] == 3
