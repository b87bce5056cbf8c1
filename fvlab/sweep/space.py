"""Sweep files: the search space, objectives, constraints, sampler and pruner of one Optuna study.

``load_sweep`` reads and checks a sweep file without touching the disk beyond reading it;
every mistake is a ``SweepError`` whose one-line message names the key and the fix.
Optuna's categorical distributions take scalars only, so a list choice (a whole ``depths``
list) is offered to Optuna as a readable string, ``"1-1-4-1"``, and decoded back into the
list when the trial's config is built.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import optuna
import yaml
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)

from fvlab.metrics import (GFLOPS, LATENCY_MS, PARAMS_M, SELECTION_METRICS, SPEEDUP, THROUGHPUT, VAL_METRICS,
                           is_model_metric)
from fvlab.pareto import direction_name
from fvlab.runs import changed_keys, stable_hash

__all__ = ["SweepError", "SearchParam", "SweepSpec", "load_sweep", "parse_param", "encode_choice",
           "METRICS", "CONSTRAINTS", "SAMPLERS", "PRUNERS", "TRAINING_METRICS", "reference_params",
           "rung_epochs", "check_rungs_epochs", "SUPERNET_OPTIONS", "SUPERNET_SPACE_KEYS", "PROMOTIONS"]

# What a sweep may optimise or constrain: every metric but the test split's (selecting on it would
# leak the test set into the choice) and train/lr (a setting, not a result).
METRICS = SELECTION_METRICS
# Reported at every validation, so a pruner can follow them.
TRAINING_METRICS = VAL_METRICS
# constraint name -> (metric, bound kind)
CONSTRAINTS = {"max_gflops": (GFLOPS, "max"), "max_params_m": (PARAMS_M, "max"),
               "min_throughput": (THROUGHPUT, "min"),
               "max_latency_ms": (LATENCY_MS, "max")}
SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
PRUNERS = ("median", "hyperband", "asha", "rungs")
# How the rungs pruner ranks a rung's trials (``pruner: {name: rungs, promotion: ...}``), see
# fvlab.sweep.rungs.promotion_order.
PROMOTIONS = ("nsga2", "epsilon_net", "first_front")
_TOP_KEYS = ("study", "experiment", "space", "objectives", "constraints", "sampler", "pruner",
             "n_trials", "overrides", "confirm", "supernet")
_RANGE_KEYS = ("low", "high", "step", "log")
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SweepError(ValueError):
    """A bad sweep file or option: the one-line message names the key and the fix."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def encode_choice(value: Any) -> Any:
    """A choice as Optuna stores it: scalars as they are, lists as ``"1-1-4-1"``."""
    if isinstance(value, (list, tuple)):
        return "-".join(_text(v) for v in value)
    return value


@dataclass
class SearchParam:
    """One dotted config key of the space and its Optuna distribution (with list choices decoded)."""

    key: str
    distribution: BaseDistribution
    spec: dict[str, Any]
    decoded: dict[Any, Any] | None = None  # Optuna's (encoded) choice -> the config value

    @property
    def discrete_values(self) -> list[Any] | None:
        """Every value Optuna may pick (None for a continuous range), as Optuna stores them."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        if isinstance(d, IntDistribution):
            return list(range(d.low, d.high + 1, d.step)) if not d.log else list(range(d.low, d.high + 1))
        if isinstance(d, FloatDistribution) and d.step is not None:
            count = int(round((d.high - d.low) / d.step))
            return [d.low + i * d.step for i in range(count + 1)]
        return None

    def suggest(self, trial: optuna.Trial) -> Any:
        """Ask the trial for this key's value; returns the config value (lists decoded)."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            value = trial.suggest_categorical(self.key, d.choices)
            return self.decode(value)
        if isinstance(d, IntDistribution):
            return trial.suggest_int(self.key, d.low, d.high, step=d.step, log=d.log)
        return trial.suggest_float(self.key, d.low, d.high, step=d.step, log=d.log)

    def decode(self, value: Any) -> Any:
        """The config value of an Optuna parameter value."""
        if self.decoded is not None and value in self.decoded:
            return self.decoded[value]
        return value


