"""fvlab: ablation studies and architecture searches of FasterViT.

As timm's out-of-tree models do, importing the models module registers them: after
``import fvlab.models`` (or the first use of ``fvlab.create_model``/``fvlab.FasterViT``),
``timm.create_model("fastervit_0")`` works. ``import fvlab`` itself loads nothing heavy:
``fvlab.FasterViT``, ``fvlab.create_model``, ``fvlab.ImageClassifier`` load on first use, so
``fvlab.metrics`` and ``fvlab.runs`` are read without torch (the report, the sweep's file checks).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["FasterViT", "ImageClassifier", "create_model", "list_variants", "__version__"]

# Public name -> the module that defines it.
_LAZY = {"FasterViT": "fvlab.models", "create_model": "fvlab.models", "list_variants": "fvlab.models",
         "ImageClassifier": "fvlab.lit.module"}


def __getattr__(name: str) -> Any:
    """The public names, each loaded from its module on first access."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fvlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazy ones included."""
    return sorted({*globals(), *__all__})
