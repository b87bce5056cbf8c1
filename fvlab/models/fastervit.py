"""FasterViT (Hatamizadeh et al., arXiv 2306.06189), written from the paper, laid out as a timm
model file: helpers, blocks, stage, model, checkpoint filter, configurations, registration.

The attention is shared with ``hat_swin_*``: window attention and the position terms are in
``layers.py``, the carrier-token (HAT) mechanism in ``hat.py``; what changes when a graph is
captured (export, FX tracing) is in ``tracing.py``.

A stage of transformer blocks works on windows of ``window_size`` x ``window_size``
tokens. With Hierarchical Attention (HAT) each window also owns ``ct_size`` x ``ct_size``
*carrier tokens*: pooled from the stage input, they attend globally to the carrier tokens
of every other window, then join their window's local attention. The global attention's
position terms are permuted into the carrier tokens' window-major order once, instead of
permuting tokens every block.

Any input resolution runs on one built model: transformer stages pad their input to whole
windows and crop back, and every geometry-dependent term (carrier-token pooling, position
bias and embedding of the carrier grid) follows the actual feature size.

Carrier tokens are used only where the stage's (padded) feature map spans more than one
window, as in the official implementation (its any-resolution model: sr_ratio = padded
resolution // window_size > 1). The official model fixes this when it is built, for one
resolution; here it is decided on every call from the actual feature size, so a HAT stage whose
map fits one window runs plain window attention (no carrier tokens, no propagation). The HAT
weights are built regardless, so checkpoints load at any resolution and the parameter count does
not depend on the input size; while unused they get zero gradients.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath, LayerNorm2d, to_ntuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from fvlab.adapters import MATCH_PREV_GROUP, feature_take_indices
from fvlab.models.checkpoint import unwrap_state_dict
from fvlab.models.hat import (CarrierTokenAttention, TokenInitializer, by_one_window_rule, hidden_prefix_bias,
                              join_carrier_tokens, split_carrier_tokens, windows_spanned)
from fvlab.models.layers import (AbsolutePositionEmbedding, InplaceGELU, Mlp, WindowAttention, WindowStage,
                                 add_residual, pad_to_windows, window_partition, window_reverse)
from fvlab.models.tracing import export_geometry_scope, spatial_size

__all__ = ["FasterViT", "VARIANTS", "NUM_CONV_STAGES", "checkpoint_filter_fn", "default_cfgs"]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

NUM_CONV_STAGES = 2  # stages 1-2 are residual conv blocks, the rest transformer blocks
# group_matcher ordinal of a stage's downsample: after any block index, yet its own group
# (MATCH_PREV_GROUP would merge it into the last block's group).
_AFTER_LAST_BLOCK = MATCH_PREV_GROUP[0] - 1
GLOBAL_POOLS = ("avg", "")  # timm's names: average pooling, or none (the head sees the map)


def _per_stage(name: str, value: Any, n: int, kind: type | tuple[type, ...]) -> list:
    """Broadcast a scalar to one value per stage, or check a per-stage list's length."""
    values = list(to_ntuple(n)(value))
    if len(values) != n:
        raise ValueError(
            f"{name} has {len(values)} entries but the model has {n} stages (len(depths)); "
            f"give one value per stage or a single value for all stages")
    for v in values:
        if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
            raise ValueError(f"{name} entries must be {getattr(kind, '__name__', kind)}, got {v!r}")
    return values


