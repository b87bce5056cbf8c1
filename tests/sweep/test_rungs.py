"""`pruner: rungs`: rung decisions on real storages and Trainers, bad specs (the fronts: tests/test_pareto.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import optuna
import pytest
import torch
from optuna.trial import TrialState

from fvlab.sweep.attrs import PRUNED_RUNG_ATTR
from fvlab.sweep.rungs import RungsCallback, RungsPruner, rung_epochs
from fvlab.sweep.space import load_sweep
from fvlab.sweep.storage import open_storage
from fvlab.sweep.workers import make_pruner
from helpers import BASE, ROOT, run_sweep, write_sweep  # the sweep tests' tiny base experiment

pytestmark = pytest.mark.filterwarnings("ignore")
MAX2 = ["maximize", "maximize"]


# ---- rungs and decisions on real storages ----------------------------------------------------------


def test_rung_epochs() -> None:
    assert rung_epochs(1, 3, 9) == [1, 3]  # 9 is max_epochs itself: trials there complete
    assert rung_epochs(1, 3, 10) == [1, 3, 9]
    assert rung_epochs(2, 2, 16) == [2, 4, 8]
    assert rung_epochs(1, 3, 1) == []
    with pytest.raises(ValueError, match="reduction_factor"):
        RungsPruner(1, 1)


def _study(kind: str, tmp_path: Path, directions: list[str] = MAX2) -> optuna.Study:
    storage = None if kind == "memory" else open_storage(None, tmp_path / "study.journal")
    return optuna.create_study(study_name="rungs", storage=storage, directions=directions)


@pytest.mark.parametrize("kind", ["memory", "journal"])
def test_decisions_from_the_storage(kind: str, tmp_path: Path) -> None:
    study = _study(kind, tmp_path)
    pruner = RungsPruner(min_epochs=1, reduction_factor=3)
    trials = [study.ask() for _ in range(7)]
    at_rung_1 = [(0.50, 100), (0.60, 100), (0.40, 100), (0.70, 300), (0.65, 200), (0.30, 50), (0.90, 50)]

    def record(number: int) -> bool:
        pruner.record(trials[number], 1, at_rung_1[number])
        return pruner.decide(study, number, 1).go_on

    # Asynchronous: the first two pass while the rung holds fewer than 3 trials.
    assert record(0) and record(1)
    # The third is dominated by both: rank 3 of 3, only the best 1 goes on.
    third = pruner.decide(study, 1, 1)
    assert not record(2)
    decision = pruner.decide(study, 2, 1)
    assert (decision.rank, decision.trials, decision.keep, decision.front) == (3, 3, 1, 3)
    assert third.go_on and pruner.decide(study, 1, 1).rank == 1  # trial 1 leads the full rung
    # Trial 3 dominates everyone so far.
    assert record(3)
    # Trial 4 is dominated by trial 3 alone: second of five, and only the best one goes on.
    assert not record(4)
    # Trial 5 is dominated by everything; trial 6 (best accuracy, worst throughput) joins the front.
    assert not record(5)
    assert record(6)  # 7 trials, best 2 go on: the front {3, 6} (trial 1 is now dominated by 3)
    assert pruner.decide(study, 6, 1).front == 1 and pruner.decide(study, 1, 1).front == 3
    # A stopped trial stays in the rung's population; a failed one (its retry repeats it) does not.
    study.tell(trials[2], state=TrialState.PRUNED)
    study.tell(trials[5], state=TrialState.FAIL)
    assert pruner.decide(study, 6, 1).trials == 6
    # Optuna's own interface agrees with the decision at the last recorded rung.
    frozen = {t.number: t for t in study.get_trials()}
    assert pruner.prune(study, frozen[4]) and not pruner.prune(study, frozen[3])


class Scripted(pl.LightningModule):
    """A real LightningModule whose validation accuracy follows a script, one value per epoch."""

    def __init__(self, accuracy: list[float]):
        super().__init__()
        self.accuracy = accuracy
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc1_best", self.accuracy[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 2)), batch_size=2)

    val_dataloader = train_dataloader


def test_multi_objective_trial_stops_at_the_expected_rung(tmp_path: Path) -> None:
    study = _study("journal", tmp_path)
    pruner = RungsPruner(min_epochs=1, reduction_factor=3)
    # Eight finished trials. At rung 1 the new trial's 0.55 at 150 images/s shares the second
    # front with (0.6, 100): third of nine, and the best three go on. At rung 3 (0.9, 300)
    # dominates it and (0.8, 100), the earlier trial of its front, ranks before it: third of
    # four, and only the best one goes on.
    rung_1 = [(0.1, 100), (0.2, 100), (0.3, 100), (0.4, 100), (0.5, 100), (0.6, 100), (0.7, 300), (0.2, 50)]
    rung_3 = {5: (0.8, 100), 6: (0.9, 300), 2: (0.5, 100)}
    for number, values in enumerate(rung_1):
        trial = study.ask()
        pruner.record(trial, 1, values)
        if number in rung_3:
            pruner.record(trial, 3, rung_3[number])
            study.tell(trial, list(rung_3[number]))
        else:
            study.tell(trial, state=TrialState.PRUNED)
    trial = study.ask()
    callback = RungsCallback(trial, ["val/acc1_best", "model/throughput"],
                             {"model/throughput": 150.0, "model/params_m": 1.0}, pruner)
    with pytest.raises(ValueError, match="1 objectives for a study with 2 directions"):
        RungsCallback(trial, ["val/acc1_best"], pruner=pruner)
    trainer = pl.Trainer(max_epochs=9, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accelerator="cpu")
    trainer.fit(Scripted([0.55, 0.55, 0.56] + [0.99] * 6))
    assert [(d.epochs, d.go_on) for d in callback.decisions] == [(1, True), (3, False)]
    assert trainer.current_epoch == 3  # three epochs trained of nine
    assert callback.stopped_status == "pruned"
    assert callback.stopped_reason.startswith("pruned at rung 3 (epoch 3): rank 3 of 4")
    frozen = study.get_trials()[-1]
    assert frozen.user_attrs["rung_1"] == pytest.approx([0.55, 150.0])
    assert frozen.user_attrs["rung_3"] == pytest.approx([0.56, 150.0])
    assert frozen.user_attrs[PRUNED_RUNG_ATTR] == 3


def test_fit_run_keeps_a_pruned_trials_figures(tmp_path: Path) -> None:
    from fvlab.lit.build import apply_overrides
    from fvlab.lit.build import build_run
    from fvlab.lit.fit import fit_run
    from fvlab.lit.measure import measure_specs
    from fvlab.runs import read_metrics

    study = _study("memory", tmp_path, ["maximize", "minimize"])
    pruner = RungsPruner(min_epochs=1, reduction_factor=3)
    study.pruner = pruner  # as make_pruner gives it to the study: the callback's default
    for values in [(1.0, 0.001), (1.0, 0.002)]:  # accuracy and params_m no fvlab model can beat
        pruner.record(study.ask(), 1, values)
    trial = study.ask()
    config = apply_overrides({k: v for k, v in BASE.items() if k not in ("name", "ablation", "seeds")},
                             {"trainer.max_epochs": 2, "trainer.limit_train_batches": 1})
    # model/params_m comes from the run's own profile, which the sweep fills before training.
    callback = RungsCallback(trial, ["val/acc1_best", "model/params_m"])
    spec = build_run(config, tmp_path / "trial_0002", experiment="rungs", variant="trial_0002",
                     callbacks=[callback])
    measured = {**measure_specs({"trial": spec}, throughput=False)["trial"], "model/throughput": 1.0, "model/latency_ms": 1.0}
    result = fit_run(spec, model_metrics=measured)
    assert result["status"] == "pruned" and result["epochs"] == 1
    assert result["error"].startswith("pruned at rung 1 (epoch 1): rank 3 of 3")
    written = read_metrics(tmp_path / "trial_0002")
    assert written["status"] == "pruned" and written["val/acc1_best"] is not None
    assert written["model/params_m"] is not None
    assert study.trials[-1].user_attrs["rung_1"][1] == pytest.approx(written["model/params_m"])


# ---- two processes on one storage -----------------------------------------------------------------

DECIDE = """
import json, sys
from pathlib import Path
import optuna
from fvlab.sweep.rungs import RungsPruner
from fvlab.sweep.storage import open_storage
pruner, answers = RungsPruner(1, 3, "nsga2"), []
for url, journal in json.loads(sys.argv[1]):
    study = optuna.load_study(study_name="rungs", storage=open_storage(url, Path(journal)))
    for values in json.loads(sys.argv[2]):
        trial = study.ask()
        pruner.record(trial, 1, values)
        study.tell(trial, values)
    answers.append([[d.go_on, d.rank, d.trials] for n in range(len(study.trials))
                    for d in [pruner.decide(study, n, 1)]])
