"""``pruner: {name: rungs, min_epochs: 1, reduction_factor: 3}``: successive halving for any number of objectives.

Optuna prunes single-objective studies only (``Trial.report`` and ``should_prune`` raise in
multi-objective ones), so fvlab keeps its own rungs, in the spirit of ASHA and of syne-tune's
MO-ASHA:

- Rungs sit at ``min_epochs * reduction_factor**k`` epochs, strictly below
  ``trainer.max_epochs`` (a trial that reaches ``max_epochs`` simply completes).
- At the end of a rung's epoch the trial records its objective values there as the user_attr
  ``rung_<epochs>`` (a list in the sweep's objective order): the validation metrics as they
  stand at that epoch (``val/acc1_best`` is the best so far), the architecture-only ones
  (``model/throughput``, ``model/gflops``, ``model/params_m``, ``model/latency_ms``,
  ``model/speedup``) as measured before training. The values live in the study's storage, so
  every worker on every machine (journal file, SQLite, PostgreSQL) reads the same rung.
- Then it ranks every trial that recorded that rung (itself included; FAILED and WAITING trials,
  whose values return with their retry, and told duplicates, which trained nothing, are left
  out): non-dominated sorting on the objectives with their directions, ties within a front
  broken by NSGA-II crowding distance (the front's extremes and sparse regions first, which
  keeps the front's spread and so its hypervolume), then by trial number (earlier first). It
  goes on if it is among the best ``n // reduction_factor`` of the ``n`` trials there; while the
  rung holds fewer than ``reduction_factor`` trials, every trial goes on (asynchronous, like
  ASHA: a trial never waits for others, so early trials are promoted more easily).
- ``promotion`` chooses the ranking, after the alternatives MO-ASHA's literature compares
  (Schmucker et al. 2021, "Multi-objective multi-fidelity hyperparameter optimization with
  application to fairness"; syne-tune's MO-ASHA priorities):

  - ``nsga2``: non-dominated sorting, crowding distance within a front, as above.
  - ``epsilon_net``: non-dominated sorting, and within a front an epsilon-net (Salinas et al.
    2021): the point best on the first objective, then each time the point farthest from those
    taken (objectives scaled to [0, 1] over the rung), so the kept points cover the front evenly.
  - ``first_front`` (the default): ranked like ``nsga2``, but when the rung's Pareto front holds
    more than ``n // reduction_factor`` trials, the whole front goes on (no trade-off is dropped
    on a tie-break; it spends more epochs when many trials are mutually non-dominated). It is
    the default because an early rung's accuracies are noisy: a tie-break within the front
    ranks trials by that noise, and a trial it drops may be one the final front needs.
    benchmarks/search_cost.py measures what each rule saves and keeps of the front.
- A stopped trial's trainer stops with ``stopped_status = "pruned"`` and the reason; ``fit_run``
  writes them into metrics.json with every figure reached, and the objective ends the trial
  PRUNED (user_attrs ``pruned_rung`` = the rung's epochs, ``pruned_reason``).
- The study's reference trial (the base experiment's settings, trial 0) records its rung values
  like any trial, so they count in every decision, but it is never stopped: every front is read
  against it.

What the samplers learn from a stopped trial: with one objective the callback also reports it
at every validation, so TPE ranks a pruned trial by its last intermediate value; with several,
TPE counts pruned trials among the bad ones (intermediate values cannot exist in a
multi-objective study). NSGA-II and GP read complete trials only, and grid counts a stopped
point as visited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from fvlab.lit.callbacks import ModelProfileCallback, StoppingCallback
from fvlab.metrics import is_model_metric
from fvlab.pareto import epsilon_net_order, losses, rank_order
from fvlab.sweep.attrs import DUPLICATE_OF, PRUNED_RUNG_ATTR, RUNG_ATTR
from fvlab.sweep.space import PROMOTIONS, rung_epochs

__all__ = ["RungDecision", "RungsPruner", "RungsCallback", "rung_epochs", "rung_values", "promotion_order",
           "decide"]

# States whose rung values take part in a decision: a FAILED trial's values come back with its
# retry (which copies its user_attrs), so counting it too would count them twice.
_RANKED_STATES = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


def rung_values(trials: Sequence[FrozenTrial], epochs: int) -> dict[int, list[float]]:
    """Trial number -> objective values at the rung, for the trials that take part in its decision."""
    key = f"{RUNG_ATTR}{epochs}"
    found = {}
    for trial in trials:
        values = trial.user_attrs.get(key)
        if values is None or trial.state not in _RANKED_STATES or trial.user_attrs.get(DUPLICATE_OF) is not None:
            continue
        found[trial.number] = [math.nan if v is None else float(v) for v in values]
    return found


@dataclass(frozen=True)
class RungDecision:
    """The verdict on one trial at one rung."""

    epochs: int
    go_on: bool
    rank: int  # 1 = best of the rung
    trials: int  # trials at the rung, this one included
    keep: int  # how many of them go on (0 while the rung is still filling)
    front: int  # 1 = the rung's Pareto front

    def reason(self, values: Mapping[str, float]) -> str:
        """One line for ``pruned_reason`` and the trial's log line."""
        shown = " ".join(f"{name}={value:.4g}" for name, value in values.items())
        return (f"pruned at rung {self.epochs} (epoch {self.epochs}): rank {self.rank} of {self.trials} "
                f"trials there (front {self.front}), only the best {self.keep} go on; {shown}")