def _fuse_bn_into_following_linear(bn: nn.BatchNorm2d, linear: nn.Linear) -> nn.Linear:
    """A linear layer equal to ``linear(mean_hw(bn(x)))`` applied to ``mean_hw(x)`` (eval mode)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    # Built on the meta device, then filled: initialising a real Linear would draw from the
    # global RNG, and fusing a copy for a measurement must not change what a run trains.
    fused = nn.Linear(linear.in_features, linear.out_features, device="meta",
                      dtype=linear.weight.dtype).to_empty(device=linear.weight.device)
    fused.weight.copy_(linear.weight * scale)
    bias = linear.weight @ shift
    fused.bias.copy_(bias if linear.bias is None else bias + linear.bias)
    return fused


def _checked_arguments(dim: int, in_dim: int, depths: Any, num_heads: Any, window_size: Any, ct_size: Any,
                       hat: Any, mlp_ratio: float, layer_scale: float | None, layer_scale_conv: float | None,
                       drop_path_rate: float, num_classes: int, in_chans: int) -> tuple[list, list, list, list, list]:
    """(depths, num_heads, window_size, ct_size, hat) as one value per stage; ValueError naming any
    argument FasterViT cannot be built with."""
    depths = list(depths) if isinstance(depths, (list, tuple)) else depths
    if not isinstance(depths, list) or not depths or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
        raise ValueError(f"depths must be a non-empty list of positive ints, got {depths!r}")
    n = len(depths)
    num_heads = _per_stage("num_heads", num_heads, n, int)
    window_size = _per_stage("window_size", window_size, n, int)
    ct_size = _per_stage("ct_size", ct_size, n, int)
    hat = _per_stage("hat", hat, n, bool)
    for name, value in (("dim", dim), ("in_dim", in_dim), ("in_chans", in_chans)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
    if not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
    if not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    for name, value in (("layer_scale", layer_scale), ("layer_scale_conv", layer_scale_conv)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number or None (off), got {value!r}")
    for i in range(n):
        stage_dim = dim * 2 ** i
        if window_size[i] < 1:
            raise ValueError(f"window_size[{i}] must be >= 1, got {window_size[i]}")
        if ct_size[i] < 0:
            raise ValueError(f"ct_size[{i}] must be >= 0 (0: no carrier tokens), got {ct_size[i]}")
        if i < NUM_CONV_STAGES:
            continue
        if num_heads[i] < 1 or stage_dim % num_heads[i]:
            raise ValueError(
                f"num_heads[{i}]={num_heads[i]} must be positive and divide the stage's "
                f"{stage_dim} channels (dim * 2**{i}); pick a divisor of {stage_dim}")
        if hat[i] and ct_size[i] > window_size[i]:
            raise ValueError(
                f"ct_size[{i}]={ct_size[i]} exceeds window_size[{i}]={window_size[i]}: carrier "
                f"tokens are pooled from their window, so use ct_size <= window_size")
    return depths, num_heads, window_size, ct_size, hat


def _check_global_pool(global_pool: str, num_classes: int) -> None:
    """Raise ValueError unless ``global_pool`` is one FasterViT has and fits ``num_classes``."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
    if global_pool == "" and num_classes > 0:
        raise ValueError("global_pool='' (no pooling) needs num_classes=0: a linear head "
                         "classifies pooled features")


# --------------------------------------------------------------------------------------
# Blocks (attention: ``layers.WindowAttention``, ``hat.CarrierTokenAttention``)
# --------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Stem: two stride-2 3x3 convs, each with BatchNorm and ReLU (resolution / 4)."""

    def __init__(self, in_chans: int, in_dim: int, dim: int):
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed an image into a (B, dim, H/4, W/4) map."""
        return self.conv_down(x)


class ConvBlock(nn.Module):
    """Residual block of stages 1-2: 3x3 conv, BN, GELU, 3x3 conv, BN."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = InplaceGELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual conv branch."""
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return add_residual(x, self.drop_path(y))


