"""HAT in timm's Swin Transformer: ``hat_<timm swin name>`` models.

``HatSwinTransformer`` is timm's ``SwinTransformer`` with Hierarchical Attention per stage
(``hat``, ``ct_size``, ``do_propagation``), from the one mechanism of ``hat.py``. With HAT off it
*is* timm's model: nothing is replaced, so keys, weights and logits are timm's. A HAT stage keeps
timm's downsample and blocks (their keys unchanged, so timm's Swin weights load) and adds a
carrier-token initialiser (``layers.<i>.global_tokenizer``) and, per regular-window block,
the carrier attention (``layers.<i>.carriers.<block>.hat_*``).

Shifted windows: carrier tokens join the *regular* (unshifted) blocks only; the shifted blocks
run timm's SW-MSA unchanged, and the carrier tokens pass them untouched. A carrier token is
pooled from one regular window, and no shifted window matches one: each straddles four regular
windows, and the cyclic shift's wrapped windows hold pieces of opposite map edges that Swin's
mask keeps apart, which an unmasked carrier token would join again. Carrier tokens add the
long-range path; the shift keeps the neighbour-to-neighbour one it already gave.

Carrier tokens follow FasterViT's rule (``hat.by_one_window_rule``): only where a stage's map,
padded to whole windows, spans more than one window (timm shrinks a window to a smaller map,
which is then one window).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.layers import to_ntuple, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage
from timm.models.swin_transformer import checkpoint_filter_fn as timm_swin_filter_fn

from fvlab.models.checkpoint import CheckpointMismatchError, read_checkpoint, unwrap_state_dict
from fvlab.models.hat import (CarrierTokenAttention, TokenInitializer, by_one_window_rule, hidden_prefix_bias,
                              join_carrier_tokens, split_carrier_tokens, windows_spanned)
from fvlab.models.layers import WindowStage, pad_to_windows, window_partition, window_reverse
from fvlab.models.tracing import spatial_size

__all__ = ["HatSwinTransformer", "HatSwinStage", "SWIN_VARIANTS", "load_swin_weights"]

_logger = logging.getLogger(__name__)

# timm's own arguments of each Swin this module puts HAT into (timm's registry holds the same).
SWIN_VARIANTS: dict[str, dict[str, Any]] = {
    "hat_swin_tiny_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2),
                                             num_heads=(3, 6, 12, 24)),
    "hat_swin_small_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2),
                                              num_heads=(3, 6, 12, 24)),
    "hat_swin_base_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2),
                                             num_heads=(4, 8, 16, 32)),
    "hat_swin_base_patch4_window12_384": dict(img_size=384, patch_size=4, window_size=12, embed_dim=128,
                                              depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "hat_swin_large_patch4_window7_224": dict(patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2),
                                              num_heads=(6, 12, 24, 48)),
}


class CarrierTokens(CarrierTokenAttention, nn.Module):
    """The HAT weights of one regular-window Swin block (the shared mechanism, hosted on its own)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, ct_size: int, mlp_ratio: float,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_path: float, propagate: bool):
        super().__init__()
        self.init_carrier_attention(dim=dim, num_heads=num_heads, window_size=window_size, ct_size=ct_size,
                                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                                    drop_path=drop_path, propagate=propagate)


def _map_size(x: torch.Tensor) -> tuple[Any, Any]:
    """(H, W) of a (B, H, W, C) map, as ``layers.spatial_size`` gives them (ints under torch.jit.trace,
    so that fvcore's count keeps the eval-mode caches of the position terms)."""
    return spatial_size(x.permute(0, 3, 1, 2))


