"""fvlab: ablation studies and architecture searches of FasterViT.

Importing fvlab registers its FasterViT variants with timm, so that
``timm.create_model("fastervit_0")`` works after ``import fvlab``. Nothing heavy is loaded by the
import itself: the models are registered when timm is loaded (at once if it already is), and
``fvlab.FasterViT``, ``fvlab.create_model``, ``fvlab.ImageClassifier`` load on first use. So
``fvlab.metrics`` and ``fvlab.runs`` are read without torch (the report, the sweep's file checks).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any, Sequence

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


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Loads ``fvlab.models`` (which registers the variants) right after timm is loaded."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: Any = None) -> Any:
        """timm's own spec, its loader made to register fvlab's models once timm is loaded."""
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once: the other finders find timm itself
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            exec_timm(module)
            if "fvlab.models" not in sys.modules:  # else fvlab.models is what imports timm
                importlib.import_module("fvlab.models")

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    importlib.import_module("fvlab.models")
elif not any(type(finder).__name__ == "_RegisterWithTimm" for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())