class HATBlock(CarrierTokenAttention, nn.Module):
    """Transformer block with Hierarchical Attention (the mechanism of ``hat.py``).

    With carrier tokens: (1) the carrier tokens of all windows attend to each other and pass
    an MLP; (2) each window attends over [its carrier tokens, its own tokens]; (3) in the
    last block of a stage, optionally, carrier tokens are upsampled onto their window.
    Without carrier tokens (``carrier_tokens=None``: no HAT, or a map of one window), only (2)
    remains: plain window attention; the HAT weights, if built, are left unused.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, ct_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale: float | None = None, last: bool = False,
                 do_propagation: bool = False):
        super().__init__()
        self.window_size = window_size
        self.ct_size = ct_size
        self.propagate = last and do_propagation and ct_size > 0

        def scale() -> nn.Parameter | None:
            return nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale is not None else None

        self.pos_embed = AbsolutePositionEmbedding(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma3 = scale()
        self.gamma4 = scale()
        if ct_size > 0:
            self.init_carrier_attention(
                dim=dim, num_heads=num_heads, window_size=window_size, ct_size=ct_size,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                drop_path=drop_path, layer_scale=layer_scale, propagate=self.propagate)

    def forward(self, x: torch.Tensor, carrier_tokens: torch.Tensor | None,
                carrier_grid: tuple[int, int], live: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Update window tokens (B*nw, ws*ws, C) and window-major carrier tokens (B, nw*ct*ct, C).

        ``live`` (only in an export graph that does not know the image size; see
        ``hat.by_one_window_rule``): a (1,) bool tensor; where False, the carrier tokens are
        computed but hidden from the window attention and not propagated, which gives plain
        window attention.
        """
        ws = self.window_size
        x = self.pos_embed(x, (ws, ws))
        ct = carrier_tokens
        key_bias = None
        n_ct = 0
        if ct is not None:
            ct = self.carrier_global_attention(ct, carrier_grid)
            x, n_ct = join_carrier_tokens(x, ct, self.ct_size)
            if live is not None:
                key_bias = hidden_prefix_bias(live, n_ct, ws * ws)
        x = add_residual(x, self.drop_path(
            self._scaled(self.attn(self.norm1(x), (ws, ws), n_ct, key_bias=key_bias), self.gamma3)))
        x = add_residual(x, self.drop_path(self._scaled(self.mlp(self.norm2(x)), self.gamma4)))
        if ct is not None:
            x, ct, ct_windows = split_carrier_tokens(x, n_ct, ct)
            if self.propagate:
                x = self.propagate_carrier_tokens(x, ct_windows, live)
        return x, ct


class Downsample(nn.Module):
    """Between stages: LayerNorm2d, then a stride-2 3x3 conv doubling the channels."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.reduction = nn.Sequential(nn.Conv2d(dim, out_dim, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and halve the resolution."""
        return self.reduction(self.norm(x))


# --------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------


