"""fvlab: ablation studies and architecture searches of FasterViT.

Importing fvlab registers its FasterViT variants with timm, so that
``timm.create_model("fastervit_0")`` works.
"""

from fvlab.models import FasterViT, create_model, list_variants

__version__ = "0.1.0"
__all__ = ["FasterViT", "create_model", "list_variants", "__version__"]
