"""The objective of a sweep: one fit run of the base experiment with the trial's sampled settings.

A trial samples its settings, builds the run (an impossible geometry is pruned with the
builder's reason), measures the architecture once (params, GFLOPs, throughput, latency are
shared by every trial with the same architecture), checks the constraints on the built model
(an infeasible trial is pruned, never trained) and then fits through the run library's
``fit_run``; the pruning callback stops a losing run at a validation. Every attempt has its
own run directory, ``trial_NNNN`` after its Optuna trial: a retry continues from a copy of the
checkpoint of the attempt it repeats, whose directory keeps what that attempt wrote.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import lightning.pytorch as pl
import optuna
import torch
from optuna.trial import TrialState

from fvlab.adapters import relocate_checkpoint_state
from fvlab.experiment import model_arguments
from fvlab.lit.build import BadConfig, RunSpec, apply_overrides, build_run
from fvlab.lit.callbacks import StoppingCallback
from fvlab.lit.fit import fit_run, release_memory
from fvlab.lit.measure import MeasurementCache, measure_specs
from fvlab.metrics import (LATENCY_MS, LATENCY_MS_MEASURED, MODEL_TRIAL_ATTRS, SIZE_METRICS, SPEEDUP, TEST_ACC1,
                           TEST_MIOU, THROUGHPUT, THROUGHPUT_HI, THROUGHPUT_LO, THROUGHPUT_MEASURED,
                           THROUGHPUT_MEASURED_HI, THROUGHPUT_MEASURED_LO, TRAIN_LOSS_EPOCH, TRIAL_ATTRS,
                           VAL_ACC1_BEST, VAL_MIOU_BEST)
from fvlab.runs import checkpoint_dir, checkpoint_path, stable_hash, trial_dir_name, without_display_keys
from fvlab.sweep.attrs import (ARCH_ATTR, CANONICAL_ATTR, DEVICE, DUPLICATE_OF, FAIL_REASON, MEASUREMENT,
                               PRECISION, PROCESS, PRUNED_REASON, REFERENCE, RESUMED, RESUME_FROM, RUN_DIR,
                               RUN_NAME, SCALE_ATTR, SEED)
from fvlab.sweep.canonical import canonical_arch, network_identity
from fvlab.sweep.space import CONSTRAINTS, SweepSpec

__all__ = ["canonical_key", "TrialFailed", "PruningCallback", "ArchitectureProfiler", "SweepObjective",
           "continue_attempt"]

log = logging.getLogger(__name__)

DUPLICATE_POLL_S = 2.0  # how often a duplicate of a running trial looks whether it ended


def canonical_key(spec: RunSpec) -> str:
    """Hash of what a run trains: its resolved config, the architecture in the model's own normal
    form (``canonical.canonical_arch``: FasterViT's, hat_swin's) at the data's image size, run names left out. Equal keys
    train the same model the same way.

    At the image size: settings the network ignores there count for nothing, e.g. ``ct_size`` and
    ``do_propagation`` of a HAT stage whose feature map is one window (no carrier tokens)."""
    config = without_display_keys(spec.config)
    for key in ("name", "variant"):
        config.pop(key, None)
    model = model_arguments(config)
    if isinstance(model.get("arch"), dict):
        form = canonical_arch(spec.model.model, getattr(spec.datamodule, "image_size", None))
        model["arch"] = {"checkpoint_path": model["arch"].get("checkpoint_path"),
                         **(form if form is not None else model["arch"])}
    return stable_hash(config)


class TrialFailed(RuntimeError):
    """A trial that ran and failed (an exception in training, NaN, out of memory): recorded FAIL."""


class PruningCallback(StoppingCallback):
    """Reports ``monitor`` to the Optuna trial at each validation and stops the run when it should be pruned.

    ``fit_run`` records ``stopped_status``/``stopped_reason`` in metrics.json; the objective
    then raises ``optuna.TrialPruned``.
    """

    def __init__(self, trial: optuna.Trial, monitor: str, protected: bool = False):
        super().__init__()
        self.trial = trial
        self.monitor = monitor
        self.protected = protected  # reports, never stops (the study's reference trial)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the monitored value; stop the trainer when the pruner says so."""
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        epoch = trainer.current_epoch
        self.trial.report(value, step=epoch)
        if not self.protected and self.trial.should_prune():
            self.stop(trainer, "pruned", f"pruned at epoch {epoch + 1}: {self.monitor}={value:.4f}")