def promotion_order(loss: np.ndarray, promotion: str = "nsga2") -> tuple[list[int], list[int]]:
    """(indices best first, front number of each point) of a rung's losses under a rule of ``PROMOTIONS``
    (``first_front`` orders like ``nsga2``; it differs in how many go on, see :func:`decide`)."""
    if promotion not in PROMOTIONS:
        raise ValueError(f"promotion {promotion!r} must be one of {', '.join(PROMOTIONS)}")
    return epsilon_net_order(loss) if promotion == "epsilon_net" else rank_order(loss)


def decide(trials: Sequence[FrozenTrial], number: int, epochs: int, directions: Sequence[Any],
           reduction_factor: int, promotion: str = "first_front") -> RungDecision:
    """Whether trial ``number`` goes on past the rung at ``epochs``, from every trial's recorded values."""
    at_rung = rung_values(trials, epochs)
    if number not in at_rung:
        raise KeyError(f"trial {number} has no values recorded at rung {epochs}")
    numbers = sorted(at_rung)
    loss = losses([at_rung[n] for n in numbers], directions)
    order, front_of = promotion_order(loss, promotion)
    position = order.index(numbers.index(number))
    keep = len(numbers) // reduction_factor
    if promotion == "first_front":
        keep = max(keep, front_of.count(0))
    go_on = len(numbers) < reduction_factor or position < keep
    return RungDecision(epochs=epochs, go_on=go_on, rank=position + 1, trials=len(numbers),
                        keep=keep if len(numbers) >= reduction_factor else 0,
                        front=front_of[numbers.index(number)] + 1)


