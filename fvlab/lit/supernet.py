"""``SupernetClassifier``: trains a weight-sharing FasterViT (``fvlab.models.supernet``) with the
sandwich rule and in-place distillation (BigNAS, arXiv 2003.11142; AttentiveNAS, arXiv 2011.09011).

Each training step runs, on the same batch, the largest subnet, the smallest subnet and
``sandwich`` random subnets of the space. The largest learns from the labels; with ``distill``
the others learn the largest's soft labels (its detached softmax), otherwise the labels too.
The losses are summed and back-propagated once, so one optimiser step sees the gradients of
all of them (as accumulating them subnet by subnet would).
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from fvlab.lit.module import ImageClassifier
from fvlab.metrics import TRAIN_LOSS, TRAIN_LOSS_EPOCH, TRAIN_LOSS_LARGEST, TRAIN_LOSS_SMALLEST, TRAIN_LR
from fvlab.models import ArchConfig
from fvlab.models.supernet import FasterViTSupernet
from fvlab.models.swin import SWIN_VARIANTS

__all__ = ["SupernetClassifier", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against probability ``soft_targets`` (B, classes), batch mean."""
    return -(soft_targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class SupernetClassifier(ImageClassifier):
    """Image classification with a FasterViT supernet over ``space``, trained by the sandwich rule.

    Args:
        space: FasterViT argument (``depths``, ``window_size``, ``ct_size``, ``hat``,
            ``do_propagation``) -> the values it takes, as ``FasterViTSupernet`` reads it.
        sandwich: random subnets per step, besides the largest and the smallest.
        distill: the smaller subnets learn the largest's soft labels (in-place distillation).
        sample_seed: seed of the random subnets (each step's draw depends on it, the epoch and
            the batch index only: the same on every process, and again after a resume).
        **kwargs: ``ImageClassifier``'s arguments (``arch``: the base the space varies).

    The largest and smallest subnets are taken at ``image_size`` when it is given (there, a
    window that makes a stage one window leaves carrier-token weights unused). Validation and
    testing run the largest subnet with the running BatchNorm statistics of training, which mix
    all subnets, or ``evaluated_subnet`` when it is set; an evaluated subnet recalibrates them
    first (``recalibrate_batchnorm``).
    """

    def __init__(self, space: dict[str, list[Any]], sandwich: int = 2, distill: bool = True,
                 sample_seed: int = 0, arch: ArchConfig = ArchConfig(), **kwargs: Any):
        if isinstance(arch, dict):
            arch = ArchConfig(**arch)
        if arch.name in SWIN_VARIANTS:
            raise ValueError(f"model.arch.name: a supernet is a FasterViT; {arch.name} is a Swin")
        if arch.checkpoint_path:
            raise ValueError("model.arch.checkpoint_path: a supernet starts from its own initialisation")
        if kwargs.get("ema") or kwargs.get("compile"):
            # An EMA copy would not follow set_subnet, and compiled graphs would recompile per subnet.
            raise ValueError("model.ema and model.compile are not supported with a supernet")
        if isinstance(sandwich, bool) or not isinstance(sandwich, int) or sandwich < 0:
            raise ValueError(f"sandwich must be an integer >= 0, got {sandwich!r}")
        super().__init__(arch=arch, **kwargs)
        self._extremes: tuple[dict[str, Any], dict[str, Any]] | None = None
        # The subnet validation and testing run (a one-shot trial's); None: the largest.
        self.evaluated_subnet: dict[str, Any] | None = None

    def build_network(self, arch: ArchConfig, **kwargs: Any) -> FasterViTSupernet:
        """The supernet over ``space`` with ``arch`` as its base."""
        return FasterViTSupernet(self.hparams.space, **{**arch.resolved(), **kwargs})

    # ---- the sandwich ------------------------------------------------------------------

    def extreme_subnets(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(largest, smallest) subnet at the data's image size."""
        if self._extremes is None:
            size = self.hparams.image_size
            self._extremes = (self.model.largest_subnet(size), self.model.smallest_subnet(size))
        return self._extremes

    def sandwich_subnets(self, batch_idx: int) -> list[dict[str, Any]]:
        """The subnets of one step: largest, smallest, then ``sandwich`` random ones."""
        rng = random.Random(f"{self.hparams.sample_seed}:{self.current_epoch}:{batch_idx}")
        largest, smallest = self.extreme_subnets()
        return [largest, smallest, *(self.model.sample_subnet(rng) for _ in range(self.hparams.sandwich))]

    def sandwich_losses(self, x: torch.Tensor, target: torch.Tensor, subnets: list[dict[str, Any]]
                        ) -> list[torch.Tensor]:
        """Loss of each subnet on one batch; the first is the teacher (labels), the others learn
        its soft labels with ``distill``. ``target``: labels, or soft targets under mixup."""
        x = self._prepare(x)
        losses, teacher = [], None
        for config in subnets:
            self.model.set_subnet(config)
            logits = self.network(x)
            if teacher is not None and self.hparams.distill:
                losses.append(soft_cross_entropy(logits, teacher))
            elif self.mixup_fn is not None:
                losses.append(self.train_loss(logits, target))
            else:
                losses.append(F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing))
            if teacher is None:
                teacher = logits.detach().softmax(dim=-1)
        self.model.set_subnet(subnets[0])
        return losses

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Sum of the sandwich's losses on one batch."""
        x, y = batch
        target = y
        if self.mixup_fn is not None:
            if x.shape[0] % 2:  # timm's Mixup pairs samples within the batch
                x, y = x[:-1], y[:-1]
            x, target = self.mixup_fn(x, y)
        losses = self.sandwich_losses(x, target, self.sandwich_subnets(batch_idx))
        loss = torch.stack(losses).sum()
        self.check_finite(loss)
        n = x.shape[0]
        self.log(TRAIN_LOSS, loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        self.log(TRAIN_LOSS_EPOCH, loss, on_step=False, on_epoch=True, batch_size=n)
        self.log(TRAIN_LOSS_LARGEST, losses[0], on_step=True, on_epoch=False, batch_size=n)
        self.log(TRAIN_LOSS_SMALLEST, losses[1], on_step=True, on_epoch=False, batch_size=n)
        self.log(TRAIN_LR, self.base_lr(), on_step=True, on_epoch=False, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        """Validate the evaluated subnet, else the largest."""
        self.model.set_subnet(self.evaluated_subnet or self.extreme_subnets()[0])

    def on_test_epoch_start(self) -> None:
        """Test the evaluated subnet, else the largest."""
        self.model.set_subnet(self.evaluated_subnet or self.extreme_subnets()[0])