print(json.dumps(answers))
"""


def test_two_processes_decide_alike(tmp_path: Path, request) -> None:
    # One second process serves both storages (its imports are most of this test's time).
    storages: list[tuple[str | None, str]] = [(None, str(tmp_path / "study.journal"))]
    skipped = None
    try:
        storages.append((request.getfixturevalue("postgres_url"), ""))
    except pytest.skip.Exception as err:  # no PostgreSQL here (CI fails instead): the journal still counts
        skipped = str(err)
    studies = []
    for url, journal in storages:
        study = optuna.create_study(study_name="rungs", storage=open_storage(url, Path(journal)), directions=MAX2)
        for values in [(0.5, 100), (0.6, 90), (0.3, 300)]:
            RungsPruner(1, 3).record(study.ask(), 1, values)
        studies.append(study)
    other = [[0.7, 80], [0.2, 50], [0.55, 95]]
    code = subprocess.run([sys.executable, "-c", DECIDE, json.dumps(storages), json.dumps(other)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr[-2000:]
    theirs = json.loads(code.stdout.strip().splitlines()[-1])
    for study, answer in zip(studies, theirs, strict=True):
        pruner = RungsPruner(1, 3, "nsga2")  # crowding distance picks within the front
        mine = [[d.go_on, d.rank, d.trials] for n in range(6) for d in [pruner.decide(study, n, 1)]]
        assert answer == mine
        # One front of five trade-offs (trial 4 is dominated); of six, two go on: the front's
        # extremes, best throughput (trial 2) and best accuracy (trial 3), by crowding distance.
        assert [go for go, _, _ in mine] == [False, False, True, True, False, False]
    if skipped:
        pytest.skip(f"journal file checked; PostgreSQL not: {skipped}")


# ---- the sweep file -----------------------------------------------------------------------------------


RUNGS = {"name": "rungs", "min_epochs": 1, "reduction_factor": 3}
BAD_RUNGS = [
    ({"pruner": {**RUNGS, "reduction_factor": 1}}, "pruner.reduction_factor: must be at least 2"),
    ({"pruner": {**RUNGS, "eta": 3}}, "pruner.eta: not an option of rungs; known: min_epochs, reduction_factor"),
    ({"pruner": {**RUNGS, "min_epochs": 1.5}}, "pruner.min_epochs: must be an integer"),
    ({"pruner": {**RUNGS, "promotion": "hypervolume"}},
     "pruner.promotion: 'hypervolume' is not a promotion rule; use one of nsga2, epsilon_net, first_front"),
    ({"pruner": "rungs", "objectives": {"train/loss": "minimize"}}, "'train/loss' is not known there"),
    ({"pruner": "rungs", "objectives": {"model/throughput": "maximize"}}, "rungs needs an objective measured"),
    ({"pruner": "asha"}, "Optuna cannot prune multi-objective studies; use pruner: rungs"),
    # Rungs at epochs 1, 3 and 9 fall between validations every 2 epochs: none would ever prune.
    ({"pruner": RUNGS, "overrides": {"trainer.max_epochs": 10, "trainer.check_val_every_n_epoch": 2}},
     "rung(s) at epoch 1, 3, 9 are not validation epochs with trainer.check_val_every_n_epoch 2"),
    ({"pruner": RUNGS, "overrides": {"trainer.max_epochs": 3, "trainer.limit_val_batches": 0}},
     "trainer.limit_val_batches: 0 turns validation off"),
]


def test_no_rung_below_max_epochs_is_a_note_not_an_error(tmp_path: Path) -> None:
    # `fvlab sweep sweeps/hat_search.yaml --set trainer.max_epochs=1` is a quick look, not a mistake.
    from fvlab.sweep.space import check_rungs_epochs

    sweep = load_sweep(write_sweep(tmp_path, "rungs.yaml", pruner={**RUNGS, "min_epochs": 4}))
    assert "pruner.min_epochs 4 is not below trainer.max_epochs 3: no rung" in check_rungs_epochs(sweep, 3)
    assert check_rungs_epochs(sweep, 5) is None


@pytest.mark.parametrize("changes, message", BAD_RUNGS, ids=[m.split(":")[0][:24] + str(i) for i, (_, m)
                                                            in enumerate(BAD_RUNGS)])
def test_bad_rungs_exit_2_and_write_nothing(tmp_path: Path, capsys, changes: dict, message: str) -> None:
    sweep = write_sweep(tmp_path, **changes)
    assert run_sweep(tmp_path, sweep) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_pruner_is_not_part_of_the_study_identity(tmp_path: Path) -> None:
    plain = load_sweep(write_sweep(tmp_path, "plain.yaml"))
    rungs = load_sweep(write_sweep(tmp_path, "rungs.yaml", pruner={"name": "rungs", "reduction_factor": 2}))
    assert rungs.pruner_options == {"min_epochs": 1, "reduction_factor": 2, "promotion": "first_front"}
    assert rungs.identity_hash() == plain.identity_hash()
    made = make_pruner(rungs)
    assert isinstance(made, RungsPruner) and (made.min_epochs, made.reduction_factor) == (1, 2)
    assert made.promotion == "first_front"  # the default the repeated search_cost benchmark supports
    net = make_pruner(load_sweep(write_sweep(tmp_path, "net.yaml", pruner={"name": "rungs", "promotion": "epsilon_net"})))
    assert isinstance(net, RungsPruner) and net.promotion == "epsilon_net"
    asha = load_sweep(write_sweep(tmp_path, "asha.yaml", objectives={"val/acc1": "maximize"},
                                  pruner={"name": "asha", "reduction_factor": 2}))
    assert isinstance(make_pruner(asha), optuna.pruners.SuccessiveHalvingPruner)


def test_the_reference_trial_is_never_pruned(tmp_path: Path) -> None:
    # Three trials, as other workers would leave them, reached rung 1 with an accuracy no model
    # reaches; the reference (trial 0, the base experiment's settings) comes last to the rung, where
    # only the best 4 // 3 = 1 goes on. It records its values and trains to the end all the same.
    sweep = write_sweep(tmp_path, study="protected", n_trials=4, space={"model.lr": {"low": 1e-4, "high": 1e-2}},
                        objectives={"val/acc1_best": "maximize"}, sampler={"name": "random", "seed": 0},
                        pruner=RUNGS, overrides={"trainer.max_epochs": 2})
    assert run_sweep(tmp_path, sweep, "--timeout", "0.001") == 0  # creates the study, starts no trial
    journal = tmp_path / "runs" / "protected" / "study.journal"
    study = optuna.load_study(study_name="protected", storage=open_storage(None, journal))
    for lr in (1e-3, 2e-3, 4e-3):
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.PRUNED, params={"model.lr": lr},
            distributions={"model.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
            user_attrs={"rung_1": [1.0]}))
    assert run_sweep(tmp_path, sweep) == 0
    reference = optuna.load_study(study_name="protected", storage=open_storage(None, journal)).get_trials()[0]
    assert reference.user_attrs["reference"] and reference.state == TrialState.COMPLETE
    assert reference.user_attrs["rung_1"][0] < 1.0 and PRUNED_RUNG_ATTR not in reference.user_attrs
    metrics = json.loads((Path(reference.user_attrs["run_dir"]) / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["epochs"] == 2
    assert "trial_0000 (reference)" in (tmp_path / "runs" / "protected" / "pareto.md").read_text()
