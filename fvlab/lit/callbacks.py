"""Lightning callbacks of fvlab."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fvlab.lit.tensorboard import register_hparams
from fvlab.profile import count_flops, count_params, measure_throughput

__all__ = ["MODEL_METRICS", "ModelProfileCallback"]

MODEL_METRICS = ("model/params_m", "model/gflops", "model/throughput", "model/latency_ms")


def _network(pl_module: pl.LightningModule) -> torch.nn.Module:
    """The network inside a LightningModule (its ``model`` attribute), or the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, torch.nn.Module) else pl_module


class ModelProfileCallback(pl.Callback):
    """Logs parameters and GFLOPs at fit start, measured throughput and latency at fit end.

    The four ``model/*`` metrics go to every logger as scalars, to ``self.metrics`` and, at
    fit end, to ``trainer.callback_metrics``; with ``log_hparams`` they (and ``hparams_metrics``, e.g. the best
    validation accuracy) are registered with TensorBoard's HParams plugin, next to the
    module's flattened hyperparameters, so its table compares runs.

    Args:
        image_size: input side for FLOPs and throughput (default: the datamodule's
            ``image_size``, else 224).
        throughput: measure throughput and latency at fit end.
        batch_size: throughput batch (default: 128 on CUDA, 32 on CPU).
        repeats: timed repetitions (default: the device's).
        log_hparams: register hyperparameters and metrics with the HParams plugin.
        hparams_metrics: further metric names to register (logged elsewhere).
    """

    def __init__(self, image_size: int | None = None, throughput: bool = True,
                 batch_size: int | None = None, repeats: int | None = None,
                 log_hparams: bool = True, hparams_metrics: tuple[str, ...] = ("val/acc1_best",)):
        super().__init__()
        self.image_size = image_size
        self.throughput = throughput
        self.batch_size = batch_size
        self.repeats = repeats
        self.log_hparams = log_hparams
        self.hparams_metrics = tuple(hparams_metrics)
        self.metrics: dict[str, float] = {}

    def _geometry(self, trainer: pl.Trainer) -> tuple[int, int | None]:
        datamodule = getattr(trainer, "datamodule", None)
        image_size = self.image_size or getattr(datamodule, "image_size", None) or 224
        return image_size, getattr(datamodule, "in_chans", None)

    def _publish(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count parameters and FLOPs, register hparams."""
        if not trainer.is_global_zero:
            return
        image_size, in_chans = self._geometry(trainer)
        network = _network(pl_module)
        self._publish(trainer, {
            "model/params_m": count_params(network) / 1e6,
            "model/gflops": count_flops(network, image_size, in_chans=in_chans),
        })
        if self.log_hparams:
            names = [*self.hparams_metrics, *MODEL_METRICS]
            for logger in trainer.loggers:
                if getattr(logger, "_default_hp_metric", False):
                    rank_zero_warn("TensorBoardLogger(default_hp_metric=True) adds a stray "
                                   "'hp_metric' to the HParams table; pass default_hp_metric=False")
                params = (pl_module.hparams_for_logging() if hasattr(pl_module, "hparams_for_logging")
                          else dict(pl_module.hparams))
                register_hparams(logger, params, names)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure inference throughput and batch-1 latency of the trained network."""
        if not trainer.is_global_zero:
            return
        if self.throughput:
            self._measure(trainer, pl_module)
        # Set last: Lightning resets callback_metrics between epochs.
        for name, value in self.metrics.items():
            trainer.callback_metrics[name] = torch.tensor(value)

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        image_size, in_chans = self._geometry(trainer)
        result = measure_throughput(_network(pl_module), image_size, batch_size=self.batch_size,
                                    device=pl_module.device, repeats=self.repeats,
                                    in_chans=in_chans)
        self.throughput_result = result
        self._publish(trainer, {"model/throughput": result.images_per_s,
                                "model/latency_ms": result.latency_ms})
        for logger in trainer.loggers:
            logger.save()

    def state_dict(self) -> dict[str, Any]:
        """Metrics measured so far (restored on resume)."""
        return {"metrics": dict(self.metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore metrics measured before an interruption."""
        self.metrics.update(state_dict.get("metrics", {}))
