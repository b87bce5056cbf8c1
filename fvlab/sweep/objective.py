"""The objective of a sweep: one fit run of the base experiment with the trial's sampled settings.

A trial samples its settings, builds the run (an impossible geometry is pruned with the
builder's reason), measures the architecture once (params, GFLOPs, throughput, latency are
shared by every trial with the same architecture), checks the constraints on the built model
(an infeasible trial is pruned, never trained) and then fits through the run library's
``fit_run``; the pruning callback stops a losing run at a validation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import statistics
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import optuna
import torch

from fvlab.experiment import apply_overrides
from fvlab.lit.runner import BadConfig, RunSpec, build_run, fit_run, plan_run, profile_run, release_memory
from fvlab.metrics import MODEL_METRICS
from fvlab.profile import autocast_for_precision, measure_throughput
from fvlab.sweep.space import CONSTRAINTS, SweepSpec
from fvlab.sweep.storage import process_tag

__all__ = ["TrialFailed", "PruningCallback", "ArchitectureProfiler", "SweepObjective", "device_kind",
           "arch_key", "SPEEDUP_ROUNDS"]

log = logging.getLogger(__name__)

SPEEDUP_ROUNDS = 3
ARCH_ATTR = "fvlab_arch:"
# user_attrs names of the model metrics (DESIGN.md metric -> attribute).
USER_ATTRS = {metric: metric.removeprefix("model/") for metric in (*MODEL_METRICS, "model/speedup")}


class TrialFailed(RuntimeError):
    """A trial that ran and failed (an exception in training, NaN, out of memory): recorded FAIL."""


class PruningCallback(pl.Callback):
    """Reports ``monitor`` to the Optuna trial at each validation and stops the run when it should be pruned.

    ``fit_run`` records ``stopped_status``/``stopped_reason`` in metrics.json; the objective
    then raises ``optuna.TrialPruned``.
    """

    def __init__(self, trial: optuna.Trial, monitor: str):
        self.trial = trial
        self.monitor = monitor
        self.stopped_status: str | None = None
        self.stopped_reason: str | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the monitored value; stop the trainer when the pruner says so."""
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        epoch = trainer.current_epoch
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            self.stopped_status = "pruned"
            self.stopped_reason = f"pruned at epoch {epoch + 1}: {self.monitor}={value:.4f}"
            trainer.should_stop = True