def attend_with_carrier_tokens(attn: nn.Module, tokens: torch.Tensor, n_prefix: int,
                               key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm's window attention over (B*nw, n_prefix + ws*ws, C) tokens whose first ``n_prefix`` are
    carrier tokens: Swin's relative position bias between window tokens, none with a carrier token
    (as FasterViT's local attention). ``key_bias`` (n,): added to each key's logits."""
    b, n, c = tokens.shape
    qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    area = attn.window_area
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(area, area, -1)
    bias = F.pad(bias.permute(2, 0, 1), (n_prefix, 0, n_prefix, 0)).unsqueeze(0).to(q.dtype)
    if key_bias is not None:
        bias = bias + key_bias.to(bias.dtype)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(x.transpose(1, 2).reshape(b, n, -1)))


def hat_swin_block(block: SwinTransformerBlock, carrier: CarrierTokens, x: torch.Tensor, ct: torch.Tensor,
                   carrier_grid: tuple[int, int], live: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One regular-window timm block with carrier tokens: (B, H, W, C) map and carrier tokens updated.

    As timm's block (norm, pad after the norm, window attention, residual, MLP), except that each
    window attends over [its carrier tokens, its tokens], and the carrier tokens take the same
    residual attention and MLP steps, after their global attention.
    """
    h, w = _map_size(x)
    ws = block.window_size[0]
    ct = carrier.carrier_global_attention(ct, carrier_grid)
    normed = pad_to_windows(block.norm1(x).permute(0, 3, 1, 2), ws).permute(0, 2, 3, 1)
    hp, wp = _map_size(normed)
    tokens, n_ct = join_carrier_tokens(window_partition(normed, ws), block.norm1(ct), carrier.ct_size)
    key_bias = hidden_prefix_bias(live, n_ct, ws * ws) if live is not None else None
    out = attend_with_carrier_tokens(block.attn, tokens, n_ct, key_bias)
    windows, ct_out, _ = split_carrier_tokens(out, n_ct, ct)
    x = x + block.drop_path1(window_reverse(windows, ws, hp, wp)[:, :h, :w, :])
    ct = ct + block.drop_path1(ct_out)
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    ct = ct + block.drop_path2(block.mlp(block.norm2(ct)))
    return x, ct


class HatSwinStage(SwinTransformerStage):
    """A timm Swin stage with carrier tokens, built from timm's stage: its downsample and blocks are
    kept as they are (same keys), the carrier-token initialiser and per-block HAT weights added."""

    def __init__(self, stage: SwinTransformerStage, ct_size: int, do_propagation: bool = False):
        nn.Module.__init__(self)  # timm's stage is adopted, not rebuilt
        self.dim = stage.dim
        self.input_resolution = stage.input_resolution
        self.output_resolution = stage.output_resolution
        self.depth = stage.depth
        self.grad_checkpointing = stage.grad_checkpointing
        self.downsample = stage.downsample
        self.blocks = stage.blocks
        self.ct_size = ct_size
        first = self.blocks[0]
        dim, window = first.dim, first.window_size
        if window[0] != window[1]:
            raise ValueError(f"HAT needs square windows; this stage's are {window[0]}x{window[1]}")
        if ct_size > window[0]:
            raise ValueError(f"ct_size={ct_size} exceeds the stage's window_size={window[0]}: carrier tokens "
                             f"are pooled from their window, so use ct_size <= window_size")
        regular = [i for i, blk in enumerate(self.blocks) if not any(blk.target_shift_size)]
        self.propagate = do_propagation
        self.global_tokenizer = TokenInitializer(dim=dim, window_size=window[0], ct_size=ct_size)
        self.carriers = nn.ModuleDict({str(i): CarrierTokens(
            dim=dim, num_heads=self.blocks[i].attn.num_heads, window_size=window[0], ct_size=ct_size,
            mlp_ratio=self.blocks[i].mlp_ratio, qkv_bias=self.blocks[i].attn.qkv.bias is not None,
            drop=self.blocks[i].attn.proj_drop.p, attn_drop=self.blocks[i].attn.attn_drop.p,
            drop_path=getattr(self.blocks[i].drop_path1, "drop_prob", 0.0),
            propagate=do_propagation and i == regular[-1]) for i in regular})

    def carrier_parameters(self) -> list[nn.Parameter]:
        """The weights only carrier tokens use: the initialiser and the per-block HAT weights."""
        return [*self.global_tokenizer.parameters(), *self.carriers.parameters()]

    def set_input_size(self, feat_size: tuple[int, int], window_size: int,
                       always_partition: bool | None = None) -> None:
        """timm's resize, refused where it would change the carrier tokens' window."""
        super().set_input_size(feat_size, window_size, always_partition)
        if self.blocks[0].window_size != (self.global_tokenizer.window_size,) * 2:
            raise ValueError("set_input_size changed the window of a HAT stage; build the model for "
                             "the new image size instead")

    def _block(self, fn: Any, *args: Any) -> Any:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample, then timm's blocks with carrier tokens in the regular-window ones (B, H, W, C)."""
        x = self.downsample(x)
        ws = self.blocks[0].window_size[0]
        h, w = _map_size(x)
        rows, cols = (h + ws - 1) // ws, (w + ws - 1) // ws
        carrier_grid = (self.ct_size * rows, self.ct_size * cols)

        def run(x: torch.Tensor, ct: torch.Tensor | None, live: torch.Tensor | None) -> torch.Tensor:
            for i, block in enumerate(self.blocks):
                carrier = self.carriers[str(i)] if str(i) in self.carriers else None
                if ct is None or carrier is None:
                    x = self._block(block, x)
                else:
                    x, ct = self._block(hat_swin_block, block, carrier, x, ct, carrier_grid, live)
            return x if ct is None or not self.propagate else self._propagate(x, ct, live)

        return by_one_window_rule(
            x, rows, cols, lambda: self.global_tokenizer(pad_to_windows(x.permute(0, 3, 1, 2), ws)),
            self.carrier_parameters, run)

    def _propagate(self, x: torch.Tensor, ct: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
        """Carrier tokens upsampled onto their regular window and added to the map."""
        ws = self.blocks[0].window_size[0]
        h, w = _map_size(x)
        padded = pad_to_windows(x.permute(0, 3, 1, 2), ws).permute(0, 2, 3, 1)
        windows = window_partition(padded, ws)
        carrier = self.carriers[str(max(int(k) for k in self.carriers))]
        ct_windows = ct.reshape(windows.shape[0], self.ct_size * self.ct_size, -1)
        windows = carrier.propagate_carrier_tokens(windows, ct_windows, live)
        return window_reverse(windows, ws, *_map_size(padded))[:, :h, :w, :]


def _per_stage(name: str, value: Any, n: int, kind: type) -> list:
    values = list(to_ntuple(n)(value))
    if len(values) != n or any(not isinstance(v, kind) or (kind is int and isinstance(v, bool)) for v in values):
        raise ValueError(f"{name} must be one {kind.__name__} or one per stage ({n}), got {value!r}")
    return values


class HatSwinTransformer(SwinTransformer):
    """timm's Swin Transformer with Hierarchical Attention per stage.

    Args:
        hat: HAT per stage (bool or one per stage); off everywhere, the model is timm's.
        ct_size: carrier tokens per window side, per stage (0: none). Used only where the stage's
            map spans more than one window.
        do_propagation: add the carrier tokens back onto their window at the end of a HAT stage.
        **kwargs: timm's ``SwinTransformer`` arguments (img_size, embed_dim, depths, num_heads,
            window_size, ...).
    """

    def __init__(self, hat: bool | Sequence[bool] = False, ct_size: int | Sequence[int] = 1,
                 do_propagation: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.model_args = dict(kwargs)  # timm's arguments as given (a sweep's canonical form reads them)
        n = len(self.layers)
        hat = _per_stage("hat", hat, n, bool)
        ct_size = _per_stage("ct_size", ct_size, n, int)
        if any(c < 0 for c in ct_size):
            raise ValueError(f"ct_size must be >= 0 (0: no carrier tokens), got {ct_size}")
        self.ct_size = [c if h else 0 for c, h in zip(ct_size, hat)]
        self.do_propagation = bool(do_propagation)
        for i, c in enumerate(self.ct_size):
            if c:
                try:
                    self.layers[i] = HatSwinStage(self.layers[i], c, self.do_propagation)
                except ValueError as err:
                    raise ValueError(f"stage {i}: {err}") from None
                self.layers[i].global_tokenizer.apply(self._init_hat)
                self.layers[i].carriers.apply(self._init_hat)

    @staticmethod
    def _init_hat(m: nn.Module) -> None:
        # timm's Swin initialisation (init_weights_vit_timm) for the added weights.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def hat_keys(self) -> list[str]:
        """State-dict keys that timm's Swin lacks: the carrier-token weights."""
        return [k for k in self.state_dict() if ".global_tokenizer." in k or ".carriers." in k]

    def feature_sizes(self, image_size: int | Sequence[int] | None = None) -> list[tuple[int, int]]:
        """(h, w) of each stage's map for an input of ``image_size`` (default: the model's image size)."""
        if image_size is None:
            return [tuple(stage.output_resolution) for stage in self.layers]
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        h, w = self.patch_embed.dynamic_feat_size(size)
        sizes = []
        for i in range(len(self.layers)):
            # timm's stage resolutions: the patch grid, then halved (rounded up) by each patch merging.
            sizes.append((-(-h // 2 ** i), -(-w // 2 ** i)))
        return sizes

    def window_geometry(self, image_size: int | Sequence[int] | None = None) -> list[WindowStage]:
        """Map, window and stride of every stage for an input of ``image_size`` (default: the model's)."""
        patch = self.patch_embed.patch_size[0]
        return [WindowStage(size, tuple(stage.blocks[0].window_size), patch * 2 ** i)
                for i, (size, stage) in enumerate(zip(self.feature_sizes(image_size), self.layers))]

    def carrier_tokens_live(self, stage: int, image_size: int | Sequence[int] | None = None) -> bool:
        """Whether stage ``stage`` (0-based) uses carrier tokens for an input of ``image_size`` (default:
        the model's image size): it has HAT weights and its padded map spans more than one window."""
        if not self.ct_size[stage]:
            return False
        h, w = self.feature_sizes(image_size)[stage]
        return windows_spanned(h, w, self.layers[stage].blocks[0].window_size[0]) > 1

    def idle_parameters(self, image_size: int | Sequence[int] | None = None) -> list[nn.Parameter]:
        """The carrier-token weights an input of ``image_size`` never uses: those of HAT stages that are
        one window there (built, so that checkpoints load, but idle)."""
        return [p for i, stage in enumerate(self.layers) if isinstance(stage, HatSwinStage)
                and not self.carrier_tokens_live(i, image_size) for p in stage.carrier_parameters()]

    def check_image_size(self, image_size: int | Sequence[int]) -> None:
        """Raise ValueError unless the model takes images of ``image_size`` (timm's Swin: its img_size)."""
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if self.dynamic_img_size or tuple(self.patch_embed.img_size) == size:
            return
        raise ValueError(f"this Swin is built for {self.patch_embed.img_size[0]} px images, the data has "
                         f"{size[0]} px: set model.arch.img_size: {size[0]}")


def load_swin_weights(model: HatSwinTransformer, checkpoint: str | Path | Mapping[str, Any],
                      trust_checkpoint: bool | None = None) -> list[str]:
    """Load timm Swin weights (a file or a state dict) into ``model``: timm's keys strictly, the HAT
    weights left as built. Returns the HAT keys the weights lacked, and warns naming them."""
    source = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint,
                                                                               trust_checkpoint=trust_checkpoint)
    state = timm_swin_filter_fn(unwrap_state_dict(source), model)
    result = model.load_state_dict(state, strict=False)
    hat = set(model.hat_keys())
    missing = [k for k in result.missing_keys if k not in hat]
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"weights {checkpoint if not isinstance(checkpoint, Mapping) else '(state dict)'} do not fit this "
            f"Swin: missing {missing[:10]}, unexpected {list(result.unexpected_keys)[:10]}; build the model "
            f"with the Swin configuration they were trained with")
    new = [k for k in result.missing_keys if k in hat]
    if new:
        message = (f"loaded timm Swin weights; {len(new)} HAT weights are new (initialised, to train): "
                   + ", ".join(new))
        warnings.warn(message, stacklevel=2)
        _logger.info(message)
    return new


def _create_hat_swin(name: str, pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    """Build ``name`` (a key of SWIN_VARIANTS) with overrides through timm's ``build_model_with_cfg``.

    ``pretrained`` loads timm's weights of the plain Swin (``pretrained_cfg_overlay=dict(file=...)``
    for a local file), leaving the HAT weights as built and reporting them (see load_swin_weights).
    """
    timm_name = name.removeprefix("hat_")
    args = {**SWIN_VARIANTS[name], **kwargs}
    hat_on = any(to_ntuple(len(args["depths"]))(args.get("hat", False)))
    model = build_model_with_cfg(
        HatSwinTransformer, timm_name, pretrained, pretrained_filter_fn=timm_swin_filter_fn,
        pretrained_strict=not hat_on,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(len(args["depths"])))), **args)
    if pretrained and hat_on:
        warnings.warn(f"{name}: timm's {timm_name} weights loaded; HAT weights are new: "
                      + ", ".join(model.hat_keys()), stacklevel=2)
    model.pretrained_cfg = model.default_cfg = dict(model.pretrained_cfg, architecture=name)
    return model


@register_model
def hat_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    """Swin-T with HAT per stage (timm's swin_tiny_patch4_window7_224 when HAT is off)."""
    return _create_hat_swin("hat_swin_tiny_patch4_window7_224", pretrained, **kwargs)


@register_model
def hat_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    """Swin-S with HAT per stage."""
    return _create_hat_swin("hat_swin_small_patch4_window7_224", pretrained, **kwargs)


@register_model
def hat_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    """Swin-B (224 px) with HAT per stage."""
    return _create_hat_swin("hat_swin_base_patch4_window7_224", pretrained, **kwargs)


@register_model
def hat_swin_base_patch4_window12_384(pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    """Swin-B (384 px) with HAT per stage."""
    return _create_hat_swin("hat_swin_base_patch4_window12_384", pretrained, **kwargs)


@register_model
def hat_swin_large_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    """Swin-L (224 px) with HAT per stage."""
    return _create_hat_swin("hat_swin_large_patch4_window7_224", pretrained, **kwargs)
