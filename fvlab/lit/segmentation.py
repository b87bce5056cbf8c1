"""``SemanticSegmenter``: the LightningModule of a segmentation run (per-pixel classes).

The network is a :class:`fvlab.models.segmenter.Segmenter` (encoder, smp decoder, smp head);
this module holds the training loop only. Optimisation (timm's optimizers and schedules, layer
decay, EMA, channels_last, compile) is ``ImageClassifier``'s, inherited; the loss is per-pixel
cross-entropy and the metrics are torchmetrics' (``MulticlassJaccardIndex`` for mIoU,
``MulticlassAccuracy`` over pixels). An experiment file picks it with
``model: {class_path: fvlab.lit.SemanticSegmenter, init_args: {...}}``.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from fvlab.lit.callbacks import PredictionGrid
from fvlab.lit.module import ImageClassifier
from fvlab.metrics import (SEGMENTATION, TEST_LOSS, TEST_MIOU, TEST_PIXEL_ACC, VAL_MIOU, VAL_MIOU_BEST,
                           VAL_PIXEL_ACC)
from fvlab.models import ArchConfig
from fvlab.models.segmenter import DECODERS, Segmenter, padded_size

__all__ = ["SemanticSegmenter"]


class SemanticSegmenter(ImageClassifier):
    """Semantic segmentation with a FasterViT or ``hat_swin_*`` encoder and an smp decoder.

    Args:
        arch: the encoder: a variant ``name`` plus overrides, as for classification (built
            without its classifier head).
        decoder: ``mlp`` (SegFormer's all-MLP decoder: no spatial mixing) or ``fpn``.
        decoder_channels: the decoder's width.
        image_grid: validation images shown in TensorBoard each epoch (input, target,
            prediction); 0: none.
        **kwargs: ``ImageClassifier``'s optimisation arguments (lr, scheduler, EMA, ...);
            mixup and cutmix are for image labels and are refused.
    """

    task = SEGMENTATION

    def __init__(self, arch: ArchConfig = ArchConfig(), decoder: str = "mlp", decoder_channels: int = 64,
                 image_grid: int = 4, num_classes: int = 10, in_chans: int = 3,
                 image_size: Optional[int] = None, label_smoothing: float = 0.0, **kwargs: Any):
        if decoder not in DECODERS:
            raise ValueError(f"model.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        if isinstance(decoder_channels, bool) or not isinstance(decoder_channels, int) or decoder_channels < 1:
            raise ValueError(f"model.decoder_channels must be a positive integer, got {decoder_channels!r}")
        if decoder == "fpn" and decoder_channels % 32:  # smp's FPN blocks use GroupNorm with 32 groups
            raise ValueError(f"model.decoder_channels must be a multiple of 32 with the fpn decoder, got "
                             f"{decoder_channels}; e.g. 32 or 64")
        if isinstance(image_grid, bool) or not isinstance(image_grid, int) or image_grid < 0:
            raise ValueError(f"model.image_grid must be an integer >= 0, got {image_grid!r}")
        if kwargs.get("mixup") or kwargs.get("cutmix"):
            raise ValueError("model.mixup and model.cutmix mix image labels; a segmentation run has per-pixel "
                             "labels: set them to 0")
        super().__init__(arch=arch, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                         label_smoothing=label_smoothing, **kwargs)
        self.val_miou = MulticlassJaccardIndex(num_classes, average="macro")
        self.val_pixel_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_miou_best = MaxMetric()
        self.val_miou_best.persistent(True)  # checkpointed, so a resumed run keeps its best
        self.test_miou = MulticlassJaccardIndex(num_classes, average="macro")
        self.test_pixel_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_loss = MeanMetric()
        # The classifier's image-level metrics have no meaning here.
        for name in ("val_acc1", "val_acc5", "val_acc1_best", "test_acc1", "test_acc5"):
            delattr(self, name)

    def build_network(self, arch: ArchConfig, **kwargs: Any) -> torch.nn.Module:
        """The segmenter: ``arch`` as a headless encoder, the chosen decoder and a 1x1 head."""
        num_classes = kwargs.pop("num_classes")
        if "img_size" in kwargs:  # a fixed-size encoder (Swin) is built for the padded input it sees
            kwargs["img_size"] = padded_size(kwargs["img_size"])
        hp = self.hparams  # saved by ImageClassifier.__init__ before it builds the network
        return Segmenter(arch.build(num_classes=0, **kwargs), num_classes, decoder=hp.decoder,
                         decoder_channels=hp.decoder_channels)

    def configure_callbacks(self) -> list[pl.Callback]:
        """The TensorBoard grid of validation images."""
        return [PredictionGrid(self.hparams.image_grid)] if self.hparams.image_grid else []

    # ---- steps -------------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Per-pixel cross-entropy of one batch."""
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.check_finite(loss)
        self.log_training_loss(loss, x.shape[0])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Loss, mIoU and pixel accuracy (of the EMA weights when EMA is on)."""
        x, y = batch
        logits = self.eval_network()(self._prepare(x))
        self.val_loss.update(F.cross_entropy(logits, y), weight=x.shape[0])
        predicted = logits.argmax(1)
        self.val_miou.update(predicted, y)
        self.val_pixel_acc.update(predicted, y)

    def on_validation_epoch_end(self) -> None:
        """Log the epoch's validation metrics and the best mIoU so far."""
        self._end_validation_epoch(VAL_MIOU, self.val_miou, VAL_MIOU_BEST, self.val_miou_best,
                                   {VAL_PIXEL_ACC: self.val_pixel_acc})

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """mIoU, pixel accuracy and loss on the test set."""
        x, y = batch
        logits = self.eval_network()(self._prepare(x))
        predicted = logits.argmax(1)
        self.test_miou.update(predicted, y)
        self.test_pixel_acc.update(predicted, y)
        self.test_loss.update(F.cross_entropy(logits, y), weight=x.shape[0])
        self.log_dict({TEST_MIOU: self.test_miou, TEST_PIXEL_ACC: self.test_pixel_acc, TEST_LOSS: self.test_loss})

    @torch.no_grad()
    def predict_classes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) predicted classes of the evaluation weights."""
        return self.eval_network()(self._prepare(x)).argmax(1)

    def hparams_for_logging(self) -> dict[str, Any]:
        """The classifier's HParams plus the decoder."""
        params = super().hparams_for_logging()
        params.update({"decoder.name": self.hparams.decoder, "decoder.channels": self.hparams.decoder_channels})
        return params
