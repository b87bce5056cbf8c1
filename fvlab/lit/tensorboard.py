"""TensorBoard HParams registration that avoids Lightning's known pitfalls.

The HParams plugin lists a run once its events hold an hparams "session start" summary
naming the metrics to compare; the metric values themselves are read from ordinary
scalars with those tags. Lightning's ``log_hyperparams(params, metrics)`` writes that summary
*and* logs the given values at a step, so calling it again later (with final values) adds a
second summary and stray points; with ``default_hp_metric`` it also invents ``hp_metric``.
Here the summary is written once per run, naming the metrics without logging any value.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from lightning.pytorch.loggers import Logger, TensorBoardLogger

__all__ = ["flatten_hparams", "register_hparams"]


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


def register_hparams(logger: Logger, params: Mapping[str, Any], metric_names: Iterable[str]) -> bool:
    """Write the HParams summary (hparams + metric names) once; True if this call wrote it."""
    if not isinstance(logger, TensorBoardLogger) or getattr(logger, "_fvlab_hparams_done", False):
        return False
    from torch.utils.tensorboard.summary import hparams

    flat = flatten_hparams(params)
    logger.hparams.update(flat)  # saved to hparams.yaml by the logger
    experiment, session_start, session_end = hparams(flat, {name: 0.0 for name in metric_names})
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, session_start, session_end):
        writer.add_summary(summary)
    writer.flush()
    logger._fvlab_hparams_done = True
    return True
