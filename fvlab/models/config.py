"""``ArchConfig``: an architecture as a typed config (variant name plus overrides): a FasterViT, or
timm's Swin with HAT (``hat_swin_*``).

Typed fields let LightningCLI/jsonargparse check every key and value of ``model.arch`` in
an experiment file and accept dotted overrides such as ``--model.arch.ct_size 4``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Union

from torch import nn

from fvlab.models.factory import create_model, variant_config

__all__ = ["ArchConfig"]

IntOrList = Optional[Union[int, List[int]]]


@dataclass
class ArchConfig:
    """A FasterViT or a ``hat_swin_*`` model: a named variant (``name``) with any of its arguments
    overridden (a Swin takes timm's arguments: ``embed_dim``, ``img_size``, ``patch_size``, ...,
    plus ``hat``, ``ct_size``, ``do_propagation``; not ``dim``, ``in_dim`` or layer scales).

    Unset fields (None) keep the variant's value. Without ``name`` every architecture field
    falls back to ``FasterViT``'s own defaults. ``layer_scale``/``layer_scale_conv`` of 0
    switch layer scale off. Per-stage fields take one value for all stages or a list.
    ``checkpoint_path``: weights to start from: an official or timm file, or a checkpoint of
    ``fvlab fit`` (``runs/<exp>/<variant>/checkpoints/best.ckpt``; its EMA weights when that
    run used ``model.ema``, as they are the ones its validation and best.ckpt went by).
    """

    name: Optional[str] = "fastervit_tiny"
    dim: Optional[int] = None
    in_dim: Optional[int] = None
    depths: Optional[List[int]] = None
    num_heads: IntOrList = None
    window_size: IntOrList = None
    ct_size: IntOrList = None
    hat: Optional[Union[bool, List[bool]]] = None
    do_propagation: Optional[bool] = None
    mlp_ratio: Optional[float] = None
    layer_scale: Optional[float] = None
    layer_scale_conv: Optional[float] = None
    drop_path_rate: Optional[float] = None
    drop_rate: Optional[float] = None
    attn_drop_rate: Optional[float] = None
    qkv_bias: Optional[bool] = None
    embed_dim: Optional[int] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    checkpoint_path: Optional[str] = None

    def overrides(self) -> dict[str, Any]:
        """The fields that are set, as model arguments (layer scale 0 meaning off)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "checkpoint_path") or value is None:
                continue
            if f.name in ("layer_scale", "layer_scale_conv") and value == 0:
                value = None
            out[f.name] = value
        return out

    def resolved(self) -> dict[str, Any]:
        """Every variant argument this config builds with (variant values plus overrides)."""
        return variant_config(self.name, **self.overrides()) if self.name else self.overrides()

    def build(self, **kwargs: Any) -> nn.Module:
        """Build the model (``kwargs``: e.g. num_classes and in_chans from the data)."""
        return create_model(self.name or None, checkpoint_path=self.checkpoint_path or None,
                            **{**self.overrides(), **kwargs})

