"""The Lightning layer: LightningModule and callbacks (thin; logic lives in plain functions)."""

from fvlab.lit.callbacks import MODEL_METRICS, ModelProfileCallback
from fvlab.lit.module import ImageClassifier, NonFiniteLossError
from fvlab.lit.supernet import SupernetClassifier

__all__ = ["MODEL_METRICS", "ImageClassifier", "ModelProfileCallback", "NonFiniteLossError", "SupernetClassifier"]
