"""The canonical form of an architecture: what a sweep trains and measures once per network.

Two models with equal forms have the same parameter shapes and, with the same weights, the same
outputs, however their arguments were written (``window_size: 2`` or ``[2, 2, 2, 2]``; settings a
stage does not use). ``fvlab sweep`` keys trials (``objective.canonical_key``) and measurements
(:func:`network_identity`) by it.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from timm.models.swin_transformer import SwinTransformer
from torch import nn

from fvlab.lit.build import RunSpec
from fvlab.lit.measure import arch_identity
from fvlab.models.fastervit import NUM_CONV_STAGES, FasterViT
from fvlab.models.swin import HatSwinTransformer

__all__ = ["canonical_arch", "network_identity"]

ImageSize = int | Sequence[int] | None


def canonical_arch(model: nn.Module, image_size: ImageSize = None) -> dict[str, Any] | None:
    """The architecture of ``model`` (a FasterViT, its supernet's active subnet, a ``hat_swin_*``) in
    one normal form; None for a model without one. A segmenter's is its encoder's (its decoder is
    part of ``arch_identity``).

    Without ``image_size``, equal forms give the same outputs at every input size. With it, at that
    size only: a HAT stage whose (padded) feature map is one window there uses no carrier tokens,
    so its ``ct_size`` (any value >= 1: the HAT weights' shapes do not depend on it) and
    ``do_propagation`` are normalised away; it keeps its HAT weights, which a stage without HAT
    (``hat`` off or ``ct_size`` 0) lacks, so those stay two forms (``carrier_weights``).
    """
    from fvlab.models.segmenter import Segmenter

    if isinstance(model, Segmenter):
        model = model.encoder
    if isinstance(model, FasterViT):
        form = _fastervit_form(model)
    elif isinstance(model, HatSwinTransformer):
        form = _swin_form(model)
    else:
        return None
    form["carrier_weights"] = [c > 0 for c in model.ct_size]
    if image_size is not None:
        live = [c if model.carrier_tokens_live(i, image_size) else 0 for i, c in enumerate(model.ct_size)]
        form.update(ct_size=live, do_propagation=form["do_propagation"] and any(live))
    return form


def _fastervit_form(model: FasterViT) -> dict[str, Any]:
    """Settings a stage does not use are None (window and heads of conv stages), carrier tokens 0
    where HAT is off, propagation off without carrier tokens."""
    args = model.model_args
    transformer = [i >= NUM_CONV_STAGES for i in range(len(args["depths"]))]
    return {
        "dim": args["dim"], "in_dim": args["in_dim"], "depths": list(args["depths"]),
        "num_heads": [h if t else None for h, t in zip(args["num_heads"], transformer)],
        "window_size": [w if t else None for w, t in zip(args["window_size"], transformer)],
        "ct_size": list(model.ct_size), "do_propagation": args["do_propagation"] and any(model.ct_size),
        **{key: args[key] for key in ("mlp_ratio", "layer_scale", "layer_scale_conv", "drop_path_rate",
                                      "drop_rate", "attn_drop_rate", "qkv_bias", "in_chans")},
        "num_classes": model.num_classes, "global_pool": model.global_pool}


def _plain(value: Any) -> Any:
    """A constructor argument as a JSON-able value (tuples as lists, classes and functions by name)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return getattr(value, "__qualname__", None) or repr(value)


def _swin_form(model: HatSwinTransformer) -> dict[str, Any]:
    """timm's arguments as the stages were built (per-stage lists, the windows timm fitted to the
    maps), carrier tokens per stage (0 where HAT is off), propagation only with carrier tokens."""
    bound = inspect.signature(SwinTransformer.__init__).bind(None, **model.model_args)
    bound.apply_defaults()
    args = {k: _plain(v) for k, v in bound.arguments.items() if k not in ("self", "device", "dtype")}
    blocks = [stage.blocks[0] for stage in model.layers]
    args.update(
        img_size=list(model.patch_embed.img_size), patch_size=list(model.patch_embed.patch_size),
        embed_dim=[b.dim for b in blocks], depths=[len(stage.blocks) for stage in model.layers],
        num_heads=[b.attn.num_heads for b in blocks],
        head_dim=[b.attn.qkv.out_features // 3 // b.attn.num_heads for b in blocks],
        window_size=[list(b.window_size) for b in blocks], mlp_ratio=[float(b.mlp_ratio) for b in blocks],
        num_classes=model.num_classes, in_chans=model.in_chans, global_pool=model.global_pool)
    return {**args, "ct_size": list(model.ct_size),
            "do_propagation": model.do_propagation and any(model.ct_size)}


def network_identity(spec: RunSpec) -> dict[str, Any]:
    """``arch_identity`` with the architecture in the network's canonical form at the data's image
    size, where it has one: spellings of one network (``window_size: 2`` or ``[2, 2, 2, 2]``) are one."""
    identity = arch_identity(spec)
    form = canonical_arch(spec.model.model, identity["image_size"])
    if form is not None:
        identity["arch"] = form
    return identity
