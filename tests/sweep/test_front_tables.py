"""The sweep's front as tables (fvlab/sweep/front_tables.py): which trials, pareto.md and pareto.csv."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from fvlab.sweep import front_tables
from fvlab.sweep.front_tables import format_front, front_trials, write_front

pytestmark = pytest.mark.filterwarnings("ignore")

# The demo's ct1 and ct4: both 351/360 correct, stored through float32 as two different floats.
CT1, CT4 = 0.97499998, 0.97500000


def test_sweep_front_leaves_out_a_float32_tie_that_is_slower() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    for acc, speed in ((CT1, 1183.0), (CT4, 691.0), (0.9611, 1350.0), (0.90, 600.0)):
        study.add_trial(optuna.trial.create_trial(values=[acc, speed]))
    assert len(study.best_trials) == 3  # Optuna's exact comparison keeps trial 1
    assert [t.number for t in front_trials(study)] == [0, 2]
    # A trial violating a constraint never enters the front, however good.
    study.add_trial(optuna.trial.create_trial(values=[0.99, 5000.0], system_attrs={"constraints:max_gflops": 0.2}))
    assert [t.number for t in front_trials(study)] == [0, 2]


def test_pareto_md_and_csv(tmp_path: Path) -> None:
    rows = [{"trial": 0, "run": "trial_0000 (reference)", "val/acc1_best": CT1, "model.arch.depths": [1, 1, 2, 1]},
            {"trial": 3, "run": "trial_0003", "val/acc1_best": 0.5, "model.lr": None}]
    # List choices as the sweep file encodes them, floats to 4 significant digits, a missing value '-'.
    assert format_front(rows).splitlines() == [
        "| trial | run                    | val/acc1_best | model.arch.depths | model.lr |",
        "|-------|------------------------|---------------|-------------------|----------|",
        "| 0     | trial_0000 (reference) | 0.975         | 1-1-2-1           |          |",
        "| 3     | trial_0003             | 0.5           |                   | -        |"]
    assert format_front([]) == "(no feasible complete trial yet)"
    write_front(tmp_path, rows, "demo: Pareto front", notes="A note.")
    assert (tmp_path / "pareto.md").read_text() == f"# demo: Pareto front\n\n{format_front(rows)}\n\nA note.\n"
    # The CSV keeps the values unrounded.
    assert (tmp_path / "pareto.csv").read_text().splitlines() == [
        "trial,run,val/acc1_best,model.arch.depths,model.lr", "0,trial_0000 (reference),0.97499998,1-1-2-1,",
        "3,trial_0003,0.5,,"]


def test_the_front_tables_never_import_confirm() -> None:
    # confirm builds on the front (its members, trial_config, the table), never the other way round.
    assert "fvlab.sweep.confirm" not in Path(front_tables.__file__).read_text()
