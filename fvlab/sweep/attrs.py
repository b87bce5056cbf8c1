"""The user attributes fvlab sets on Optuna trials, and the one rule for finding the reference trial.

A retry of a failed trial copies the failed attempt's user attributes, so several trials of a
study can carry ``reference``: the failed attempts and the one that completed. Every reader of
the reference (the front's table, confirm, the report, the benchmarks) takes the complete one.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["REFERENCE", "MEASUREMENT", "reference_trial", "reference_attempts"]

REFERENCE = "reference"  # True on the base experiment's own settings (trial 0) and its retries
MEASUREMENT = "measurement"  # the key of the architecture measurement whose figures the trial carries


def reference_attempts(study: optuna.Study) -> list[FrozenTrial]:
    """Every trial that carries the reference's settings (a failed attempt and its retries), in order."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(REFERENCE)]


def reference_trial(study: optuna.Study) -> FrozenTrial | None:
    """The study's reference trial (the base experiment's own settings) once complete, else None."""
    return next((t for t in reference_attempts(study) if t.state == TrialState.COMPLETE), None)