class RungsPruner(optuna.pruners.BasePruner):
    """Multi-objective successive halving over values kept in trial user_attrs (see the module).

    Given to the study like any pruner (``make_pruner``), but Optuna never asks it in a
    multi-objective study: :class:`RungsCallback` records and decides through it.
    """

    def __init__(self, min_epochs: int = 1, reduction_factor: int = 3, promotion: str = "first_front"):
        if not isinstance(min_epochs, int) or isinstance(min_epochs, bool) or min_epochs < 1:
            raise ValueError(f"min_epochs must be a positive integer, got {min_epochs!r}")
        if not isinstance(reduction_factor, int) or isinstance(reduction_factor, bool) or reduction_factor < 2:
            raise ValueError(f"reduction_factor must be an integer >= 2, got {reduction_factor!r}")
        if promotion not in PROMOTIONS:
            raise ValueError(f"promotion must be one of {', '.join(PROMOTIONS)}, got {promotion!r}")
        self.min_epochs = min_epochs
        self.reduction_factor = reduction_factor
        self.promotion = promotion

    def rungs(self, max_epochs: int | None) -> list[int]:
        """This pruner's rung epochs for a run of ``max_epochs``."""
        return rung_epochs(self.min_epochs, self.reduction_factor, max_epochs)

    def record(self, trial: optuna.Trial, epochs: int, values: Sequence[float]) -> None:
        """Store the trial's objective values at a rung in the study's storage."""
        trial.set_user_attr(f"{RUNG_ATTR}{epochs}", [float(v) for v in values])

    def decide(self, study: optuna.Study, number: int, epochs: int) -> RungDecision:
        """The verdict on trial ``number`` at the rung, read from every trial of the study."""
        return decide(study.get_trials(deepcopy=False), number, epochs, study.directions, self.reduction_factor,
                      self.promotion)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Optuna's interface: whether the trial loses at the last rung it recorded."""
        recorded = [int(key[len(RUNG_ATTR):]) for key in trial.user_attrs
                    if key.startswith(RUNG_ATTR) and key[len(RUNG_ATTR):].isdigit()]
        if not recorded:
            return False
        return not self.decide(study, trial.number, max(recorded)).go_on


class RungsCallback(StoppingCallback):
    """Records the trial's objectives at each rung and stops the run when it loses there.

    ``objectives``: the metric names, in the study's order (the directions are the study's). Architecture-only
    objectives (``model/*``) take the values in ``known`` or, by default, those of the run's
    :class:`~fvlab.lit.callbacks.ModelProfileCallback` (which ``fit_run`` fills with the sweep's
    measurement before training). ``pruner`` defaults to the study's pruner. ``fit_run`` reads
    ``stopped_status``/``stopped_reason`` into metrics.json.
    """

    def __init__(self, trial: optuna.Trial, objectives: Sequence[str],
                 known: Mapping[str, float | None] | None = None, pruner: RungsPruner | None = None,
                 protected: bool = False):
        super().__init__()
        pruner = pruner if pruner is not None else trial.study.pruner
        if not isinstance(pruner, RungsPruner):
            raise TypeError(f"RungsCallback needs a RungsPruner, the study has {type(pruner).__name__}")
        if len(objectives) != len(trial.study.directions):
            raise ValueError(f"{len(objectives)} objectives for a study with {len(trial.study.directions)} directions")
        self.trial = trial
        self.objectives = list(objectives)
        self.known = dict(known or {})
        self.pruner = pruner
        # The study's reference trial: its rung values count in every decision, and it always goes on.
        self.protected = protected
        self.decisions: list[RungDecision] = []
        self._validated: tuple[int, dict[str, float]] | None = None  # (epoch, objective values)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the objectives of this validation (the epoch's last one counts at a rung)."""
        if trainer.sanity_checking:
            return
        profiled = next((c.metrics for c in trainer.callbacks if isinstance(c, ModelProfileCallback)), {})
        values = {}
        for metric in self.objectives:
            if is_model_metric(metric):
                value = self.known.get(metric, profiled.get(metric))
            else:
                value = trainer.callback_metrics.get(metric)
            if value is None:
                return  # not validated on this epoch's data, or a failed measurement: nothing to compare
            values[metric] = float(value)
        self._validated = (trainer.current_epoch, values)
        if len(self.objectives) == 1:
            # One objective: TPE ranks pruned trials by their last intermediate value.
            self.trial.report(next(iter(values.values())), step=trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At a rung: record the values there and stop the trainer when the trial loses."""
        epochs = trainer.current_epoch + 1
        if self._validated is None or self._validated[0] != trainer.current_epoch \
                or epochs not in self.pruner.rungs(trainer.max_epochs):
            return
        values = self._validated[1]
        self.pruner.record(self.trial, epochs, list(values.values()))
        decision = self.pruner.decide(self.trial.study, self.trial.number, epochs)
        self.decisions.append(decision)
        if not decision.go_on and not self.protected:
            self.trial.set_user_attr(PRUNED_RUNG_ATTR, epochs)
            self.stop(trainer, "pruned", decision.reason(values))
