"""LightningDataModules: scikit-learn digits (the embedded default), image folders, torchvision
datasets, synthetic images, generated same/different glyph pairs (a long-range relation) and
cluttered digits (a task on which architectures differ) and a dense pointer task (segmentation
labels that only global mixing can decide).
Each knows ``num_classes``, ``in_chans`` and ``image_size`` right after construction, and
reports bad configuration as :class:`DataError` before touching data."""

from fvlab.data.base import DataError
from fvlab.data.cluttered import ClutteredDigitsDataModule
from fvlab.data.dense import DensePointerDataModule
from fvlab.data.digits import DigitsDataModule
from fvlab.data.folder import ImageFolderDataModule
from fvlab.data.same_different import SameDifferentDataModule
from fvlab.data.synthetic import SyntheticDataModule
from fvlab.data.torchvision_data import TorchvisionDataModule

__all__ = ["DataError", "ClutteredDigitsDataModule", "DensePointerDataModule", "DigitsDataModule", "ImageFolderDataModule", "SameDifferentDataModule",
           "SyntheticDataModule", "TorchvisionDataModule"]