def parse_param(key: str, spec: Any, where: str = "space") -> SearchParam:
    """Parse one ``space`` entry: ``{choices: [...]}`` or ``{low, high[, step][, log]}``."""
    name = f"{where}.{key}"
    if not isinstance(spec, Mapping):
        raise SweepError(f"{name}: give {{choices: [...]}} or {{low: L, high: H}} (with step or log), "
                         f"not {spec!r}")
    spec = dict(spec)
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise SweepError(f"{name}: choices cannot be combined with {', '.join(extra)}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"{name}: choices must be a non-empty list, e.g. choices: [2, 4]")
        for choice in choices:
            items = choice if isinstance(choice, list) else [choice]
            if not all(v is None or isinstance(v, (bool, int, float, str)) for v in items):
                raise SweepError(f"{name}: choice {choice!r} must be a scalar or a list of scalars")
        decoded = None
        encoded = list(choices)
        if any(isinstance(c, list) for c in choices):
            # Optuna stores scalars only: every choice of a key with list choices becomes a
            # readable string, decoded back through this table.
            encoded = [encode_choice(c) if isinstance(c, list) else _text(c) for c in choices]
            if len(set(encoded)) != len(encoded):
                encoded = [json.dumps(c) for c in choices]
            decoded = dict(zip(encoded, choices))
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise SweepError(f"{name}: choices {choices!r} repeat a value; list each once")
        return SearchParam(key, CategoricalDistribution(encoded), {"choices": choices}, decoded)
    unknown = sorted(set(spec) - set(_RANGE_KEYS))
    if unknown:
        raise SweepError(f"{name}: unknown key {unknown[0]!r}; a range has low, high and optional "
                         f"step or log (or give choices: [...])")
    if "low" not in spec or "high" not in spec:
        raise SweepError(f"{name}: a range needs low and high, e.g. {{low: 1.0e-4, high: 1.0e-2, log: true}}")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    if not _is_number(low) or not _is_number(high):
        raise SweepError(f"{name}: low and high must be numbers, got {low!r} and {high!r}")
    if low > high:
        raise SweepError(f"{name}: low {low} > high {high}; make low <= high")
    if not isinstance(log, bool):
        raise SweepError(f"{name}: log must be true or false, got {log!r}")
    if step is not None and (not _is_number(step) or step <= 0):
        raise SweepError(f"{name}: step must be a positive number, got {step!r}")
    if log and low <= 0:
        raise SweepError(f"{name}: log needs low > 0, got low {low}")
    if log and step is not None:
        raise SweepError(f"{name}: give step or log, not both")
    integer = all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int))
    try:
        if integer:
            distribution: BaseDistribution = IntDistribution(low, high, log=log, step=step or 1)
        else:
            distribution = FloatDistribution(float(low), float(high), log=log,
                                             step=None if step is None else float(step))
    except ValueError as err:
        raise SweepError(f"{name}: {err}") from None
    return SearchParam(key, distribution, {k: spec[k] for k in _RANGE_KEYS if k in spec})


def _named(value: Any, key: str, known: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """``tpe`` or ``{name: tpe, seed: 0, ...}`` -> ("tpe", {"seed": 0, ...})."""
    if isinstance(value, str):
        name, options = value, {}
    elif isinstance(value, Mapping) and isinstance(value.get("name"), str):
        options = {str(k): v for k, v in value.items() if k != "name"}
        name = value["name"]
    else:
        raise SweepError(f"{key}: give a name ({' | '.join(known)}) or {{name: NAME, ...}}, not {value!r}")
    if name not in known:
        raise SweepError(f"{key}: unknown {key} {name!r}; use one of {', '.join(known)}")
    return name, options


def _check_options(cls: type, options: Mapping[str, Any], key: str, managed: tuple[str, ...]) -> None:
    allowed = set(inspect.signature(cls).parameters) - set(managed)
    for option in options:
        if option not in allowed:
            raise SweepError(f"{key}.{option}: not an option of {cls.__name__}; known: "
                             f"{', '.join(sorted(allowed))}")


SAMPLER_CLASSES = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler,
                   "gp": optuna.samplers.GPSampler, "random": optuna.samplers.RandomSampler,
                   "grid": optuna.samplers.GridSampler}
