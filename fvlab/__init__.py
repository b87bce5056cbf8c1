"""fvlab: ablation studies and architecture searches of FasterViT.

Importing fvlab registers its FasterViT variants with timm, so that
``timm.create_model("fastervit_0")`` works. The Lightning layer (``fvlab.ImageClassifier``)
is imported on first use, so the model alone does not pull in Lightning.
"""

from typing import Any

from fvlab.models import FasterViT, create_model, list_variants

__version__ = "0.1.0"
__all__ = ["FasterViT", "ImageClassifier", "create_model", "list_variants", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy access to the Lightning layer."""
    if name == "ImageClassifier":
        from fvlab.lit.module import ImageClassifier
        return ImageClassifier
    raise AttributeError(f"module 'fvlab' has no attribute {name!r}")