def device_kind(device: torch.device) -> str:
    """What throughput figures are comparable across: the processor model, not its index."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
        return f"cpu: {name}"
    return device.type


def arch_key(spec: RunSpec) -> str:
    """Identity of what throughput depends on: architecture, input geometry, device, precision, threads."""
    config = spec.config
    datamodule = spec.datamodule
    identity = {"arch": (config.get("model") or {}).get("arch"),
                "image_size": getattr(datamodule, "image_size", None),
                "in_chans": getattr(datamodule, "in_chans", None),
                "num_classes": getattr(datamodule, "num_classes", None),
                "channels_last": (config.get("model") or {}).get("channels_last"),
                "device": device_kind(spec.device), "precision": spec.precision,
                "threads": torch.get_num_threads() if spec.device.type == "cpu" else None}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ArchitectureProfiler:
    """``model/*`` metrics measured once per architecture, shared by every process through the study.

    ``model/speedup`` is the candidate's throughput over the reference architecture's (the
    base experiment's), measured in alternating rounds on this device: a busy machine slows
    both alike, so the ratio holds where absolute images/s do not.
    """

    def __init__(self, study: optuna.Study, reference_config: Mapping[str, Any] | None = None,
                 speedup: bool = False):
        self.study = study
        self.reference_config = reference_config
        self.speedup = speedup
        self.cache: dict[str, dict[str, float | None]] = {}
        self._reference: torch.nn.Module | None = None

    def cached(self, key: str) -> dict[str, float | None] | None:
        """Metrics already measured for ``key`` (in this process or by another one)."""
        if key not in self.cache:
            shared = self.study.user_attrs.get(ARCH_ATTR + key)
            if shared:
                self.cache[key] = dict(shared)
        return self.cache.get(key)

    def cheap(self, spec: RunSpec) -> dict[str, float | None]:
        """Params and GFLOPs (no timing), from the cache when known."""
        known = self.cached(arch_key(spec))
        if known is not None:
            return known
        return profile_run(spec, throughput=False)

    def measure(self, spec: RunSpec) -> dict[str, float | None]:
        """All model metrics of the run's architecture (measured the first time it is seen)."""
        key = arch_key(spec)
        known = self.cached(key)
        if known is not None and "model/throughput" in known:
            return known
        metrics = profile_run(spec)
        if self.speedup:
            metrics["model/speedup"] = self._speedup(spec)
        self.cache[key] = metrics
        self.study.set_user_attr(ARCH_ATTR + key, metrics)
        return metrics

    def _reference_network(self) -> torch.nn.Module:
        if self._reference is None:
            assert self.reference_config is not None
            spec = build_run(self.reference_config, None, {"trainer.logger": False})
            self._reference = spec.model.model
        return self._reference

    def _speedup(self, spec: RunSpec) -> float | None:
        image_size = getattr(spec.datamodule, "image_size", None) or 224
        in_chans = getattr(spec.datamodule, "in_chans", None)
        amp, amp_dtype = autocast_for_precision(spec.precision)
        try:
            reference = self._reference_network()
            ratios = []
            for _ in range(SPEEDUP_ROUNDS):
                rates = [measure_throughput(net, image_size, device=spec.device, amp=amp, amp_dtype=amp_dtype,
                                            in_chans=in_chans, warmup=1, repeats=5).images_per_s
                         for net in (reference, spec.model.model)]
                ratios.append(rates[1] / rates[0])
            return statistics.median(ratios)
        except Exception as err:  # a measurement never fails a trial
            log.warning("speedup measurement failed, recorded as null: %s: %s", type(err).__name__, err)
            return None


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
                 profiler: ArchitectureProfiler):
        self.sweep = sweep
        self.base_config = dict(base_config)
        self.study_dir = Path(study_dir)
        self.profiler = profiler
        self.current_trial: int | None = None

    def __call__(self, trial: optuna.Trial) -> list[float]:
        self.current_trial = trial.number
        trial.set_user_attr("fvlab_process", process_tag())
        for stale in ("fail_reason", "pruned_reason"):  # inherited by a retried trial
            if trial.user_attrs.get(stale) is not None:
                trial.set_user_attr(stale, None)
        params = {key: param.suggest(trial) for key, param in self.sweep.space.items()}
        # A retried trial keeps the run directory (and checkpoints) of the trial it repeats.
        run_name = trial.user_attrs.get("run_name") or f"trial_{trial.number:04d}"
        run_dir = self.study_dir / run_name
        trial.set_user_attr("run_name", run_name)
        trial.set_user_attr("run_dir", str(run_dir))
        config = apply_overrides(self.base_config, {**self.sweep.overrides, **params})
        callbacks = []
        if self.sweep.pruner:
            callbacks.append(PruningCallback(trial, next(iter(self.sweep.objectives))))
        try:
            spec = build_run(config, run_dir, experiment=self.sweep.study, variant=run_name,
                             callbacks=callbacks, hparams=params)
        except BadConfig as err:
            self._prune(trial, f"cannot be built: {err}")
        try:
            trial.set_user_attr("seed", spec.seed)
            trial.set_user_attr("device", str(spec.device))
            trial.set_user_attr("precision", spec.precision)
            if any(name in self.sweep.constraints for name in ("max_gflops", "max_params_m")):
                # Over a size budget: pruned without timing it (about a second).
                self._check(trial, self.profiler.cheap(spec))
            metrics = self.profiler.measure(spec)
            self._check(trial, metrics)
            ckpt_path = None
            if (run_dir / "checkpoints" / "last.ckpt").is_file():
                # Only a retried trial finds its directory: resume where it stopped.
                ckpt_path = plan_run(run_dir, spec.config_hash, resume=True).ckpt_path
            result = fit_run(spec, ckpt_path=ckpt_path, model_metrics=metrics)
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        finally:
            spec = None  # noqa: F841  (the trainer, model and data go before the next trial)
            release_memory()
        return self._values(trial, result, metrics)

    def _prune(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("pruned_reason", reason)
        raise optuna.TrialPruned(reason)

    def _check(self, trial: optuna.Trial, metrics: Mapping[str, float | None]) -> None:
        """Record the model figures and constraints; prune (untrained) when one is violated."""
        for metric, attr in USER_ATTRS.items():
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
        if result.get("val/acc1_best") is not None:
            trial.set_user_attr("val_acc1_best", result["val/acc1_best"])
        if result.get("test/acc1") is not None:  # shown in the tables, never an objective
            trial.set_user_attr("test_acc1", result["test/acc1"])
        status = result.get("status")
        if status == "pruned":
            self._prune(trial, result.get("error") or "pruned")
        if status != "complete":
            reason = result.get("error") or "failed"
            if "out of memory" in reason.lower():
                trial.set_constraint("memory", 1.0)  # samplers learn to avoid the region
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        values = []
        for metric in self.sweep.objectives:
            value = result.get(metric, metrics.get(metric))
            if value is None or not math.isfinite(float(value)):
                reason = f"{metric} is {value} (training diverged or the measurement failed)"
                trial.set_user_attr("fail_reason", reason)
                raise TrialFailed(reason)
            values.append(float(value))
        loss = result.get("train/loss_epoch")
        if loss is not None and not math.isfinite(float(loss)):
            trial.set_user_attr("fail_reason", f"train/loss_epoch is {loss}")
            raise TrialFailed(f"train/loss_epoch is {loss}")
        return values