def continue_attempt(earlier: list[str], run_dir: Path) -> tuple[str, int] | None:
    """Copy the newest loadable ``last.ckpt`` (and ``best.ckpt``) of the earlier attempts' directories
    into ``run_dir/checkpoints``, its ModelCheckpoint state pointed there; (last.ckpt, its global step)."""
    for previous in earlier:
        last = checkpoint_path(Path(previous), "last")
        if not last.is_file():
            continue
        try:
            # Our own run directory's file, loaded as Lightning's resume loads it.
            state = torch.load(last, map_location="cpu", weights_only=False)
        except Exception:  # killed while writing it: try an earlier attempt, else start afresh
            continue
        relocate_checkpoint_state(state.get("callbacks") or {}, last.parent, checkpoint_dir(run_dir))
        checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
        best = checkpoint_path(Path(previous), "best")
        if best.is_file():
            shutil.copy2(best, checkpoint_path(run_dir, "best"))
        torch.save(state, checkpoint_path(run_dir, "last"))
        return str(checkpoint_path(run_dir, "last")), int(state.get("global_step", 0))
    return None


# What the cache keeps per architecture: its counts and its side-by-side figures against the
# reference (the throughput of its own moment, and the ratios that carry over to the study's scale).
_RATIOS = ("speedup", "speedup_lo", "speedup_hi", "latency_ratio", "latency_ratio_lo", "latency_ratio_hi")


