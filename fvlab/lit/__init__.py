"""The Lightning layer: LightningModules (classification, segmentation, supernet) and callbacks (thin;
logic lives in plain functions)."""

from fvlab.lit.callbacks import MODEL_METRICS, ModelProfileCallback, PredictionGrid, StoppingCallback
from fvlab.lit.module import ImageClassifier, NonFiniteLossError
from fvlab.lit.segmentation import SemanticSegmenter
from fvlab.lit.supernet import SupernetClassifier

__all__ = ["MODEL_METRICS", "ImageClassifier", "ModelProfileCallback", "NonFiniteLossError", "PredictionGrid",
           "SemanticSegmenter", "StoppingCallback", "SupernetClassifier"]
