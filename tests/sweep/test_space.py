"""The sweep file (fvlab.sweep.space): distributions, choices, and bad files that exit 2
writing nothing."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from fvlab.sweep.space import SweepError, load_sweep, parse_param

from helpers import SWEEP, run_sweep, write_sweep

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- the space ---------------------------------------------------------------------------


def test_space_distributions_and_list_choices_round_trip() -> None:
    depths = parse_param("model.arch.depths", {"choices": [[1, 1, 2, 1], [1, 1, 4, 1]]})
    assert depths.distribution == CategoricalDistribution(["1-1-2-1", "1-1-4-1"])
    assert depths.decode("1-1-4-1") == [1, 1, 4, 1]
    mixed = parse_param("model.arch.window_size", {"choices": [2, [2, 2, 4, 2]]})
    assert [mixed.decode(c) for c in mixed.distribution.choices] == [2, [2, 2, 4, 2]]
    hat = parse_param("model.arch.hat", {"choices": [True, [False, False, True, False]]})
    assert hat.distribution.choices == ("true", "false-false-true-false")
    assert hat.decode("true") is True
    scalar = parse_param("model.arch.ct_size", {"choices": [0, 1, 2]})
    assert scalar.distribution == CategoricalDistribution([0, 1, 2]) and scalar.decoded is None
    assert parse_param("k", {"low": 2, "high": 4, "step": 1}).distribution == IntDistribution(2, 4, step=1)
    assert parse_param("k", {"low": 1.0e-4, "high": 1.0e-2, "log": True}).distribution == \
        FloatDistribution(1e-4, 1e-2, log=True)
    stepped = parse_param("k", {"low": 0.0, "high": 0.5, "step": 0.25})
    assert stepped.distribution == FloatDistribution(0.0, 0.5, step=0.25)
    assert stepped.discrete_values == [0.0, 0.25, 0.5]
    assert parse_param("k", {"low": 0.0, "high": 1.0}).discrete_values is None
    # A real trial gets the decoded list.
    study = optuna.create_study()
    trial = study.ask()
    assert depths.suggest(trial) in ([1, 1, 2, 1], [1, 1, 4, 1])
    assert isinstance(trial.params["model.arch.depths"], str)


@pytest.mark.parametrize("spec, message", [
    ({"choices": []}, "non-empty"),
    ({"low": 3, "high": 1}, "low 3 > high 1"),
    ({"low": 0.0, "high": 1.0, "log": True}, "log needs low > 0"),
    ({"low": 1, "high": 4, "spacing": 1}, "unknown key 'spacing'"),
    ({"choices": [1, 1]}, "repeat"),
    ({"low": 1.0e-3, "high": 1.0e-1, "log": True, "step": 0.1}, "step or log"),
])
def test_bad_distributions(spec: dict, message: str) -> None:
    with pytest.raises(SweepError, match="space.k: .*" + message.replace("(", r"\(")):
        parse_param("k", spec)


SUPERNET_SPACE = {"model.arch.ct_size": {"choices": [1, 2]},
                  "model.arch.depths": {"choices": [[1, 1, 1, 1], [1, 1, 2, 1]]}}
BAD_SWEEPS = [
    ({"objectives": {"val/top1": "maximize"}}, "objectives: unknown metric 'val/top1'"),
    ({"objectives": {"val/acc1_best": "up"}}, "objectives.val/acc1_best"),
    ({"space": {"model.arch.windowsize": {"choices": [1, 2]}}}, "space.model.arch.windowsize: not a key"),
    ({"space": {"model.arch.ct_size": {"choices": []}}}, "space.model.arch.ct_size: choices must be a non-empty"),
    ({"space": {"model.lr": {"low": 0.1, "high": 0.01}}}, "space.model.lr: low 0.1 > high 0.01"),
    ({"space": {"model.lr": {"low": 0.0, "high": 0.01, "log": True}}}, "space.model.lr: log needs low > 0"),
    ({"sampler": "bayes"}, "sampler: unknown sampler 'bayes'"),
    ({"sampler": {"name": "tpe", "n_startup": 3}}, "sampler.n_startup: not an option"),
    ({"pruner": "early"}, "pruner: unknown pruner 'early'"),
    ({"sampler": "grid"}, "space.model.lr: the grid sampler needs discrete values"),
    ({"pruner": "median"}, "Optuna cannot prune multi-objective studies"),
    ({"experiment": "missing.yaml"}, "experiment: file not found: missing.yaml"),
    ({"constraints": {"max_watts": 3}}, "constraints: unknown constraint 'max_watts'"),
    ({"n_trials": 0}, "n_trials: must be a positive integer"),
    ({"overrides": {"trainer.max_epoch": 2}}, "cannot be built"),
    ({"stuff": 1}, "unknown key 'stuff'"),
    ({"confirm": {"seeds": [3, 0]}}, "confirm.seeds: 0 is the seed every trial trains with"),
    ({"confirm": {"seeds": []}}, "confirm.seeds: a non-empty list of integers"),
    ({"confirm": {"seeds": [1, 1]}}, "confirm.seeds: [1, 1] repeats a seed"),
    ({"confirm": [1, 2]}, "confirm: give the seeds to re-train the front with"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 0}}, "supernet.epochs: must be a positive integer"),
    ({"space": SUPERNET_SPACE, "supernet": {"sandwich": 2}}, "supernet.epochs: missing"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "sandwich": -1}}, "supernet.sandwich: random subnets"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "sandwich": 1.5}}, "supernet.sandwich: random subnets"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "distill": "yes"}}, "supernet.distill: must be true or false"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "bn_batches": 0}}, "supernet.bn_batches: train batches"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2, "teacher": "big"}}, "supernet.teacher: not a supernet setting"),
    ({"space": SUPERNET_SPACE, "supernet": 8}, "supernet: give its settings"),
    ({"supernet": {"epochs": 2}}, "space.model.lr: a supernet shares weights over model.arch.depths"),
    ({"space": {**SUPERNET_SPACE, "model.arch.in_dim": {"choices": [8, 16]}}, "supernet": {"epochs": 2}},
     "space.model.arch.in_dim: a supernet shares weights"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2}, "pruner": "rungs"}, "pruner: the trials of a supernet"),
    ({"space": SUPERNET_SPACE, "supernet": {"epochs": 2}, "overrides": {"model.ema": True}},
     "supernet: the base experiment cannot train a supernet: model.ema"),
]


@pytest.mark.parametrize("changes, message", BAD_SWEEPS, ids=[m.split(":")[0][:30] for _, m in BAD_SWEEPS])
def test_bad_sweep_file_exits_2_and_writes_nothing(tmp_path: Path, capsys, changes: dict, message: str) -> None:
    sweep = write_sweep(tmp_path, **changes)
    assert run_sweep(tmp_path, sweep) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_supernet_block_parsed_with_defaults_and_part_of_the_identity(tmp_path: Path) -> None:
    from fvlab.models.supernet import SUBNET_KEYS
    from fvlab.sweep.space import SUPERNET_SPACE_KEYS

    assert SUPERNET_SPACE_KEYS == tuple(f"model.arch.{k}" for k in SUBNET_KEYS)
    plain = load_sweep(write_sweep(tmp_path, space=SUPERNET_SPACE))
    assert plain.supernet is None and "supernet" not in plain.identity()  # older studies keep their hash
    sweep = load_sweep(write_sweep(tmp_path, space=SUPERNET_SPACE, supernet={"epochs": 3, "distill": False}))
    assert sweep.supernet == {"epochs": 3, "sandwich": 2, "distill": False, "bn_batches": 20}
    other = load_sweep(write_sweep(tmp_path, space=SUPERNET_SPACE, supernet={"epochs": 4, "distill": False}))
    assert sweep.identity_hash() != other.identity_hash() != plain.identity_hash()


def test_unreachable_storage_error_hides_the_password(tmp_path: Path, capsys) -> None:
    sweep = write_sweep(tmp_path)
    assert run_sweep(tmp_path, sweep, "--storage", "postgresql://fvlab:pw-xyz@127.0.0.1:1/sweeps") == 2
    err = capsys.readouterr().err
    assert "--storage postgresql://fvlab:***@127.0.0.1:1/sweeps: OperationalError" in err and "pw-xyz" not in err


# ---- the base experiment's values: the reference trial ---------------------------------------


def test_reference_values_are_normalised_and_must_lie_in_the_space() -> None:
    from fvlab.sweep.space import reference_params

    space = {"model.arch.window_size": parse_param("model.arch.window_size",
                                                   {"choices": [[2, 2, 4, 2], [2, 2, 2, 2]]}),
             "model.arch.hat": parse_param("model.arch.hat", {"choices": [[False, False, True, False], False]}),
             "model.lr": parse_param("model.lr", {"low": 1.0e-4, "high": 1.0e-2, "log": True})}
    base = {"model": {"arch": {"window_size": 2, "hat": [False, False, True, False]}, "lr": 3.0e-3}}
    assert reference_params(space, base) == {"model.arch.window_size": "2-2-2-2",
                                             "model.arch.hat": "false-false-true-false", "model.lr": 3.0e-3}
    with pytest.raises(SweepError, match=r"space.model.arch.window_size: the base experiment's value 4"):
        reference_params(space, {**base, "model": {**base["model"], "arch": {**base["model"]["arch"],
                                                                              "window_size": 4}}})
    with pytest.raises(SweepError, match=r"space.model.lr: .* outside \[0.0001, 0.01\]"):
        reference_params(space, {"model": {**base["model"], "lr": 0.5}})


def test_a_base_value_outside_the_space_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    # fastervit_micro has ct_size 1, which the space leaves out: the reference trial cannot exist.
    sweep = write_sweep(tmp_path, space={**SWEEP["space"], "model.arch.ct_size": {"choices": [2, 3]}})
    assert run_sweep(tmp_path, sweep) == 2
    err = capsys.readouterr().err
    assert "space.model.arch.ct_size: the base experiment's value 1 is not one of the choices" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()