class ArchitectureProfiler:
    """``model/*`` metrics measured once per architecture, shared by every process through the study.

    Throughput on a shared machine moves 10-30% from one moment to the next, so it is measured side
    by side: each new architecture in interleaved rounds with the base experiment's architecture
    (the reference), in one process, so its speedup (the median of per-round ratios) holds
    whatever the load of that moment. The study keeps one scale:
    the reference's throughput and latency from the first measurement are stored in the study
    (``SCALE_ATTR``), and a trial's ``model/throughput`` (with its interval) and ``model/latency_ms``
    are its ratios to the reference times those stored figures, so trials measured at different
    moments, by different workers under each other's load, compare as if side by side. What the
    trial's own moment read stays under ``model/throughput_measured`` and
    ``model/latency_ms_measured``. Figures are keyed by the network's canonical identity (the form
    that decides duplicates: ``ct_size`` with ``hat: false`` is one network) and the reference's
    (device, precision, threads, backend included), so every trial of one network carries the
    same figures and a study never mixes figures of different identities. A network is measured
    once per study: under the study's lock, so a second worker that starts the same network waits
    for the first's figures instead of measuring again (and measurements never overlap).
    """

    def __init__(self, study: optuna.Study, reference_config: Mapping[str, Any] | None = None,
                 throughput: bool = True, locked: Callable[[], ContextManager[Any]] | None = None):
        self.study = study
        self.reference_config = reference_config
        self.throughput = throughput
        self.locked = locked or contextlib.nullcontext  # the study's lock: the scale is stored once
        self.cache: dict[str, dict[str, Any]] = {}
        self._reference: RunSpec | None = None

    def cached(self, key: str) -> dict[str, Any] | None:
        """Figures already measured for ``key`` (in this process or by another one)."""
        if key not in self.cache or not self._timed(self.cache[key]):
            shared = self.study.user_attrs.get(ARCH_ATTR + key)
            if shared:
                self.cache[key] = dict(shared)
        return self.cache.get(key)

    def _reference_spec(self) -> RunSpec | None:
        if self._reference is None and self.reference_config is not None:
            self._reference = build_run(self.reference_config, None, {"trainer.logger": False})
        return self._reference

    def key(self, spec: RunSpec) -> str:
        """The measurement a run's network gets: its canonical identity's and the reference's."""
        reference = self._reference_spec()
        return MeasurementCache.key(network_identity(spec),
                                    network_identity(reference) if reference is not None else None)

    def cheap(self, spec: RunSpec) -> dict[str, float | None]:
        """Params and GFLOPs (no timing), from the cache when known."""
        known = self.cached(self.key(spec))
        if known is not None:
            return self.on_scale(known)
        return measure_specs({spec.variant: spec}, throughput=False)[spec.variant]

    def _timed(self, figures: Mapping[str, Any] | None) -> bool:
        return figures is not None and (not self.throughput or figures.get("speedup") is not None)

    def measure(self, spec: RunSpec) -> dict[str, float | None]:
        """All model metrics of the run's network on the study's scale, measured next to the
        reference the first time the study sees the network."""
        key = self.key(spec)
        known = self.cached(key)
        if not self._timed(known):
            with self.locked():  # another worker may be measuring it: its figures, once it is done
                known = self.cached(key)
                if not self._timed(known):
                    known = self._measure(spec, key)
        return self.on_scale(known)

    def _measure(self, spec: RunSpec, key: str) -> dict[str, Any]:
        reference = self._reference_spec()
        # The reference trial, however its arch is spelt, is the reference's network: its ratio is 1.
        alone = reference is None or not self.throughput or network_identity(spec) == network_identity(reference)
        specs = {"candidate": spec} if alone else {"reference": reference, "candidate": spec}
        measured = measure_specs(specs, reference=next(iter(specs)), throughput=self.throughput)
        figures: dict[str, Any] = {k: v for k, v in measured["candidate"].items() if k in SIZE_METRICS}
        detail = measured["candidate"].get("throughput") or {}
        if detail:
            figures.update({"throughput": detail["images_per_s"], "throughput_lo": detail["images_per_s_lo"],
                            "throughput_hi": detail["images_per_s_hi"], "latency_ms": detail["latency_ms"]})
            if alone:  # the reference itself: ratio 1, its interval its own spread over rounds
                tp = detail["images_per_s"]
                figures.update(speedup=1.0, speedup_lo=detail["images_per_s_lo"] / tp,
                               speedup_hi=detail["images_per_s_hi"] / tp, latency_ratio=1.0,
                               latency_ratio_lo=None, latency_ratio_hi=None)
                own = detail
            else:
                figures.update({name: detail.get(name) for name in _RATIOS})
                own = measured["reference"].get("throughput") or {}
            if reference is not None and own:
                self._store_scale(own)
        figures["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.cache[key] = figures
        self.study.set_user_attr(ARCH_ATTR + key, figures)
        return figures

    def _store_scale(self, reference: Mapping[str, Any]) -> None:
        """The reference's figures become the study's scale, unless a measurement before this one set
        it (called under the study's lock)."""
        if SCALE_ATTR not in self.study.user_attrs:
            self.study.set_user_attr(SCALE_ATTR, {
                "throughput": reference["images_per_s"], "throughput_lo": reference["images_per_s_lo"],
                "throughput_hi": reference["images_per_s_hi"], "latency_ms": reference["latency_ms"],
                "batch_size": reference.get("batch_size"), "device": reference.get("device"),
                "dtype": reference.get("dtype"), "threads": reference.get("threads"),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def scale(self) -> dict[str, Any] | None:
        """The study's stored reference figures, or None before the first measurement."""
        return self.study.user_attrs.get(SCALE_ATTR)

    def on_scale(self, figures: Mapping[str, Any]) -> dict[str, float | None]:
        """The ``model/*`` metrics of cached figures: throughput and latency on the study's scale,
        the moment's own readings under ``*_measured``."""
        metrics: dict[str, float | None] = {k: figures.get(k) for k in SIZE_METRICS}
        if not self.throughput:
            return metrics
        scale = self.scale() or {}
        tp, latency = scale.get("throughput"), scale.get("latency_ms")

        def times(ratio: Any, base: Any) -> float | None:
            return None if ratio is None or base is None else float(ratio) * float(base)

        metrics.update({
            THROUGHPUT: times(figures.get("speedup"), tp),
            THROUGHPUT_LO: times(figures.get("speedup_lo"), tp),
            THROUGHPUT_HI: times(figures.get("speedup_hi"), tp),
            LATENCY_MS: times(figures.get("latency_ratio"), latency),
            SPEEDUP: figures.get("speedup"),
            THROUGHPUT_MEASURED: figures.get("throughput"),
            THROUGHPUT_MEASURED_LO: figures.get("throughput_lo"),
            THROUGHPUT_MEASURED_HI: figures.get("throughput_hi"),
            LATENCY_MS_MEASURED: figures.get("latency_ms")})
        return metrics


def _constraint_values(constraints: Mapping[str, float], metrics: Mapping[str, float | None]) -> dict[str, float]:
    """Relative violation per constraint (<= 0 feasible), for the constraints whose metric is known."""
    values = {}
    for name, bound in constraints.items():
        metric, kind = CONSTRAINTS[name]
        value = metrics.get(metric)
        if value is None:
            continue
        values[name] = (value / bound - 1.0) if kind == "max" else (1.0 - value / bound)
    return values


class SweepObjective:
    """``objective(trial)``: one fit run with the trial's settings; returns the objectives' values."""

    def __init__(self, sweep: SweepSpec, base_config: Mapping[str, Any], study_dir: Path,
                 profiler: ArchitectureProfiler, locked: Callable[[], ContextManager[Any]] | None = None,
                 recover: Callable[[], Any] | None = None):
        self.sweep = sweep
        self.base_config = dict(base_config)
        self.study_dir = Path(study_dir)
        self.profiler = profiler
        # The study's budget lock (duplicates are claimed under it) and the recovery of trials
        # whose process died (a duplicate must not wait for those forever).
        self.locked = locked or contextlib.nullcontext
        self.recover = recover or (lambda: None)

    def _duplicate(self, trial: optuna.Trial, key: str) -> list[float] | None:
        """The values of an earlier trial of the same configuration (waiting while it runs), or None
        to train; prunes like a pruned original. A failed original is trained again."""
        study = trial.study
        while True:
            with self.locked():
                self.recover()
                same = [t for t in study.get_trials(deepcopy=False)
                        if t.number != trial.number and t.user_attrs.get(CANONICAL_ATTR) == key
                        and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
                done = [t for t in same if t.state != TrialState.RUNNING]
                if not same or done:
                    # Claimed under the lock: a later trial of this configuration finds this one.
                    trial.set_user_attr(CANONICAL_ATTR, key)
                    break
            print(f"[{self.sweep.study}] trial {trial.number}: the same configuration as running trial "
                  f"{same[0].number}; waiting for it", flush=True)
            time.sleep(DUPLICATE_POLL_S)
        if not done:
            return None
        original = min(done, key=lambda t: (t.state != TrialState.COMPLETE, t.number))
        if original.state == TrialState.PRUNED and trial.user_attrs.get(REFERENCE):
            return None  # the reference is never pruned, not even as a duplicate: it trains
        trial.set_user_attr(DUPLICATE_OF, original.number)
        for attr, value in original.user_attrs.items():
            if attr not in (RUN_NAME, RUN_DIR, PROCESS, REFERENCE, DUPLICATE_OF, CANONICAL_ATTR, RESUME_FROM, RESUMED):
                trial.set_user_attr(attr, value)
        for name, value in original.constraints.items():
            trial.set_constraint(name, value)
        if original.state == TrialState.PRUNED:
            self._prune(trial, f"duplicate of trial {original.number}: "
                               f"{original.user_attrs.get(PRUNED_REASON) or 'pruned'}")
        return list(original.values)

    def train_or_copy(self, trial: optuna.Trial, spec: RunSpec) -> list[float] | None:
        """A duplicate's values (not trained), or None when this trial trains."""
        return self._duplicate(trial, canonical_key(spec))

    def __call__(self, trial: optuna.Trial) -> list[float]:
        params = {key: param.suggest(trial) for key, param in self.sweep.space.items()}
        run_name = trial_dir_name(trial.number)  # every attempt its own: a retry has its own number
        run_dir = self.study_dir / run_name
        trial.set_user_attr(RUN_NAME, run_name)
        trial.set_user_attr(RUN_DIR, str(run_dir))
        config = apply_overrides(self.base_config, {**self.sweep.overrides, **params})
        callbacks = []
        # The base experiment's own settings: every front is read against it, so it always trains to the end.
        protected = bool(trial.user_attrs.get(REFERENCE))
        if self.sweep.pruner == "rungs":
            from fvlab.sweep.rungs import RungsCallback

            # The study's RungsPruner decides; model/* values come from the measurement fit_run is given.
            callbacks.append(RungsCallback(trial, list(self.sweep.objectives), protected=protected))
        elif self.sweep.pruner:
            callbacks.append(PruningCallback(trial, next(iter(self.sweep.objectives)), protected=protected))
        try:
            spec = build_run(config, run_dir, experiment=self.sweep.study, variant=run_name,
                             callbacks=callbacks, hparams=params)
        except BadConfig as err:
            self._prune(trial, f"cannot be built: {err}")
        try:
            copied = self.train_or_copy(trial, spec)
            if copied is not None:
                return copied
            trial.set_user_attr(SEED, spec.seed)
            trial.set_user_attr(DEVICE, str(spec.device))
            trial.set_user_attr(PRECISION, spec.precision)
            if any(name in self.sweep.constraints for name in ("max_gflops", "max_params_m")):
                # Over a size budget: pruned without timing it (about a second).
                self._check(trial, self.profiler.cheap(spec))
            metrics = self.measure(trial, spec)
            ckpt_path = None
            if trial.user_attrs.get(RESUME_FROM):  # a retry: continue where the attempt stopped
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                resumed = continue_attempt(list(trial.user_attrs[RESUME_FROM]), run_dir)
                if resumed is not None:
                    ckpt_path = resumed[0]
                    trial.set_user_attr(RESUMED, {"checkpoint": ckpt_path, "global_step": resumed[1]})
            result = fit_run(spec, ckpt_path=ckpt_path, model_metrics=metrics)
        except KeyboardInterrupt:
            trial.set_user_attr(FAIL_REASON, "interrupted")
            raise
        finally:
            spec = None  # noqa: F841  (the trainer, model and data go before the next trial)
            release_memory()
        return self._values(trial, result, metrics)

    def measure(self, trial: optuna.Trial, spec: RunSpec) -> dict[str, float | None]:
        """The network's figures (measured once per study), recorded on the trial with the key of
        the measurement they come from; the constraints checked on them (an infeasible trial is pruned)."""
        metrics = self.profiler.measure(spec)
        trial.set_user_attr(MEASUREMENT, self.profiler.key(spec))
        self._check(trial, metrics)
        return metrics

    def _prune(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr(PRUNED_REASON, reason)
        raise optuna.TrialPruned(reason)

    def _check(self, trial: optuna.Trial, metrics: Mapping[str, float | None]) -> None:
        """Record the model figures and constraints; prune (untrained) when one is violated.

        The reference trial too: its own settings break the user's bound, and a full training of a
        model the user ruled out is not spent (pareto.md says so). Pruners never stop it."""
        for metric, attr in MODEL_TRIAL_ATTRS.items():
            if metrics.get(metric) is not None:
                trial.set_user_attr(attr, metrics[metric])
        already = trial.constraints
        values = _constraint_values(self.sweep.constraints, metrics)
        for name, value in values.items():
            if name not in already:
                trial.set_constraint(name, value)
        violated = [name for name, value in values.items() if value > 0]
        if violated:
            parts = []
            for name in violated:
                metric, kind = CONSTRAINTS[name]
                parts.append(f"{metric}={metrics[metric]:.4g} {'>' if kind == 'max' else '<'} "
                             f"{name} {self.sweep.constraints[name]:g}")
            self._prune(trial, "infeasible, not trained: " + "; ".join(parts))

    def _values(self, trial: optuna.Trial, result: Mapping[str, Any],
                metrics: Mapping[str, float | None]) -> list[float]:
        # The best validation figure and, shown in the tables but never an objective, the test figure.
        for metric in (VAL_ACC1_BEST, TEST_ACC1, VAL_MIOU_BEST, TEST_MIOU):
            if result.get(metric) is not None:
                trial.set_user_attr(TRIAL_ATTRS[metric], result[metric])
        status = result.get("status")
        if status == "pruned":
            self._prune(trial, result.get("error") or "pruned")
        if status != "complete":
            reason = result.get("error") or "failed"
            if "out of memory" in reason.lower():
                trial.set_constraint("memory", 1.0)  # samplers learn to avoid the region
            trial.set_user_attr(FAIL_REASON, reason)
            raise TrialFailed(reason)
        values = []
        for metric in self.sweep.objectives:
            value = result.get(metric, metrics.get(metric))
            if value is None or not math.isfinite(float(value)):
                reason = f"{metric} is {value} (training diverged or the measurement failed)"
                trial.set_user_attr(FAIL_REASON, reason)
                raise TrialFailed(reason)
            values.append(float(value))
        loss = result.get(TRAIN_LOSS_EPOCH)
        if loss is not None and not math.isfinite(float(loss)):
            trial.set_user_attr(FAIL_REASON, f"{TRAIN_LOSS_EPOCH} is {loss}")
            raise TrialFailed(f"{TRAIN_LOSS_EPOCH} is {loss}")
        return values