class FasterViTStage(nn.Module):
    """One resolution level: conv blocks or HAT blocks, then (except the last) a downsample."""

    def __init__(self, dim: int, depth: int, conv: bool, num_heads: int, window_size: int,
                 ct_size: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: Sequence[float], layer_scale: float | None,
                 layer_scale_conv: float | None, do_propagation: bool, downsample: bool):
        super().__init__()
        self.conv = conv
        self.window_size = window_size
        self.ct_size = 0 if conv else ct_size
        # Blocks that run: all of them, except in a shallower subnet of a supernet (supernet.py).
        self.depth = depth
        self.grad_checkpointing = False
        if conv:
            self.blocks = nn.ModuleList(
                ConvBlock(dim=dim, drop_path=drop_path[i], layer_scale=layer_scale_conv)
                for i in range(depth))
        else:
            self.blocks = nn.ModuleList(
                HATBlock(dim=dim, num_heads=num_heads, window_size=window_size,
                         ct_size=self.ct_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                         attn_drop=attn_drop, drop_path=drop_path[i], layer_scale=layer_scale,
                         last=i == depth - 1, do_propagation=do_propagation)
                for i in range(depth))
        self.downsample = Downsample(dim=dim, out_dim=2 * dim) if downsample else None
        if self.ct_size > 0:
            self.global_tokenizer = TokenInitializer(dim=dim, window_size=window_size,
                                                     ct_size=self.ct_size)

    def carrier_parameters(self) -> list[nn.Parameter]:
        """The weights only carrier tokens use: the tokenizer and each block's ``hat_*`` and gamma1/2."""
        if self.ct_size == 0:
            return []
        params = list(self.global_tokenizer.parameters())
        for block in self.blocks:
            params += [p for name, p in block.named_parameters()
                       if name.startswith("hat_") or name in ("gamma1", "gamma2")]
        return params

    def _run(self, block: nn.Module, *args: Any) -> Any:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks on a (B, C, H, W) map of any size; returns the same size."""
        if self.conv:
            for block in self.blocks[:self.depth]:
                x = self._run(block, x)
            return x
        with export_geometry_scope():
            return self._forward_windows(x)

    def _forward_windows(self, x: torch.Tensor) -> torch.Tensor:
        ws = self.window_size
        h, w = spatial_size(x)
        x = pad_to_windows(x, ws)
        hp, wp = spatial_size(x)
        rows, cols = hp // ws, wp // ws
        carrier_grid = (self.ct_size * rows, self.ct_size * cols)

        def run(x: torch.Tensor, ct: torch.Tensor | None, live: torch.Tensor | None) -> torch.Tensor:
            tokens = window_partition(x.permute(0, 2, 3, 1), ws)
            for block in self.blocks[:self.depth]:
                tokens, ct = self._run(block, tokens, ct, carrier_grid, live)
            return window_reverse(tokens, ws, hp, wp).permute(0, 3, 1, 2)

        if self.ct_size > 0:
            x = by_one_window_rule(x, rows, cols, lambda: self.global_tokenizer(x), self.carrier_parameters, run)
        else:
            x = run(x, None, None)
        # Cropping to the input size is a no-op view when nothing was padded.
        return x[:, :, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks, then downsample if this is not the last stage."""
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class FasterViT(nn.Module):
    """FasterViT: a CNN stem and conv stages, then transformer stages with Hierarchical Attention.

    Args:
        dim: channels of stage 1 (doubled at each later stage).
        in_dim: channels after the stem's first conv.
        depths: blocks per stage; stages 1-2 are conv stages, the rest transformer stages.
        num_heads: attention heads per stage (int or one per stage).
        window_size: local window side per stage (int or one per stage).
        ct_size: carrier tokens per window side, per stage (int or one per stage; 0: none).
            Carrier tokens are used only where the stage's (padded) feature map spans more
            than one window, as in the official implementation (sr_ratio = padded resolution
            // window_size > 1); the HAT weights are built regardless, so checkpoints load at any
            resolution.
        hat: use Hierarchical Attention per stage (bool or one per stage); where False, or
            where ct_size is 0, a transformer stage uses plain window attention, and so does a
            HAT stage on an input whose feature map there fits in one window (its HAT weights
            are then built but unused).
        do_propagation: add carrier tokens back onto their windows at the end of a HAT stage
            (where it uses carrier tokens).
        mlp_ratio: hidden width of the MLPs relative to the stage's channels.
        layer_scale: initial layer-scale value of transformer blocks (None: off).
        layer_scale_conv: initial layer-scale value of conv blocks (None: off).
        drop_path_rate: stochastic depth rate, increasing linearly over the blocks.
        drop_rate: dropout after MLPs and projections.
        attn_drop_rate: dropout on attention weights.
        qkv_bias: learnable bias of the query, key and value projections.
        num_classes: classes of the head (0: no head, features only).
        in_chans: input image channels.
        global_pool: ``'avg'``, or ``''`` (no pooling; needs ``num_classes=0``): the head then
            returns the final feature map, timm's convention.
    """

    def __init__(self, dim: int = 64, in_dim: int = 64, depths: Sequence[int] = (2, 3, 6, 5),
                 num_heads: int | Sequence[int] = (2, 4, 8, 16),
                 window_size: int | Sequence[int] = 7, ct_size: int | Sequence[int] = 2,
                 hat: bool | Sequence[bool] = (False, False, True, False),
                 do_propagation: bool = False, mlp_ratio: float = 4.0,
                 layer_scale: float | None = None, layer_scale_conv: float | None = None,
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, qkv_bias: bool = True,
                 num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg"):
        super().__init__()
        depths, num_heads, window_size, ct_size, hat = _checked_arguments(
            dim=dim, in_dim=in_dim, depths=depths, num_heads=num_heads, window_size=window_size,
            ct_size=ct_size, hat=hat, mlp_ratio=mlp_ratio, layer_scale=layer_scale,
            layer_scale_conv=layer_scale_conv, drop_path_rate=drop_path_rate, num_classes=num_classes,
            in_chans=in_chans)
        _check_global_pool(global_pool, num_classes)
        n = len(depths)
        self.depths = depths
        self.window_size = window_size
        self.ct_size = [c if (h and i >= NUM_CONV_STAGES) else 0
                        for i, (c, h) in enumerate(zip(ct_size, hat))]
        # The arguments as built, one value per stage where per stage (a supernet sets its active
        # subnet's); what a sweep's canonical form of the architecture is read from.
        self.model_args: dict[str, Any] = dict(
            dim=dim, in_dim=in_dim, depths=list(depths), num_heads=num_heads, window_size=window_size,
            ct_size=ct_size, hat=hat, do_propagation=bool(do_propagation), mlp_ratio=float(mlp_ratio),
            layer_scale=None if layer_scale is None else float(layer_scale),
            layer_scale_conv=None if layer_scale_conv is None else float(layer_scale_conv),
            drop_path_rate=float(drop_path_rate), drop_rate=float(drop_rate),
            attn_drop_rate=float(attn_drop_rate), qkv_bias=bool(qkv_bias), in_chans=in_chans)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dim * 2 ** (n - 1)
        self.drop_rate = drop_rate
        self.fused = False

        self.patch_embed = PatchEmbed(in_chans=in_chans, in_dim=in_dim, dim=dim)
        total = sum(depths)
        # Plain floats (not torch.linspace) so that the model also builds on the meta device.
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i in range(n):
            stage_dim = dim * 2 ** i
            self.levels.append(FasterViTStage(
                dim=stage_dim, depth=depths[i], conv=i < NUM_CONV_STAGES, num_heads=num_heads[i],
                window_size=window_size[i], ct_size=self.ct_size[i], mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], layer_scale=layer_scale,
                layer_scale_conv=layer_scale_conv, do_propagation=do_propagation,
                downsample=i < n - 1))
            self.feature_info.append(dict(num_chs=stage_dim, reduction=4 * 2 ** i, module=f"levels.{i}"))
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def carrier_tokens_live(self, stage: int, image_size: int | Sequence[int]) -> bool:
        """Whether stage ``stage`` (0-based) uses carrier tokens on an input of ``image_size``: it has
        HAT weights and its feature map, padded to whole windows, spans more than one window."""
        h, w = self.feature_sizes(image_size)[stage]
        return self.ct_size[stage] > 0 and windows_spanned(h, w, self.window_size[stage]) > 1

    def idle_parameters(self, image_size: int | Sequence[int]) -> list[nn.Parameter]:
        """The carrier-token weights that an input of ``image_size`` never uses: those of HAT stages
        whose map is one window there (built, so checkpoints load at every size, but idle)."""
        return [p for i, stage in enumerate(self.levels) if not stage.conv and stage.ct_size > 0
                and not self.carrier_tokens_live(i, image_size) for p in stage.carrier_parameters()]

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm model interface -------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of parameters exempt from weight decay: position MLPs, norms, biases, scales."""
        return {name for name, p in self.named_parameters()
                if ".cpb_mlp." in name or p.ndim <= 1}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth, for layer-wise lr decay."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^levels\.(\d+)" if coarse else [
                # Each group sorts by (stage, block): the tokenizer runs before block 0 and
                # the downsample after the last block, in a group of its own; the final norm
                # joins the last block's group.
                (r"^levels\.(\d+)\.global_tokenizer", None),
                (r"^levels\.(\d+)\.blocks\.(\d+)", None),
                (r"^levels\.(\d+)\.downsample", (_AFTER_LAST_BLOCK,)),
                (r"^norm", MATCH_PREV_GROUP),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass, block by block, to save memory."""
        for stage in self.levels:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: no head).

        ``global_pool``: ``'avg'``, or ``''`` (no pooling: with ``num_classes=0``,
        ``forward_head`` then returns the unpooled feature map, timm's convention); None
        keeps the current pooling.
        """
        pool = self.global_pool if global_pool is None else global_pool
        _check_global_pool(pool, num_classes)
        if self.fused:
            raise RuntimeError("this FasterViT was fused for inference (model.fuse()), which may "
                               "fold the final BatchNorm into the head; call reset_classifier "
                               "before fuse()")
        self.num_classes = num_classes
        self.global_pool = pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, in_chans, H, W) to the normalised last feature map."""
        x = self.patch_embed(x)
        for stage in self.levels:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average-pool the feature map (unless ``global_pool`` is ''), then classify."""
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image to logits."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-stage feature maps (before each downsample), as timm's feature API expects.

        ``indices``: the last n stages if an int, all if None, else the listed ones. The final
        norm belongs to the last stage: ``norm`` applies it to that intermediate only, and the
        returned final map is normalised only when the last stage ran (not ``stop_early``
        before it); otherwise it is the last stage run's output, before its downsample.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        n = len(self.levels)
        take, max_index = feature_take_indices(n, indices)
        last = max_index if (stop_early or intermediates_only) else n - 1
        intermediates = []
        x = self.patch_embed(x)
        for i, stage in enumerate(self.levels[:last + 1]):
            x = stage.forward_blocks(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == n - 1 else x)
            if stage.downsample is not None and i < last:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if last == n - 1 else x), intermediates

    # ---- geometry -------------------------------------------------------------------

    def feature_sizes(self, image_size: int | Sequence[int]) -> list[tuple[int, int]]:
        """(h, w) of each stage's feature map for an input of ``image_size``."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        h, w = -(-h // 4), -(-w // 4)  # stem: two stride-2 convs with padding 1
        sizes = []
        for _ in self.levels:
            sizes.append((h, w))
            h, w = -(-h // 2), -(-w // 2)
        return sizes

    def window_geometry(self, image_size: int | Sequence[int]) -> list[WindowStage]:
        """Map, window and stride of every window-attention (transformer) stage for an input of ``image_size``."""
        return [WindowStage(size, (self.window_size[i],) * 2, 4 * 2 ** i)
                for i, size in enumerate(self.feature_sizes(image_size)) if i >= NUM_CONV_STAGES]

    def check_image_size(self, image_size: int | Sequence[int]) -> None:
        """Raise ValueError if a HAT stage's feature map cannot hold one whole window."""
        for i, (h, w) in enumerate(self.feature_sizes(image_size)):
            ws = self.window_size[i]
            if self.ct_size[i] and min(h, w) < ws:
                raise ValueError(
                    f"window_size[{i}]={ws} does not fit stage {i + 1}'s {h}x{w} feature map at "
                    f"image size {image_size}: the window would be mostly padding; "
                    f"use window_size[{i}] <= {min(h, w)} or a larger image size")

    # ---- inference --------------------------------------------------------------------

    @torch.no_grad()
    def fuse(self) -> "FasterViT":
        """Fold every BatchNorm into a neighbouring linear layer, in place, for inference only.

        The stem's and the conv blocks' BatchNorms go into the convs before them. With a
        classifier head, the final BatchNorm goes into the head: in eval mode it is a
        per-channel affine map, which commutes with the average pooling before the head, so
        the logits stay the same while ``forward_features``, ``forward_head(pre_logits=True)``
        and ``forward_intermediates`` then return the last stage's features without that
        norm. Without a head (``num_classes=0``: a feature backbone) the final norm stays.
        Calling ``fuse`` again changes nothing.
        """
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.eval()
        stem = self.patch_embed.conv_down
        for conv_i, bn_i in ((0, 1), (3, 4)):
            if isinstance(stem[bn_i], nn.BatchNorm2d):
                stem[conv_i] = fuse_conv_bn_eval(stem[conv_i], stem[bn_i])
                stem[bn_i] = nn.Identity()
        for stage in self.levels:
            for block in stage.blocks if stage.conv else ():
                if isinstance(block.norm1, nn.BatchNorm2d):
                    block.conv1 = fuse_conv_bn_eval(block.conv1, block.norm1)
                    block.conv2 = fuse_conv_bn_eval(block.conv2, block.norm2)
                    block.norm1 = block.norm2 = nn.Identity()
        if isinstance(self.norm, nn.BatchNorm2d) and isinstance(self.head, nn.Linear):
            self.head = _fuse_bn_into_following_linear(self.norm, self.head)
            self.norm = nn.Identity()
        self.fused = True
        return self

    def train(self, mode: bool = True) -> "FasterViT":
        """Set training mode; a fused model has no BatchNorm left and cannot train."""
        if mode and self.fused:
            raise RuntimeError("this FasterViT was fused for inference (model.fuse()); "
                               "build a fresh model to train")
        return super().train(mode)


# --------------------------------------------------------------------------------------
# Checkpoint filter
# --------------------------------------------------------------------------------------

# Buffers of the official implementation that are pure functions of geometry (or caches of
# position-MLP outputs): recomputed here, never loaded.
DERIVED_SUFFIXES = ("relative_coords_table", "relative_position_index", "relative_bias")
# The official tokenizer registers its depthwise conv twice (".pos_embed." and this alias).
TOKENIZER_ALIAS = ".global_tokenizer.to_global_feature.pos."


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: FasterViT | None = None,
                         use_ema: bool = True) -> dict[str, torch.Tensor]:
    """A FasterViT state dict from an official, timm, Lightning or plain checkpoint (see
    ``checkpoint.unwrap_state_dict`` for ``use_ema``): official keys renamed, derived buffers dropped,
    and the classifier's weights dropped for a ``model`` built without one (``num_classes=0``: a backbone)."""
    out = {}
    head = getattr(model, "head", None)  # a segmenter holding a FasterViT has none of its own
    headless = isinstance(head, nn.Module) and not any(True for _ in head.parameters())
    for key, value in unwrap_state_dict(state_dict, use_ema=use_ema).items():
        if key.endswith(DERIVED_SUFFIXES) or (headless and key.startswith("head.")):
            continue
        if TOKENIZER_ALIAS in key:
            key = key.replace(TOKENIZER_ALIAS, ".global_tokenizer.pos_embed.")
        out.setdefault(key, value)
    return out


def _create_fastervit(variant: str, pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """Build ``variant`` (its ``VARIANTS``, then ``kwargs``) with timm's builder; a variant without
    arguments there is FasterViT with its constructor's defaults."""
    if variant not in VARIANTS and not kwargs.get("pretrained_cfg"):
        kwargs["pretrained_cfg"] = _cfg()  # no registered configuration to look up
    return build_model_with_cfg(
        FasterViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **{**VARIANTS.get(variant, {}), **kwargs})


# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------

_IMAGENET = dict(depths=[2, 3, 6, 5], num_heads=[2, 4, 8, 16], window_size=7, ct_size=2,
                 hat=[False, False, True, False], mlp_ratio=4.0)

# Each variant's arguments: the ImageNet-1K configurations of the official registry, plus small
# CPU-sized ones.
VARIANTS: dict[str, dict[str, Any]] = {
    "fastervit_0": dict(_IMAGENET, dim=64, in_dim=64, drop_path_rate=0.2),
    "fastervit_1": dict(_IMAGENET, depths=[1, 3, 8, 5], dim=80, in_dim=32, drop_path_rate=0.2),
    "fastervit_2": dict(_IMAGENET, depths=[3, 3, 8, 5], dim=96, in_dim=64, drop_path_rate=0.2),
    "fastervit_3": dict(_IMAGENET, depths=[3, 3, 12, 5], dim=128, in_dim=64, drop_path_rate=0.3,
                        layer_scale=1e-5, do_propagation=True),
    "fastervit_4": dict(_IMAGENET, depths=[3, 3, 12, 5], num_heads=[4, 8, 16, 32], dim=196,
                        in_dim=64, drop_path_rate=0.3, layer_scale=1e-5, do_propagation=True),
    "fastervit_5": dict(_IMAGENET, depths=[3, 3, 12, 5], num_heads=[4, 8, 16, 32], dim=320,
                        in_dim=64, drop_path_rate=0.3, layer_scale=1e-5, do_propagation=True),
    "fastervit_6": dict(_IMAGENET, depths=[3, 3, 16, 8], num_heads=[4, 8, 16, 32], dim=320,
                        in_dim=64, drop_path_rate=0.5, layer_scale=1e-5, do_propagation=True),
    # 64 px: stage 3 sees 4x4 tokens, i.e. four 2x2 windows, each with its carrier token.
    "fastervit_tiny": dict(depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=2, ct_size=1,
                           hat=[False, False, True, False], mlp_ratio=4.0, dim=32, in_dim=16,
                           drop_path_rate=0.0, do_propagation=True),
    # 32-64 px smoke-test size: a few hundred thousand parameters.
    "fastervit_micro": dict(depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 4], window_size=2,
                            ct_size=1, hat=[False, False, True, False], mlp_ratio=2.0, dim=16,
                            in_dim=8, drop_path_rate=0.0),
}

_OFFICIAL_URL = "https://huggingface.co/ahatamiz/FasterViT/resolve/main/fastervit_{}_224_1k.pth.tar"


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    cfg = dict(url=url, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
               crop_pct=1.0, interpolation="bicubic", fixed_input_size=False,
               mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv="patch_embed.conv_down.0", classifier="head",
               license="NVIDIA Source Code License-NC (official weights)")
    return {**cfg, **kwargs}


default_cfgs = generate_default_cfgs({
    **{f"fastervit_{i}.in1k": _cfg(_OFFICIAL_URL.format(i), crop_pct=0.875 if i == 0 else 1.0)
       for i in range(7)},
    "fastervit_tiny": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), license=None),
    "fastervit_micro": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), license=None),
})


