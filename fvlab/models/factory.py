"""One way to build a model, as timm does.

``create_model`` here, ``timm.create_model`` and an experiment's ``model.arch`` all reach the
entry point a model file registers with timm (``fastervit.py``, ``swin.py``), which builds with
timm's ``build_model_with_cfg``. What a named variant is built with is resolved here, in one
place: its constructor's defaults, then the variant's arguments, then the caller's overrides.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Mapping

from timm.models import model_entrypoint
from torch import nn

from fvlab.models.checkpoint import load_state_dict_strictly, read_checkpoint
from fvlab.models.fastervit import VARIANTS, FasterViT, _create_fastervit, checkpoint_filter_fn
from fvlab.models.swin import SWIN_VARIANTS, HatSwinTransformer, load_swin_weights

__all__ = ["arch_defaults", "create_model", "effective_arch", "list_variants", "load_checkpoint",
           "variant_config"]

# The name under which a FasterViT with its constructor's own defaults is built (an experiment's
# ``model.arch`` without a ``name``).
PLAIN_FASTERVIT = "fastervit"
# timm's builder options, accepted beside a model's own arguments.
BUILDER_ARGUMENTS = {"features_only", "out_indices", "feature_cls", "feature_cfg", "pretrained_cfg",
                     "pretrained_cfg_overlay", "cache_dir"}


def list_variants() -> list[str]:
    """Names of the built-in variants: FasterViT's, then the ``hat_swin_*`` ones."""
    return [*VARIANTS, *SWIN_VARIANTS]


def _model_class(name: str | None) -> type[nn.Module]:
    return HatSwinTransformer if name in SWIN_VARIANTS else FasterViT


def _constructor_defaults(cls: type) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # a subclass's defaults win over its base's
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params.update({n: p.default for n, p in inspect.signature(init).parameters.items()
                       if p.default is not inspect.Parameter.empty})
    return params


def variant_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The named variant's arguments (FasterViT's or a ``hat_swin_*``) with ``overrides`` applied."""
    if name in SWIN_VARIANTS:
        return {**SWIN_VARIANTS[name], **overrides}
    if name not in VARIANTS:
        raise ValueError(f"unknown FasterViT variant {name!r}; known: {', '.join(list_variants())}")
    return {**VARIANTS[name], **overrides}


def arch_defaults(name: str | None) -> dict[str, Any]:
    """Every constructor argument's value for the named variant (None: FasterViT's own defaults)."""
    variant = SWIN_VARIANTS.get(name or "") or VARIANTS.get(name or "", {})
    return {**_constructor_defaults(_model_class(name)), **variant}


def effective_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """An ``arch`` section with every unset field at the value the built model takes (the named
    variant's, else its constructor's default)."""
    defaults = arch_defaults(arch.get("name"))
    return {k: defaults.get(k) if v is None and k in defaults else v for k, v in arch.items()}


def _check_arguments(name: str | None, kwargs: Mapping[str, Any]) -> None:
    """ValueError naming the arguments the model does not take (beside timm's builder options)."""
    cls = _model_class(name)
    valid = set(_constructor_defaults(cls)) - {"device", "dtype"}
    if cls is FasterViT:
        valid = set(inspect.signature(FasterViT.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - valid - BUILDER_ARGUMENTS)
    if unknown:
        kind = "Swin" if cls is HatSwinTransformer else "FasterViT"
        raise ValueError(f"unknown {kind} argument(s) {', '.join(map(repr, unknown))}; "
                         f"valid: name, checkpoint_path, {', '.join(sorted(valid))}")


def create_model(name: str | None, pretrained: bool = False, checkpoint_path: str | Path | None = None,
                 trust_checkpoint: bool | None = None, **kwargs: Any) -> nn.Module:
    """Build a named variant with ``kwargs`` overriding its arguments (``name`` None: FasterViT with
    its constructor's defaults); load ``checkpoint_path`` (official, timm or ours) if given.

    The model is the one ``timm.create_model(name, pretrained, **kwargs)`` builds, except that an
    argument given as None is kept (timm drops it): ``layer_scale=None`` switches layer scale off.
    A ``hat_swin_*`` variant loads timm's Swin weights, its HAT weights then new (a warning names
    them; ``fvlab.models.swin.load_swin_weights`` also returns them).

    The checkpoint is read as tensors and plain values only; ``trust_checkpoint=True`` loads any
    pickle (it can run code: only for files you trust).
    """
    if name is not None and name not in list_variants():
        raise ValueError(f"unknown FasterViT variant {name!r}; known: {', '.join(list_variants())}")
    _check_arguments(name, kwargs)
    if name is None:
        model = _create_fastervit(PLAIN_FASTERVIT, pretrained, **kwargs)
    else:
        model = model_entrypoint(name)(pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        if isinstance(model, HatSwinTransformer):
            load_swin_weights(model, checkpoint_path, trust_checkpoint=trust_checkpoint)
        else:
            load_checkpoint(model, checkpoint_path, trust_checkpoint=trust_checkpoint)
    return model


def load_checkpoint(model: nn.Module, checkpoint_path: str | Path, use_ema: bool = True,
                    trust_checkpoint: bool | None = None) -> nn.Module:
    """Load a checkpoint file into a FasterViT (its EMA weights if it has them and ``use_ema``),
    raising on any missing, unexpected or misshapen key (``trust_checkpoint``: see read_checkpoint)."""
    checkpoint = read_checkpoint(checkpoint_path, trust_checkpoint=trust_checkpoint)
    load_state_dict_strictly(model, checkpoint_filter_fn(checkpoint, model, use_ema=use_ema), checkpoint_path)
    return model
