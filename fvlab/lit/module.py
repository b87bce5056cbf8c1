"""``ImageClassifier``: the LightningModule that trains a FasterViT.

The optimisation pieces are timm's: ``create_optimizer_v2`` (AdamW by default, LAMB, SGD,
layer-wise lr decay), ``create_scheduler_v2`` (cosine with warm-up by default), ``Mixup``
(mixup/cutmix with soft targets) and ``ModelEmaV3``. Metrics are torchmetrics'.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from fvlab.metrics import (CLASSIFICATION, TEST_ACC1, TEST_ACC5, TEST_LOSS, TRAIN_LOSS, TRAIN_LOSS_EPOCH, TRAIN_LR,
                           VAL_ACC1, VAL_ACC1_BEST, VAL_ACC5, VAL_LOSS)
from fvlab.models import ArchConfig
from fvlab.models.swin import SWIN_VARIANTS

__all__ = ["ImageClassifier", "NonFiniteLossError", "SCHEDULERS", "check_optimizer_name",
           "check_scheduler_name"]

# The names timm's create_scheduler_v2 accepts (it keeps no list), plus "none": a constant lr.
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "rsqrt", "constant",
              "none")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def _unknown_name(key: str, kind: str, value: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(value.lower(), known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ValueError(f"{key}: unknown {kind} '{value}'{hint}; known: {', '.join(known)}")


def check_optimizer_name(name: str) -> None:
    """Raise ValueError unless timm's create_optimizer_v2 knows ``name`` (optionally ``lookahead_``)."""
    known = list_optimizers()
    parts = name.lower().split("_")
    # timm reads the last part as the optimizer and a leading "lookahead" as its wrapper.
    if parts[-1] not in known or (len(parts) > 1 and (len(parts) > 2 or parts[0] != "lookahead")):
        raise _unknown_name("model.optimizer", "optimizer", name, known + ["lookahead_<name>"])


def check_scheduler_name(name: str) -> None:
    """Raise ValueError unless ``name`` is one of SCHEDULERS."""
    if name not in SCHEDULERS:
        raise _unknown_name("model.scheduler", "scheduler", name, list(SCHEDULERS))


