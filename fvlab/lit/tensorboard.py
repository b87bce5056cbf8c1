"""TensorBoard HParams registration that avoids Lightning's known pitfalls.

The HParams plugin lists a run once its events hold an hparams "session start" summary
naming the metrics to compare; the metric values themselves are read from ordinary
scalars with those tags. Lightning's ``log_hyperparams(params, metrics)`` writes that summary
*and* logs the given values at a step, so calling it again later (with final values) adds a
second summary and stray points; with ``default_hp_metric`` it also invents ``hp_metric``.
Here the summary is written once per run, naming the metrics without logging any value.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Mapping

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from fvlab.adapters import tensorboard_writer_started

__all__ = ["RunLogger", "flatten_hparams", "register_hparams"]


def flatten_hparams(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping to ``{"a.b": value}`` with TensorBoard-friendly values (lists as text)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            flat[name] = "None"
        else:
            flat[name] = str(value)
    return flat


# The loggers that already hold the summary: one summary per run, however often this is called.
_REGISTERED: "weakref.WeakSet[Logger]" = weakref.WeakSet()


def register_hparams(logger: Logger, params: Mapping[str, Any], metric_names: Iterable[str]) -> bool:
    """Write the HParams summary (hparams + metric names) once; True if this call wrote it."""
    if not isinstance(logger, TensorBoardLogger) or logger in _REGISTERED:
        return False
    from torch.utils.tensorboard.summary import hparams

    flat = flatten_hparams(params)
    logger.hparams.update(flat)  # saved to hparams.yaml by the logger
    experiment, session_start, session_end = hparams(flat, {name: 0.0 for name in metric_names})
    # SummaryWriter's public ``file_writer`` (its events file, open from construction): the public
    # ``add_hparams`` would write to a sub-run and log the metrics' values at a step.
    writer = logger.experiment.file_writer
    if writer is None:  # closed by an earlier finalize: the run goes on without its HParams row
        rank_zero_warn("the TensorBoard writer is closed; the HParams table was not written for this run")
        return False
    for summary in (experiment, session_start, session_end):
        writer.add_summary(summary)
    writer.flush()
    _REGISTERED.add(logger)
    return True


class RunLogger(TensorBoardLogger):
    """The run's TensorBoard logger: stays open from fit to the test after it, so a run has one events file.

    Lightning finalizes loggers at the end of every ``fit`` and ``test``; a closed
    SummaryWriter reopens into a second events file. Here finalizing flushes, and
    ``fit_run`` closes the writer with :meth:`close` once the test has been logged.
    """

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush (and save hparams.yaml on success), keeping the writer open."""
        if tensorboard_writer_started(self):  # else asking for it would start an empty events file
            self.experiment.flush()
        if status == "success":
            self.save()

    def close(self) -> None:
        """Close the events file."""
        TensorBoardLogger.finalize(self, "success")