# --------------------------------------------------------------------------------------
# Registration with timm
# --------------------------------------------------------------------------------------


@register_model
def fastervit_0(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-0 (31.4 M params, 3.37 GFLOPs at 224)."""
    return _create_fastervit("fastervit_0", pretrained, **kwargs)


@register_model
def fastervit_1(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-1 (53.4 M params, 5.33 GFLOPs at 224)."""
    return _create_fastervit("fastervit_1", pretrained, **kwargs)


@register_model
def fastervit_2(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-2 (75.9 M params, 8.78 GFLOPs at 224)."""
    return _create_fastervit("fastervit_2", pretrained, **kwargs)


@register_model
def fastervit_3(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-3 (159.6 M params, 18.4 GFLOPs at 224)."""
    return _create_fastervit("fastervit_3", pretrained, **kwargs)


@register_model
def fastervit_4(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4 (365.6 M params, official registry config)."""
    return _create_fastervit("fastervit_4", pretrained, **kwargs)


@register_model
def fastervit_5(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-5 (957.5 M params)."""
    return _create_fastervit("fastervit_5", pretrained, **kwargs)


@register_model
def fastervit_6(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-6 (1360.3 M params)."""
    return _create_fastervit("fastervit_6", pretrained, **kwargs)


@register_model
def fastervit_tiny(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """A CPU-sized FasterViT for 64-128 px images (fvlab)."""
    return _create_fastervit("fastervit_tiny", pretrained, **kwargs)


@register_model
def fastervit_micro(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """A smoke-test FasterViT for 32-64 px images (fvlab)."""
    return _create_fastervit("fastervit_micro", pretrained, **kwargs)