class ImageClassifier(pl.LightningModule):
    """Image classification with a FasterViT.

    Args:
        arch: the architecture: a variant ``name`` plus any FasterViT argument as override.
        num_classes: classes (linked from the data module).
        in_chans: input channels (linked from the data module).
        image_size: input side (linked from the data module); checked against the HAT geometry.
        optimizer: timm optimizer name (``adamw``, ``lamb``, ``sgd`` ...).
        lr: peak learning rate (at ``lr_base_batch`` images per step when that is set).
        lr_base_batch: scale ``lr`` linearly to the global batch used: lr * batch / lr_base_batch,
            with batch = data batch size x devices x nodes x gradient accumulation (None: off).
        weight_decay: decoupled weight decay (not applied to norms, biases, position MLPs).
        momentum: momentum for SGD-like optimizers.
        layer_decay: layer-wise lr decay factor (None: off), via the model's group_matcher.
        scheduler: timm scheduler name (one of ``SCHEDULERS``: ``cosine``, ``step``, ``plateau``
            ...; ``none``: constant lr). Schedules span ``trainer.max_steps`` when that ends
            training before ``trainer.max_epochs``. ``plateau`` decays the lr by ``decay_rate``
            once ``val/acc1`` (``val/miou`` when segmenting) has not improved for more than ``patience_epochs`` epochs; it
            steps once per epoch, whatever ``step_per_batch`` says.
        warmup_epochs: linear warm-up epochs.
        warmup_lr: learning rate at the start of warm-up.
        min_lr: final learning rate of the decay.
        decay_epochs: epochs between decays (``step``; None: timm's default, 90).
        decay_rate: lr factor of each decay (``step``, ``multistep``, ``plateau``).
        patience_epochs: epochs without improvement of ``val/acc1`` before ``plateau`` decays.
        step_per_batch: update the schedule every optimizer step (True) or once per epoch.
        label_smoothing: label smoothing of the cross-entropy.
        mixup: mixup alpha (0: off).
        cutmix: cutmix alpha (0: off).
        mixup_prob: probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        ema: keep an exponential moving average of the weights and validate with it.
        ema_decay: EMA decay per optimizer step (not per micro-batch under gradient accumulation).
        ema_warmup: ramp the EMA decay up from 0 (timm's ``ModelEmaV3(use_warmup=True)``:
            decay 1 - (1 + step)^(-2/3), capped at ``ema_decay``), so a short run or the first epochs
            validate an average of trained weights rather than one still dominated by the
            initial ones; a long run ends at ``ema_decay`` either way.
        channels_last: train in channels_last memory format (faster with AMP on GPUs).
        compile: wrap the network in ``torch.compile``.
    """

    # What the run is selected and compared by (the best checkpoint, tables, sweeps).
    task = CLASSIFICATION

    def __init__(self, arch: ArchConfig = ArchConfig(), num_classes: int = 10, in_chans: int = 3,
                 image_size: Optional[int] = None, optimizer: str = "adamw", lr: float = 1e-3,
                 lr_base_batch: Optional[int] = None,
                 weight_decay: float = 0.05, momentum: float = 0.9,
                 layer_decay: Optional[float] = None, scheduler: str = "cosine",
                 warmup_epochs: float = 0.0, warmup_lr: float = 1e-6, min_lr: float = 1e-6,
                 decay_epochs: Optional[float] = None, decay_rate: float = 0.1,
                 patience_epochs: int = 10, step_per_batch: bool = True,
                 label_smoothing: float = 0.1, mixup: float = 0.0, cutmix: float = 0.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                 ema: bool = False, ema_decay: float = 0.9998, ema_warmup: bool = False,
                 channels_last: bool = False,
                 compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if isinstance(arch, dict):
            arch = ArchConfig(**arch)
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        check_optimizer_name(optimizer)
        check_scheduler_name(scheduler)
        if scheduler == "rsqrt" and warmup_epochs <= 0:  # timm's rsqrt decays from the warm-up's end
            raise ValueError("model.scheduler rsqrt needs model.warmup_epochs > 0, got "
                             f"{warmup_epochs}; set model.warmup_epochs (e.g. 1) or use cosine")
        self.arch = arch
        sized = {}
        if arch.name in SWIN_VARIANTS and arch.img_size is None and image_size is not None:
            sized["img_size"] = image_size  # timm's Swin is built for one size: the data's, unless set
        self.model = self.build_network(arch, num_classes=num_classes, in_chans=in_chans, **sized)
        if image_size is not None:
            self.model.check_image_size(image_size)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Not registered as a submodule: it would duplicate every key of the state dict.
        object.__setattr__(self, "network", torch.compile(self.model) if compile else self.model)
        self.ema = ModelEmaV3(self.model, decay=ema_decay, use_warmup=ema_warmup) if ema else None
        if self.ema is not None:
            # Updated in place, never by autograd: DDP wraps this whole module and would wait
            # for gradients of every parameter that requires one ("parameters that were not
            # used in producing the loss"). Still a child, so checkpoints keep the EMA weights.
            self.ema.requires_grad_(False)
        self._ema_updated_at_step = 0
        self.mixup_fn = (Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                               switch_prob=mixup_switch_prob, label_smoothing=label_smoothing,
                               num_classes=num_classes)
                         if (mixup > 0 or cutmix > 0) else None)
        self.train_loss = SoftTargetCrossEntropy() if self.mixup_fn else None
        top5 = min(5, num_classes)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.val_loss = MeanMetric()
        self.val_acc1_best = MaxMetric()
        self.val_acc1_best.persistent(True)  # checkpointed, so a resumed run keeps its best
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def build_network(self, arch: ArchConfig, **kwargs: Any) -> torch.nn.Module:
        """The network this module trains (``kwargs``: num_classes, in_chans, ...)."""
        return arch.build(**kwargs)

    # ---- forward and steps -------------------------------------------------------------

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the trained network."""
        return self.network(self._prepare(x))

    def eval_network(self) -> torch.nn.Module:
        """The network used for validation and testing: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.network

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy (soft targets under mixup/cutmix) of one batch."""
        x, y = batch
        if self.mixup_fn is not None:
            if x.shape[0] % 2:  # timm's Mixup pairs samples within the batch
                x, y = x[:-1], y[:-1]
            x, soft = self.mixup_fn(x, y)
            loss = self.train_loss(self(x), soft)
        else:
            loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.check_finite(loss)
        self.log_training_loss(loss, x.shape[0])
        return loss

    def log_training_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """Log the step's loss, the epoch's mean loss and the learning rate."""
        self.log(TRAIN_LOSS, loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log(TRAIN_LOSS_EPOCH, loss, on_step=False, on_epoch=True, batch_size=batch_size)
        self.log(TRAIN_LR, self.base_lr(), on_step=True, on_epoch=False, batch_size=batch_size)

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise NonFiniteLossError on every process when the loss is NaN or infinite on any one."""
        # On a GPU the check costs a host sync, so it runs at logging steps only there; every
        # process takes the same branch (same device type, same step), so the vote below never
        # waits for a process that skipped it.
        if loss.device.type != "cpu" and self.global_step % self.trainer.log_every_n_steps:
            return
        finite = bool(torch.isfinite(loss))
        # A process that raised alone would leave its peers waiting in the gradient all-reduce.
        if not self.trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        where = (f"{loss.item()} on process {self.global_rank}" if not finite
                 else "not finite on another process")
        raise NonFiniteLossError(
            f"training loss is {where} at epoch {self.current_epoch}, step {self.global_step}; "
            f"lower model.lr or enable gradient clipping (--trainer.gradient_clip_val 1.0)")

    def on_train_start(self) -> None:
        """Start counting optimizer steps for the EMA where training starts (or resumes)."""
        self._ema_updated_at_step = self.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the EMA weights once per optimizer step, not per accumulated micro-batch."""
        # global_step counts optimizer steps: it moves only on the last micro-batch of an
        # accumulation (Lightning's own WeightAveraging callback keys on it the same way).
        if self.ema is not None and self.global_step > self._ema_updated_at_step:
            self.ema.update(self.model, step=self.global_step)
            self._ema_updated_at_step = self.global_step

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Loss and top-1/top-5 accuracy (of the EMA weights when EMA is on)."""
        x, y = batch
        logits = self.eval_network()(self._prepare(x))
        self.val_loss.update(F.cross_entropy(logits, y), weight=x.shape[0])
        self.val_acc1.update(logits, y)
        self.val_acc5.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        """Log the epoch's validation metrics and the best top-1 so far."""
        self._end_validation_epoch(VAL_ACC1, self.val_acc1, VAL_ACC1_BEST, self.val_acc1_best,
                                   {VAL_ACC5: self.val_acc5})

    def _end_validation_epoch(self, primary: str, metric: Any, best_name: str, best: Any,
                              others: Mapping[str, Any]) -> None:
        """Log the validation loss, ``primary`` and ``others``, then the best ``primary`` so far
        (the sanity check's batches never count towards it); reset them all for the next epoch."""
        value = metric.compute()
        if not self.trainer.sanity_checking:
            best.update(value)
        self.log_dict({VAL_LOSS: self.val_loss.compute(), primary: value,
                       **{name: m.compute() for name, m in others.items()}}, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.log(best_name, best.compute(), prog_bar=True, sync_dist=True)
        for each in (self.val_loss, metric, *others.values()):
            each.reset()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Top-1/top-5 accuracy and loss on the test set."""
        x, y = batch
        logits = self.eval_network()(self._prepare(x))
        self.test_acc1.update(logits, y)
        self.test_acc5.update(logits, y)
        self.log(TEST_LOSS, F.cross_entropy(logits, y), batch_size=x.shape[0], sync_dist=True)
        self.log_dict({TEST_ACC1: self.test_acc1, TEST_ACC5: self.test_acc5})

    # ---- optimisation ------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """timm optimizer and scheduler, stepped per batch or per epoch (plateau: per epoch)."""
        hp = self.hparams
        optimizer = create_optimizer_v2(self.model, opt=hp.optimizer, lr=self.effective_lr(),
                                        weight_decay=hp.weight_decay, momentum=hp.momentum,
                                        layer_decay=hp.layer_decay)
        if hp.scheduler == "none":
            # timm's schedulers apply the layer-decay scales; without one, apply them here.
            for group in optimizer.param_groups:
                group["lr"] *= group.get("lr_scale", 1.0)
            return optimizer
        if hp.scheduler == "plateau":
            # timm's plateau schedule steps per epoch on the monitored metric; Lightning hands
            # the metric to lr_scheduler_step only for configs marked reduce_on_plateau.
            scheduler, _ = create_scheduler_v2(
                optimizer, sched="plateau", warmup_epochs=hp.warmup_epochs, warmup_lr=hp.warmup_lr,
                min_lr=hp.min_lr, decay_rate=hp.decay_rate, patience_epochs=hp.patience_epochs,
                plateau_mode="max")
            return {"optimizer": optimizer, "lr_scheduler": {
                "scheduler": scheduler, "interval": "epoch", "monitor": self.task.monitor,
                "reduce_on_plateau": True, "strict": False}}
        updates_per_epoch, total_updates = self.schedule_length()
        # timm counts in epochs; a run cut short by max_steps ends after a fraction of one.
        epochs = total_updates / updates_per_epoch
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=hp.scheduler,
            num_epochs=epochs if hp.step_per_batch else math.ceil(epochs),
            warmup_epochs=hp.warmup_epochs, warmup_lr=hp.warmup_lr, min_lr=hp.min_lr,
            decay_epochs=hp.decay_epochs, decay_rate=hp.decay_rate,
            step_on_epochs=not hp.step_per_batch, updates_per_epoch=updates_per_epoch)
        interval = "step" if hp.step_per_batch else "epoch"
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def schedule_length(self) -> tuple[int, int]:
        """Optimizer steps per epoch and in the run (max_steps or max_epochs, whichever ends first)."""
        trainer = self.trainer
        total = trainer.estimated_stepping_batches  # already min(max_steps, max_epochs x steps)
        if math.isinf(total):
            raise ValueError(f"model.scheduler '{self.hparams.scheduler}' needs a run length: set "
                             f"trainer.max_epochs or trainer.max_steps, or model.scheduler none")
        total = max(1, int(total))
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()  # as estimated_stepping_batches does without max_epochs
        batches = trainer.num_training_batches
        if math.isinf(batches):  # an iterable dataset without a length: the run is one epoch
            return total, total
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches)), total

    def effective_lr(self) -> float:
        """The peak learning rate, scaled to the global batch when ``lr_base_batch`` is set."""
        hp = self.hparams
        if not hp.lr_base_batch:
            return hp.lr
        datamodule = getattr(self.trainer, "datamodule", None)
        batch = getattr(datamodule, "batch_size", None)
        if batch is None:
            return hp.lr
        global_batch = batch * self.trainer.world_size * self.trainer.accumulate_grad_batches
        return hp.lr * global_batch / hp.lr_base_batch

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step a timm scheduler: by optimizer updates or by epochs (Lightning knows only torch's)."""
        if self.hparams.step_per_batch and self.hparams.scheduler != "plateau":
            scheduler.step_update(num_updates=self.global_step)
        else:
            scheduler.step(epoch=self.current_epoch + 1,
                           metric=None if metric is None else float(metric))

    def base_lr(self) -> float:
        """The learning rate of the head's parameter group: the base rate, not a layer-decayed one."""
        groups = self.trainer.optimizers[0].param_groups
        # Layer decay scales each group by lr_scale; the head's scale is the largest (1.0).
        return max(groups, key=lambda group: group.get("lr_scale", 1.0))["lr"]

    # ---- logging helpers ---------------------------------------------------------------

    def hparams_for_logging(self) -> dict[str, Any]:
        """Flat essentials for TensorBoard's HParams table: resolved arch, optimiser, data."""
        hp = self.hparams
        params: dict[str, Any] = {f"arch.{k}": v for k, v in self.arch.resolved().items()}
        params["arch.name"] = self.arch.name or "custom"
        for key in ("optimizer", "lr", "weight_decay", "scheduler", "warmup_epochs",
                    "label_smoothing", "mixup", "cutmix", "ema", "image_size", "num_classes"):
            params[f"optim.{key}" if key not in ("image_size", "num_classes") else f"data.{key}"] = hp[key]
        try:
            datamodule = getattr(self.trainer, "datamodule", None)
        except RuntimeError:  # not attached to a Trainer
            datamodule = None
        if datamodule is not None:
            params["data.class"] = type(datamodule).__name__
            params["data.batch_size"] = getattr(datamodule, "batch_size", None)
        return params