# Set by fvlab itself (seeds per worker, constraints through trial.set_constraint).
SAMPLER_MANAGED = ("seed", "search_space", "constraints_func", "constant_liar")
PRUNER_CLASSES = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
                  "asha": optuna.pruners.SuccessiveHalvingPruner}
# pruner: rungs (fvlab.sweep.rungs, any number of objectives): its options and their defaults.
RUNGS_OPTIONS = {"min_epochs": 1, "reduction_factor": 3, "promotion": "first_front"}
# supernet: {...} (one-shot search): its settings and their defaults; epochs has none.
SUPERNET_OPTIONS = {"epochs": None, "sandwich": 2, "distill": True, "bn_batches": 20}
# The settings a subnet of fvlab.models.supernet may vary (SUBNET_KEYS there), as space keys.
SUPERNET_SPACE_KEYS = tuple(f"model.arch.{k}" for k in ("depths", "window_size", "ct_size", "hat",
                                                         "do_propagation", "dim", "mlp_ratio", "num_heads"))


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    path: Path
    study: str
    experiment: Path
    space: dict[str, SearchParam]
    objectives: dict[str, str]
    constraints: dict[str, float] = field(default_factory=dict)
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    pruner: str | None = None
    pruner_options: dict[str, Any] = field(default_factory=dict)
    n_trials: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # The base experiment's config with the overrides, as build_run resolves it (set by the
    # command once it has built it): trials trained from another base must not join the study.
    base: dict[str, Any] | None = None
    # Optuna's parameter values of the base experiment's own settings: trial 0 of a new study.
    reference: dict[str, Any] | None = None
    # confirm: {seeds: [...]}: the front re-trained with these seeds (not part of the identity).
    confirm_seeds: list[int] | None = None
    # supernet: {epochs, sandwich, distill, bn_batches}, every setting filled in; None: no one-shot search.
    supernet: dict[str, Any] | None = None

    @property
    def directions(self) -> list[str]:
        """Optuna directions, in objective order."""
        return list(self.objectives.values())

    @property
    def grid_size(self) -> int | None:
        """Number of combinations of a grid search (None for other samplers)."""
        if self.sampler != "grid":
            return None
        return math.prod(len(p.discrete_values or []) for p in self.space.values())

    def grid_search_space(self) -> dict[str, list[Any]]:
        """GridSampler's search space: every value of every key, as Optuna stores them."""
        return {key: list(p.discrete_values or []) for key, p in self.space.items()}

    def identity(self) -> dict[str, Any]:
        """What a study is a search of: space, objectives, constraints, the overrides and the resolved
        base config every trial trains from (a rerun may not change them, or trials trained
        differently would mix). How the search runs is not part of it: sampler, pruner, n_trials
        and any later re-training of the front may change between reruns."""
        identity = {"space": {k: p.spec for k, p in self.space.items()},
                    "objectives": [[k, v] for k, v in self.objectives.items()],
                    "constraints": dict(sorted(self.constraints.items())),
                    "overrides": dict(sorted(self.overrides.items())),
                    "base": json.loads(json.dumps(self.base, sort_keys=True, default=str))}
        # The supernet's weights make every trial's values; absent, the identities (and hashes) of
        # studies without one stay what they were.
        if self.supernet is not None:
            identity["supernet"] = dict(sorted(self.supernet.items()))
        return identity

    def identity_hash(self) -> str:
        """Short hash of :meth:`identity`."""
        return stable_hash(self.identity())

    def decode(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna's parameter values of a trial -> config overrides (list choices decoded)."""
        return {key: self.space[key].decode(value) if key in self.space else value
                for key, value in params.items()}

    def uses_throughput(self) -> bool:
        """Whether objectives or constraints depend on measured speed."""
        speed = (THROUGHPUT, LATENCY_MS, SPEEDUP)
        return (any(m in speed for m in self.objectives)
                or any(k in ("min_throughput", "max_latency_ms") for k in self.constraints))


def _resolve_experiment(value: Any, sweep_path: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise SweepError(f"{sweep_path}: experiment: give the base experiment file, "
                         f"e.g. experiment: experiments/baseline.yaml")
    path = Path(value)
    if path.is_absolute() or path.is_file():
        candidate = path
    else:
        candidate = sweep_path.parent / path  # relative to the sweep file, as a fallback
    if not candidate.is_file():
        raise SweepError(f"{sweep_path}: experiment: file not found: {value} (paths are relative "
                         f"to the current directory or to the sweep file)")
    return candidate


def _read_sweep_file(path: Path) -> dict[str, Any]:
    """The sweep file's top-level mapping; SweepError if missing, not YAML, or with an unknown key."""
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path} must be a mapping with experiment, space and objectives")
    unknown = [k for k in raw if k not in _TOP_KEYS]
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r}; a sweep file has {', '.join(_TOP_KEYS)}")
    return raw


