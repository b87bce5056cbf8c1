"""The user attributes fvlab sets on Optuna trials and studies, and the one rule for finding the reference trial.

Studies on disk hold these names: a resumed sweep, ``--confirm`` and the report read them back, so
each has one constant here and every module uses it. Metric figures are stored under
``fvlab.metrics.trial_attr(metric)`` instead.

A retry of a failed trial copies the failed attempt's user attributes, so several trials of a
study can carry ``reference``: the failed attempts and the one that completed. Every reader of
the reference (the front's table, confirm, the report, the benchmarks) takes the complete one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names load without optuna: `fvlab sweep --help` and the report import them
    import optuna
    from optuna.trial import FrozenTrial

__all__ = ["REFERENCE", "MEASUREMENT", "RUN_NAME", "RUN_DIR", "DUPLICATE_OF", "CANONICAL_ATTR", "FAIL_REASON",
           "PRUNED_REASON", "PROCESS", "RESUME_FROM", "RESUMED", "SEED", "DEVICE", "PRECISION", "EVALUATED_ON",
           "BN_BATCHES", "RUNG_ATTR", "PRUNED_RUNG_ATTR", "SPEC", "SPEC_HASH", "DEVICE_KIND", "THREADS",
           "SWEEP_FILE", "EXPERIMENT", "ARCH_ATTR", "SCALE_ATTR", "TOGETHER_ATTR", "WORKERS_ATTR",
           "reference_trial", "reference_attempts"]

# ---- trial user attributes ----------------------------------------------------------------------

REFERENCE = "reference"  # True on the base experiment's own settings (trial 0) and its retries
MEASUREMENT = "measurement"  # the key of the architecture measurement whose figures the trial carries
RUN_NAME = "run_name"  # the trial's run directory name (trial_NNNN)
RUN_DIR = "run_dir"  # the attempt's run directory, as a path
DUPLICATE_OF = "duplicate_of"  # the number of the trial this one trains the same as (it was not trained)
CANONICAL_ATTR = "canonical"  # hash of what the trial trains (objective.canonical_key)
FAIL_REASON = "fail_reason"  # why a failed trial failed ("interrupted" after Ctrl-C)
PRUNED_REASON = "pruned_reason"  # why a pruned trial was pruned
PROCESS = "fvlab_process"  # {host, pid, ...} of the worker process running the attempt
RESUME_FROM = "resume_from"  # a retry's earlier attempts' run directories, the latest first
RESUMED = "resumed"  # {checkpoint, global_step} a retry continued from
SEED = "seed"
DEVICE = "device"
PRECISION = "precision"
EVALUATED_ON = "evaluated_on"  # one-shot: the run directory of the supernet the subnet was evaluated on
BN_BATCHES = "bn_batches"  # one-shot: the batches BatchNorm was recalibrated on
RUNG_ATTR = "rung_"  # prefix: "rung_<epochs>" holds the objective values at that rung
PRUNED_RUNG_ATTR = "pruned_rung"  # the epochs of the rung that pruned the trial

# ---- study user attributes ----------------------------------------------------------------------

SPEC = "fvlab_spec"  # the sweep's identity (SweepSpec.identity())
SPEC_HASH = "fvlab_spec_hash"
DEVICE_KIND = "fvlab_device"  # the device kind every throughput of the study was measured on
THREADS = "fvlab_threads"  # the CPU thread count every trial was measured with
SWEEP_FILE = "fvlab_sweep_file"
EXPERIMENT = "fvlab_experiment"  # the base experiment file
ARCH_ATTR = "fvlab_arch:"  # prefix: "fvlab_arch:<key>" holds an architecture's measured figures
SCALE_ATTR = "fvlab_throughput_scale"  # the reference's throughput and latency: the study's one scale
TOGETHER_ATTR = "fvlab_front_together"  # the front and the reference measured side by side after the search
WORKERS_ATTR = "fvlab_workers_started"  # how many workers have claimed an index


def reference_attempts(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial that carries the reference's settings (a failed attempt and its retries), in order."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(REFERENCE)]


def reference_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's reference trial (the base experiment's own settings) once complete, else None."""
    from optuna.trial import TrialState

    return next((t for t in reference_attempts(study) if t.state == TrialState.COMPLETE), None)
