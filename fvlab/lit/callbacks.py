"""Lightning callbacks of fvlab."""

from __future__ import annotations

import random
import time
from typing import Any, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fvlab.adapters import tensorboard_adds_hp_metric
from fvlab.lit.tensorboard import register_hparams
from fvlab.metrics import CLASSIFICATION, MODEL_METRICS, TRAIN_LOSS_EPOCH, VAL_IMAGES, VAL_LOSS
from fvlab.profile import model_metrics

__all__ = ["MODEL_METRICS", "ModelProfileCallback", "StoppingCallback", "PredictionGrid", "RNGStateCallback", "EpochSummary",
           "label_colours"]


def _network(pl_module: pl.LightningModule) -> torch.nn.Module:
    """The network inside a LightningModule (its ``model`` attribute), or the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, torch.nn.Module) else pl_module


class StoppingCallback(pl.Callback):
    """A callback that may end a run early and says how: ``fit_run`` records ``stopped_status``
    (e.g. ``pruned``) and ``stopped_reason`` into metrics.json instead of ``complete``."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped_status: str | None = None
        self.stopped_reason: str | None = None

    def stop(self, trainer: pl.Trainer, status: str, reason: str) -> None:
        """Stop the trainer after this epoch, with the status and reason the run records."""
        self.stopped_status, self.stopped_reason = status, reason
        trainer.should_stop = True


class ModelProfileCallback(pl.Callback):
    """Logs parameters, GFLOPs, measured throughput and latency, all before training starts.

    The four ``model/*`` metrics depend on the architecture only, so they are measured once,
    before the fit (``measure``, called by ``fvlab.lit.fit.fit_run``), at fit start under a
    Trainer of one's own, or given, already measured, as ``metrics``; they go to
    every logger as scalars, to ``self.metrics`` and, at fit end, to ``trainer.callback_metrics``.
    A failed measurement is a warning and a None, never a failed run. With ``log_hparams`` the
    metric names (and ``hparams_metrics``, by default the module's task's best validation figure and the test metrics) are registered with
    TensorBoard's HParams plugin next to the module's hyperparameters and ``hparams``.

    Args:
        metrics: already measured ``model/*`` values (e.g. side by side with the experiment's
            other variants); missing ones are measured on their own, before training.
        image_size: input side for FLOPs and throughput (default: the datamodule's
            ``image_size``, else 224).
        throughput: measure throughput and latency.
        batch_size: throughput batch (default: 128 on CUDA, 32 on CPU).
        repeats: timed rounds of the side-by-side protocol (default ``fvlab.profile.SINGLE_ROUNDS``,
            about 3 s on a CPU).
        log_hparams: register hyperparameters and metrics with the HParams plugin.
        hparams_metrics: further metric names to register (logged elsewhere).
        hparams: extra hyperparameters for the HParams table (e.g. the seed, sampled settings).
    """

    def __init__(self, metrics: Mapping[str, float | None] | None = None, image_size: int | None = None,
                 throughput: bool = True, batch_size: int | None = None, repeats: int | None = None,
                 log_hparams: bool = True,
                 hparams_metrics: tuple[str, ...] | None = None,
                 hparams: Mapping[str, Any] | None = None):
        super().__init__()
        self.image_size = image_size
        self.throughput = throughput
        self.batch_size = batch_size
        self.repeats = repeats
        self.log_hparams = log_hparams
        self.hparams_metrics = None if hparams_metrics is None else tuple(hparams_metrics)
        self.hparams = dict(hparams or {})
        self.metrics: dict[str, float | None] = dict(metrics or {})

    def _geometry(self, trainer: pl.Trainer) -> tuple[int, int | None]:
        datamodule = getattr(trainer, "datamodule", None)
        image_size = self.image_size or getattr(datamodule, "image_size", None) or 224
        return image_size, getattr(datamodule, "in_chans", None)

    def missing(self) -> bool:
        """Whether a ``model/*`` figure is still to be measured."""
        return any(name not in self.metrics for name in MODEL_METRICS)

    def measure(self, network: torch.nn.Module, image_size: int, in_chans: int | None,
                device: torch.device, precision: str) -> None:
        """Measure the figures not given yet (``model_metrics``: the side-by-side protocol, one network)."""
        measured = model_metrics(network, self.image_size or image_size, in_chans=in_chans, device=device,
                                 precision=precision, throughput=self.throughput, batch_size=self.batch_size,
                                 repeats=self.repeats)
        self.metrics.update({k: v for k, v in measured.items() if k not in self.metrics})

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure what is still missing, log the metrics, register hparams."""
        if not trainer.is_global_zero:
            return
        if self.missing():  # a Trainer of one's own; fvlab's runs measure before the fit (fit_run)
            image_size, in_chans = self._geometry(trainer)
            self.measure(_network(pl_module), image_size, in_chans, pl_module.device, str(trainer.precision))
        known = {k: v for k, v in self.metrics.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(known, step=trainer.global_step)
        if self.log_hparams:
            task = getattr(pl_module, "task", CLASSIFICATION)
            own = (task.primary, *task.tests) if self.hparams_metrics is None else self.hparams_metrics
            names = [*own, *MODEL_METRICS]
            params = (pl_module.hparams_for_logging() if hasattr(pl_module, "hparams_for_logging")
                      else dict(pl_module.hparams))
            params.update(self.hparams)
            for logger in trainer.loggers:
                if tensorboard_adds_hp_metric(logger):
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


def label_colours(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) RGB colours in [0, 1]: black for class 0 (background), distinct hues after it."""
    import colorsys

    hues = [colorsys.hsv_to_rgb(i / max(num_classes - 1, 1), 0.85, 1.0) for i in range(num_classes - 1)]
    return torch.tensor([(0.0, 0.0, 0.0), *hues])[:num_classes]


