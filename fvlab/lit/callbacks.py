"""Lightning callbacks of fvlab."""

from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fvlab.lit.tensorboard import register_hparams
from fvlab.metrics import MODEL_METRICS, PRIMARY_METRIC, TEST_METRICS
from fvlab.profile import model_metrics

__all__ = ["MODEL_METRICS", "ModelProfileCallback"]


def _network(pl_module: pl.LightningModule) -> torch.nn.Module:
    """The network inside a LightningModule (its ``model`` attribute), or the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, torch.nn.Module) else pl_module


class ModelProfileCallback(pl.Callback):
    """Logs parameters, GFLOPs, measured throughput and latency, all before training starts.

    The four ``model/*`` metrics depend on the architecture only, so they are measured once,
    at fit start and before the first step (or given, already measured, as ``metrics``), go to
    every logger as scalars, to ``self.metrics`` and, at fit end, to ``trainer.callback_metrics``.
    A failed measurement is a warning and a None, never a failed run. With ``log_hparams`` the
    metric names (and ``hparams_metrics``: best validation accuracy, test metrics) are registered with
    TensorBoard's HParams plugin next to the module's hyperparameters and ``hparams``.

    Args:
        metrics: already measured ``model/*`` values (e.g. by the runner before building the
            trainer); missing ones are measured at fit start.
        image_size: input side for FLOPs and throughput (default: the datamodule's
            ``image_size``, else 224).
        throughput: measure throughput and latency.
        batch_size: throughput batch (default: 128 on CUDA, 32 on CPU).
        repeats: timed repetitions (default: the device's).
        log_hparams: register hyperparameters and metrics with the HParams plugin.
        hparams_metrics: further metric names to register (logged elsewhere).
        hparams: extra hyperparameters for the HParams table (e.g. the seed, sampled settings).
    """

    def __init__(self, metrics: Mapping[str, float | None] | None = None, image_size: int | None = None,
                 throughput: bool = True, batch_size: int | None = None, repeats: int | None = None,
                 log_hparams: bool = True,
                 hparams_metrics: tuple[str, ...] = (PRIMARY_METRIC, *TEST_METRICS),
                 hparams: Mapping[str, Any] | None = None):
        super().__init__()
        self.image_size = image_size
        self.throughput = throughput
        self.batch_size = batch_size
        self.repeats = repeats
        self.log_hparams = log_hparams
        self.hparams_metrics = tuple(hparams_metrics)
        self.hparams = dict(hparams or {})
        self.metrics: dict[str, float | None] = dict(metrics or {})

    def _geometry(self, trainer: pl.Trainer) -> tuple[int, int | None]:
        datamodule = getattr(trainer, "datamodule", None)
        image_size = self.image_size or getattr(datamodule, "image_size", None) or 224
        return image_size, getattr(datamodule, "in_chans", None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure what was not given, log the metrics, register hparams."""
        if not trainer.is_global_zero:
            return
        if any(name not in self.metrics for name in MODEL_METRICS):
            image_size, in_chans = self._geometry(trainer)
            measured = model_metrics(_network(pl_module), image_size, in_chans=in_chans,
                                     device=pl_module.device, precision=str(trainer.precision),
                                     throughput=self.throughput, batch_size=self.batch_size,
                                     repeats=self.repeats)
            self.metrics.update({k: v for k, v in measured.items() if k not in self.metrics})
        known = {k: v for k, v in self.metrics.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(known, step=trainer.global_step)
        if self.log_hparams:
            names = [*self.hparams_metrics, *MODEL_METRICS]
            params = (pl_module.hparams_for_logging() if hasattr(pl_module, "hparams_for_logging")
                      else dict(pl_module.hparams))
            params.update(self.hparams)
            for logger in trainer.loggers:
                if getattr(logger, "_default_hp_metric", False):
                    rank_zero_warn("TensorBoardLogger(default_hp_metric=True) adds a stray "
                                   "'hp_metric' to the HParams table; pass default_hp_metric=False")
                register_hparams(logger, params, names)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Expose the metrics in ``trainer.callback_metrics`` (Lightning resets it between epochs)."""
        if not trainer.is_global_zero:
            return
        for name, value in self.metrics.items():
            if value is not None:
                trainer.callback_metrics[name] = torch.tensor(value)

    def state_dict(self) -> dict[str, Any]:
        """Metrics measured so far (restored on resume)."""
        return {"metrics": dict(self.metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore metrics measured before an interruption, unless given anew."""
        for name, value in state_dict.get("metrics", {}).items():
            self.metrics.setdefault(name, value)