def _parse_space(raw: Mapping[str, Any], path: Path) -> dict[str, SearchParam]:
    """``space:``: dotted config key -> search parameter."""
    space_raw = raw.get("space")
    if not isinstance(space_raw, dict) or not space_raw:
        raise SweepError(f"{path}: space must map dotted config keys to distributions, "
                         f"e.g. model.arch.ct_size: {{choices: [1, 2]}}")
    return {str(k): parse_param(str(k), v) for k, v in space_raw.items()}


def _parse_objectives(raw: Mapping[str, Any], path: Path) -> dict[str, str]:
    """``objectives:``: metric -> maximize or minimize."""
    objectives_raw = raw.get("objectives")
    if not isinstance(objectives_raw, dict) or not objectives_raw:
        raise SweepError(f"{path}: objectives must map metric names to maximize or minimize, "
                         f"e.g. {{val/acc1_best: maximize}}")
    objectives: dict[str, str] = {}
    for metric, direction in objectives_raw.items():
        if metric not in METRICS:
            raise SweepError(f"objectives: unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        try:
            objectives[metric] = direction_name(direction)
        except ValueError:
            raise SweepError(f"objectives.{metric}: {direction!r} must be maximize or minimize") from None
    return objectives


def _parse_constraints(raw: Mapping[str, Any], path: Path) -> dict[str, float]:
    """``constraints:``: constraint name -> positive bound."""
    constraints_raw = raw.get("constraints") or {}
    if not isinstance(constraints_raw, dict):
        raise SweepError(f"{path}: constraints must map {', '.join(CONSTRAINTS)} to numbers")
    constraints: dict[str, float] = {}
    for name, bound in constraints_raw.items():
        if name not in CONSTRAINTS:
            raise SweepError(f"constraints: unknown constraint {name!r}; use {', '.join(CONSTRAINTS)}")
        if not _is_number(bound) or bound <= 0:
            raise SweepError(f"constraints.{name}: must be a positive number, got {bound!r}")
        constraints[name] = float(bound)
    return constraints


def _parse_sampler(raw: Mapping[str, Any], space: Mapping[str, SearchParam]) -> tuple[str, dict[str, Any], int]:
    """``sampler:``: (name, options, seed), checked against the sampler's class and, for grid, the space."""
    sampler, sampler_options = _named(raw.get("sampler") or "tpe", "sampler", SAMPLERS)
    seed = sampler_options.pop("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SweepError(f"sampler.seed: must be a non-negative integer, got {seed!r}")
    _check_options(SAMPLER_CLASSES[sampler], sampler_options, "sampler", SAMPLER_MANAGED)
    if sampler == "grid":
        for key, param in space.items():
            if param.discrete_values is None:
                raise SweepError(f"space.{key}: the grid sampler needs discrete values (choices, int "
                                 f"ranges or float ranges with step); {param.spec} is a continuous range")
    return sampler, sampler_options, seed


def _parse_pruner(raw: Mapping[str, Any], objectives: Mapping[str, str]) -> tuple[str | None, dict[str, Any]]:
    """``pruner:``: (name or None, options); Optuna's pruners need one objective reported during training."""
    pruner: str | None = None
    pruner_options: dict[str, Any] = {}
    if raw.get("pruner") is not None:
        pruner, pruner_options = _named(raw["pruner"], "pruner", PRUNERS)
    if pruner == "rungs":
        pruner_options = _check_rungs(pruner_options, objectives)
    elif pruner is not None:
        _check_options(PRUNER_CLASSES[pruner], pruner_options, "pruner", ())
        if len(objectives) > 1:
            raise SweepError(f"pruner: Optuna cannot prune multi-objective studies; use pruner: rungs, "
                             f"remove the pruner or keep one objective (got {', '.join(objectives)})")
        first = next(iter(objectives))
        if first not in TRAINING_METRICS:
            raise SweepError(f"pruner: the pruner follows {first!r}, which is not reported during "
                             f"training; use one of {', '.join(TRAINING_METRICS)} as the objective")
    return pruner, pruner_options


def _merge_overrides(raw: Mapping[str, Any], path: Path, overrides: Mapping[str, Any] | None,
                     space: Mapping[str, SearchParam]) -> dict[str, Any]:
    """The file's ``overrides:`` joined by ``overrides`` (--set); SweepError for a key that is also searched."""
    fixed = raw.get("overrides") or {}
    if not isinstance(fixed, dict):
        raise SweepError(f"{path}: overrides must map dotted config keys to values, e.g. "
                         f"{{trainer.max_epochs: 3}}")
    fixed = {**{str(k): v for k, v in fixed.items()}, **dict(overrides or {})}
    overlap = sorted(set(fixed) & set(space))
    if overlap:
        where = f"--set {overlap[0]}" if overlap[0] in (overrides or {}) else f"overrides.{overlap[0]}"
        raise SweepError(f"{where}: also in space; a key is either searched or fixed")
    return fixed


def load_sweep(path: str | Path, study_name: str | None = None, n_trials: int | None = None,
               overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and check a sweep file (the base experiment's keys are checked by the caller);
    ``overrides`` (``fvlab sweep --set``) replace or join the file's, and so the study's identity."""
    path = Path(path)
    raw = _read_sweep_file(path)
    study = study_name or raw.get("study") or path.stem
    if not isinstance(study, str) or not _STUDY_NAME.match(study):
        raise SweepError(f"{path}: study {study!r} must be a plain directory name (letters, digits, '_', '-', '.')")
    experiment = _resolve_experiment(raw.get("experiment"), path)
    space = _parse_space(raw, path)
    objectives = _parse_objectives(raw, path)
    constraints = _parse_constraints(raw, path)
    sampler, sampler_options, seed = _parse_sampler(raw, space)
    pruner, pruner_options = _parse_pruner(raw, objectives)
    if n_trials is None:
        n_trials = raw.get("n_trials")
    if n_trials is not None and (not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1):
        raise SweepError(f"n_trials: must be a positive integer, got {n_trials!r}")
    fixed = _merge_overrides(raw, path, overrides, space)
    supernet = _check_supernet(raw["supernet"], space, pruner) if raw.get("supernet") is not None else None

    return SweepSpec(path=path, study=study, experiment=experiment, space=space, objectives=objectives,
                     constraints=constraints, sampler=sampler, sampler_options=sampler_options, seed=seed,
                     pruner=pruner, pruner_options=pruner_options, n_trials=n_trials,
                     overrides=fixed,
                     confirm_seeds=_confirm_seeds(raw.get("confirm")), supernet=supernet)


def _check_supernet(block: Any, space: Mapping[str, SearchParam], pruner: str | None) -> dict[str, Any]:
    """``supernet: {epochs, sandwich, distill, bn_batches}`` with defaults; the space must be one that
    weight sharing covers (the subnet settings, discrete values) and trials are not pruned."""
    example = "e.g. supernet: {epochs: 8, sandwich: 2, distill: true, bn_batches: 20}"
    if not isinstance(block, Mapping):
        raise SweepError(f"supernet: give its settings, {example}; got {block!r}")
    for option in block:
        if option not in SUPERNET_OPTIONS:
            raise SweepError(f"supernet.{option}: not a supernet setting; known: {', '.join(SUPERNET_OPTIONS)}")
    settings = {**SUPERNET_OPTIONS, **block}

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if settings["epochs"] is None:
        raise SweepError(f"supernet.epochs: missing; give the supernet's training epochs, {example}")
    if not integer(settings["epochs"]) or settings["epochs"] < 1:
        raise SweepError(f"supernet.epochs: must be a positive integer, got {settings['epochs']!r}")
    if not integer(settings["sandwich"]) or settings["sandwich"] < 0:
        raise SweepError(f"supernet.sandwich: random subnets per step besides the largest and the smallest; "
                         f"must be an integer >= 0, got {settings['sandwich']!r}")
    if not isinstance(settings["distill"], bool):
        raise SweepError(f"supernet.distill: must be true or false, got {settings['distill']!r}")
    if not integer(settings["bn_batches"]) or settings["bn_batches"] < 1:
        raise SweepError(f"supernet.bn_batches: train batches that recalibrate BatchNorm for each evaluated "
                         f"subnet; must be a positive integer, got {settings['bn_batches']!r}")
    for key, param in space.items():
        if key not in SUPERNET_SPACE_KEYS:
            raise SweepError(f"space.{key}: a supernet shares weights over {', '.join(SUPERNET_SPACE_KEYS)} "
                             f"only; fix {key} with overrides, or remove the supernet block")
        if param.discrete_values is None:
            raise SweepError(f"space.{key}: a supernet evaluates discrete subnets; give choices or an int range")
    if pruner is not None:
        raise SweepError("pruner: the trials of a supernet study are evaluations of its subnets (seconds "
                         "each), with nothing to prune; remove the pruner or the supernet block")
    return settings


def _confirm_seeds(confirm: Any) -> list[int] | None:
    """``confirm: {seeds: [1, 2]}``'s seeds, checked (the base's own seed is checked by the command)."""
    if confirm is None:
        return None
    example = "e.g. confirm: {seeds: [1, 2]}"
    if not isinstance(confirm, Mapping) or set(confirm) != {"seeds"}:
        raise SweepError(f"confirm: give the seeds to re-train the front with, {example}")
    seeds = confirm["seeds"]
    if not isinstance(seeds, list) or not seeds or any(
            not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**32 for s in seeds):
        raise SweepError(f"confirm.seeds: a non-empty list of integers in [0, 2**32), {example}; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"confirm.seeds: {seeds} repeats a seed; list each seed once")
    return list(seeds)


def _check_rungs(options: Mapping[str, Any], objectives: Mapping[str, str]) -> dict[str, Any]:
    """``pruner: {name: rungs, ...}``'s options with defaults; every objective must be known at a rung."""
    for option, value in options.items():
        if option not in RUNGS_OPTIONS:
            raise SweepError(f"pruner.{option}: not an option of rungs; known: {', '.join(RUNGS_OPTIONS)}")
        if option == "promotion":
            if value not in PROMOTIONS:
                raise SweepError(f"pruner.promotion: {value!r} is not a promotion rule; use one of "
                                 f"{', '.join(PROMOTIONS)}")
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise SweepError(f"pruner.{option}: must be an integer, got {value!r}")
    checked = {**RUNGS_OPTIONS, **options}
    if checked["min_epochs"] < 1:
        raise SweepError(f"pruner.min_epochs: must be at least 1, got {checked['min_epochs']}")
    if checked["reduction_factor"] < 2:
        raise SweepError(f"pruner.reduction_factor: must be at least 2 (keep the best 1/reduction_factor "
                         f"at each rung), got {checked['reduction_factor']}")
    late = [m for m in objectives if m not in TRAINING_METRICS and not is_model_metric(m)]
    if late:
        raise SweepError(f"pruner: rungs compares objectives at validation; {late[0]!r} is not known there; "
                         f"use {', '.join(TRAINING_METRICS)} or model/* objectives")
    if not any(m in TRAINING_METRICS for m in objectives):
        raise SweepError(f"pruner: rungs needs an objective measured in training ({', '.join(TRAINING_METRICS)}); "
                         f"{', '.join(objectives)} are all known before training")
    return checked


def rung_epochs(min_epochs: int, reduction_factor: int, max_epochs: int | None) -> list[int]:
    """Epochs at which trials are compared: ``min_epochs * reduction_factor**k`` below ``max_epochs``."""
    if max_epochs is None or max_epochs < 0:
        max_epochs = 1000  # Lightning's default when neither max_epochs nor max_steps is set
    epochs, rungs = min_epochs, []
    while epochs < max_epochs:
        rungs.append(epochs)
        epochs *= reduction_factor
    return rungs


def check_rungs_epochs(sweep: SweepSpec, max_epochs: Any, check_val_every_n_epoch: Any = 1,
                       limit_val_batches: Any = None) -> str | None:
    """``pruner: rungs`` needs a validation at every rung (SweepError otherwise); a note when no rung lies
    below the resolved ``trainer.max_epochs`` (e.g. ``--set trainer.max_epochs=1`` for a quick look):
    the trials then run to the end, which is no reason to refuse the sweep."""
    if sweep.pruner != "rungs":
        return None
    min_epochs = sweep.pruner_options["min_epochs"]
    if isinstance(max_epochs, int) and max_epochs >= 0 and min_epochs >= max_epochs:
        return (f"pruner.min_epochs {min_epochs} is not below trainer.max_epochs {max_epochs}: no rung, so no "
                f"trial is stopped early (lower min_epochs or raise max_epochs to prune)")
    if limit_val_batches in (0, 0.0):
        raise SweepError("trainer.limit_val_batches: 0 turns validation off, and pruner: rungs compares trials "
                         "at validation; remove the override or use pruner: null")
    # A rung that falls between validations would be skipped without a word: nothing is pruned there.
    every = check_val_every_n_epoch
    if not isinstance(every, int) or isinstance(every, bool) or every <= 1:
        return None
    rungs = rung_epochs(min_epochs, sweep.pruner_options["reduction_factor"],
                        max_epochs if isinstance(max_epochs, int) else None)
    missed = [r for r in rungs if r % every]
    if missed:
        raise SweepError(f"pruner.min_epochs/pruner.reduction_factor: rung(s) at epoch {', '.join(map(str, missed))} "
                         f"are not validation epochs with trainer.check_val_every_n_epoch {every}, so no trial "
                         f"would be compared there; make min_epochs a multiple of {every} or set "
                         f"trainer.check_val_every_n_epoch: 1")
    return None


def _same_setting(base: Any, choice: Any) -> bool:
    """Whether a base value and a choice set the same thing (a scalar equals the list repeating it)."""
    def scalar_equal(a: Any, b: Any) -> bool:
        return isinstance(a, bool) == isinstance(b, bool) and a == b

    if isinstance(base, (list, tuple)) and isinstance(choice, (list, tuple)):
        return len(base) == len(choice) and all(scalar_equal(a, b) for a, b in zip(base, choice))
    if isinstance(choice, (list, tuple)):
        return bool(choice) and all(scalar_equal(base, c) for c in choice)
    if isinstance(base, (list, tuple)):
        return bool(base) and all(scalar_equal(b, choice) for b in base)
    return scalar_equal(base, choice)


def reference_params(space: Mapping[str, SearchParam], resolved: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's values of the base config's own settings (``resolved``: the built base run's config).

    SweepError naming the key when a base value is not one of its categorical choices or lies
    outside its range: the base experiment must be a point of the space it starts.
    """
    from fvlab.experiment import get_dotted

    params: dict[str, Any] = {}
    for key, param in space.items():
        value = get_dotted(resolved, key, None)
        d = param.distribution
        if isinstance(d, CategoricalDistribution):
            matches = [c for c in d.choices if _same_setting(value, param.decode(c))]
            if not matches:
                raise SweepError(f"space.{key}: the base experiment's value {value!r} is not one of the choices "
                                 f"{[param.decode(c) for c in d.choices]}; add it to the choices (the base is "
                                 f"trial 0 of every study) or change the base with overrides")
            params[key] = matches[0]
            continue
        if not _is_number(value) or not d.low <= value <= d.high:
            raise SweepError(f"space.{key}: the base experiment's value {value!r} lies outside [{d.low}, {d.high}]; "
                             f"widen the range (the base is trial 0 of every study) or change the base with overrides")
        step = getattr(d, "step", None)
        if step is not None and abs((value - d.low) / step - round((value - d.low) / step)) > 1e-9:
            raise SweepError(f"space.{key}: the base experiment's value {value!r} is not on the grid {d.low} + "
                             f"k * {step}; change the step or the base value")
        params[key] = int(value) if isinstance(d, IntDistribution) else float(value)
    return params


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Which sections of two identities differ, and which keys (dotted in the base config)."""
    parts = []
    for section in ("space", "objectives", "constraints", "overrides", "base", "supernet"):
        a, b = old.get(section), new.get(section)
        if json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if section != "base" \
                else changed_keys(a, b)
            shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
            parts.append(f"{'base experiment' if section == 'base' else section} ({shown})")
        else:
            parts.append("base experiment" if section == "base" else section)
    return ", ".join(parts) or "the study's spec"