class PredictionGrid(pl.Callback):
    """Each epoch, a TensorBoard image ``val/images`` of the same ``count`` validation images:
    one row each of the input, the target classes and the predicted classes (colour per class).

    The images are the first ``count`` of the validation set, so the grid changes only as the
    model does. Rank zero, TensorBoard loggers only; an error here is a warning, never a failed run.
    """

    def __init__(self, count: int = 4):
        super().__init__()
        self.count = count

    def _images(self, trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor] | None:
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "val_set", None)
        if dataset is None or not len(dataset):
            return None
        return dataset.__getitems__(list(range(min(self.count, len(dataset)))))

    def grid(self, pl_module: pl.LightningModule, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The (3, H, W) grid of ``images`` with their ``target`` and the module's predictions."""
        from torchvision.utils import make_grid

        dtype = next(pl_module.parameters()).dtype  # bf16-true or 16-true: the weights' dtype
        predicted = pl_module.predict_classes(images.to(pl_module.device, dtype)).cpu()
        colours = label_colours(int(pl_module.hparams.num_classes))
        target = target.clamp(0, len(colours) - 1)  # an ignore_index (255) drawn as the last class
        grey = images.float().mean(1, keepdim=True)  # the channels' mean: greyscale of RGB too
        low, high = grey.amin(dim=(1, 2, 3), keepdim=True), grey.amax(dim=(1, 2, 3), keepdim=True)
        grey = ((grey - low) / (high - low).clamp_min(1e-6)).expand(-1, 3, -1, -1)
        rows = [grey, colours[target].permute(0, 3, 1, 2), colours[predicted.clamp(0, len(colours) - 1)].permute(0, 3, 1, 2)]
        return make_grid(torch.cat(rows), nrow=len(images), padding=2, pad_value=1.0)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Add the grid to every TensorBoard logger (not during the sanity check)."""
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if trainer.sanity_checking or not trainer.is_global_zero or not loggers:
            return
        try:
            batch = self._images(trainer)
            if batch is None:
                return
            was_training = pl_module.training
            pl_module.eval()
            try:
                grid = self.grid(pl_module, *batch)
            finally:
                pl_module.train(was_training)
            for logger in loggers:
                logger.experiment.add_image(VAL_IMAGES, grid, global_step=trainer.current_epoch)
        except Exception as err:  # a picture never fails a run
            rank_zero_warn(f"the validation image grid failed: {type(err).__name__}: {err}")


class RNGStateCallback(pl.Callback):
    """Saves and restores Python, NumPy and torch RNG states, so a resumed run matches an unbroken one."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Store the generators' states."""
        # Plain lists and tensors only: checkpoints load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["fvlab_rng"] = {
            "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Restore the generators' states."""
        state = checkpoint.get("fvlab_rng")
        if not state:
            return
        random.setstate(state["python"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class EpochSummary(pl.Callback):
    """One line per epoch for non-terminal output (CI logs), instead of a progress bar."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the epoch's losses and accuracies (validation has run by now)."""
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        task = getattr(pl_module, "task", CLASSIFICATION)
        parts = [f"{k}={float(m[k]):.4f}" for k in (TRAIN_LOSS_EPOCH, VAL_LOSS, task.monitor, task.primary)
                 if k in m]
        print(f"[{self.label}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
              f"{' '.join(parts)} ({time.perf_counter() - self.start:.1f}s)", flush=True)
