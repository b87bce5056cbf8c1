"""Building blocks shared by fvlab's window-attention models: window geometry, continuous
position terms (MLPs over coordinates, cached per geometry in eval mode), attention, MLP.

Written from the FasterViT paper (arXiv 2306.06189) and Swin v2's continuous position bias.
Every geometry-dependent term follows the actual feature size, so one built model runs at any
input resolution; the forms a size takes when a graph is captured are handled in ``tracing.py``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import ndgrid
from timm.layers.pos_embed_rel import gen_relative_position_index
from timm.models import register_notrace_function, register_notrace_module

from fvlab.models.tracing import (capturing_graph, exporting, plain_strides_for_export, shared_in_export,
                                  sizes_known, spatial_size)

__all__ = ["POSITION_MLP_HIDDEN", "AbsolutePositionEmbedding", "InplaceGELU", "Mlp", "RelativePositionBias",
           "WindowAttention", "add_residual", "centred_grid_coords", "log_spaced_relative_coords",
           "pad_to_windows", "window_major_order", "window_partition", "window_reverse", "WindowStage"]

POSITION_MLP_HIDDEN = 512  # hidden width of every position MLP in the official checkpoints

# --------------------------------------------------------------------------------------
# Geometry: all small integer/float tables, depending only on sizes (never on weights)
# --------------------------------------------------------------------------------------



class WindowStage(NamedTuple):
    """One window-attention stage at an input size: its (h, w) map, (h, w) window and its stride
    (image pixels per map cell); what export and geometry checks need, whatever the model."""

    map_size: tuple[int, int]
    window: tuple[int, int]
    stride: int

@register_notrace_function  # reason: shape arithmetic on a Proxy
def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split a (B, H, W, C) map into (B * num_windows, window_size**2, C) tokens."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


@register_notrace_function  # reason: int arguments are Proxies
def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, ws**2, C) to (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


@register_notrace_function  # reason: control flow on the input size
def pad_to_windows(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Zero-pad a (B, C, H, W) map at the bottom and right to whole windows."""
    h, w = spatial_size(x)
    # Ceil-division rather than (-h) % ws: simpler symbolic sizes make export much faster.
    pad_h = (h + window_size - 1) // window_size * window_size - h
    pad_w = (w + window_size - 1) // window_size * window_size - w
    if sizes_known(h, w) and not (pad_h or pad_w):
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))  # symbolic sizes: a graph that pads when needed


def window_major_order(grid_h: int, grid_w: int, ct_size: int, device: torch.device) -> torch.Tensor:
    """Raster index of each carrier token when tokens are listed window by window."""
    idx = torch.arange(grid_h * grid_w, device=device).view(
        grid_h // ct_size, ct_size, grid_w // ct_size, ct_size)
    return idx.permute(0, 2, 1, 3).reshape(-1)


def _at_least_one(size: Any) -> Any:
    """max(size, 1) for an int, a SymInt (export) or a 0-dim tensor (torch.jit.trace, as fvcore counts)."""
    return size.clamp(min=1) if isinstance(size, torch.Tensor) else torch.sym_max(size, 1)


def log_spaced_relative_coords(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Relative (dy, dx) offsets of an h x w grid, scaled to [-1, 1] then log-spaced (Swin v2).

    Not timm's ``gen_relative_log_coords``: that divides by ``size - 1``, which is 0 for a
    carrier grid one token wide.
    """
    dy = torch.arange(-(h - 1), h, dtype=torch.float32, device=device) / _at_least_one(h - 1)
    dx = torch.arange(-(w - 1), w, dtype=torch.float32, device=device) / _at_least_one(w - 1)
    table = torch.stack(ndgrid(dy, dx), dim=-1).view(-1, 2) * 8
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


def centred_grid_coords(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h*w, 2) coordinates of an h x w grid, centred and scaled to about [-1, 1]."""
    ys = (torch.arange(h, dtype=torch.float32, device=device) - h // 2) / _at_least_one(h // 2)
    xs = (torch.arange(w, dtype=torch.float32, device=device) - w // 2) / _at_least_one(w // 2)
    return torch.stack(ndgrid(ys, xs), dim=-1).view(-1, 2)


# --------------------------------------------------------------------------------------
# Position terms: continuous MLPs over coordinates, cached in eval mode
# --------------------------------------------------------------------------------------


def _built_outside_inference_mode(build: Callable[[], Any]) -> Any:
    """Run ``build`` without recording a graph, returning normal tensors even under inference_mode.

    A tensor made under ``torch.inference_mode`` can never be saved for backward: cached
    there and reused later with gradients enabled, it would fail the backward pass.
    """
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            return build()
    with torch.no_grad():
        return build()


class _PositionMLP(nn.Module):
    """Base of the position terms: an MLP over coordinates whose output depends on geometry only.

    In eval mode the output is cached per geometry, device and dtype, and per state of the
    MLP's weights: their storage and autograd version counter (so in-place updates such as
    EMA, optimiser steps, ``load_state_dict`` and ``.data = ...`` reassignment all invalidate
    it), and a ``load_state_dict`` post-hook drops it. Writes *inside* ``.data``
    (``p.data.mul_(2)``) bypass the version counter by design; after those, call
    ``model.eval()`` again, which drops every cached term. When training, or when gradients
    must flow into the MLP, the term is recomputed on every call.
    """

    def __init__(self, out_features: int):
        super().__init__()
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, POSITION_MLP_HIDDEN, bias=True),
            nn.ReLU(inplace=True),
            nn.Linear(POSITION_MLP_HIDDEN, out_features, bias=False),
        )
        self._geometry: dict[tuple, Any] = {}
        self._value: tuple[tuple, list[torch.Tensor], torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(_PositionMLP._drop_cached_value)

    @staticmethod
    def _drop_cached_value(module: "_PositionMLP", incompatible_keys: Any) -> None:
        module._value = None

    def _geometry_cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        # Integer tables never depend on weights: cached in every mode where sizes are ints.
        # Symbolic sizes (export with a dynamic image size) make them part of the graph instead.
        if not sizes_known(*key[:2]) or exporting():
            return shared_in_export((type(self).__name__, *key), build)
        if key not in self._geometry:
            if len(self._geometry) >= 8:
                self._geometry.clear()
            self._geometry[key] = _built_outside_inference_mode(build)
        return self._geometry[key]

    def _value_cached(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        params = list(self.parameters())
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if (self.training or needs_graph or capturing_graph() or not sizes_known(*key[:2])
                or any(p.is_inference() for p in params)):  # no version counter to key on
            self._value = None
            return compute()
        full_key = (key, tuple((p.data_ptr(), p._version) for p in params))
        if self._value is None or self._value[0] != full_key:
            # The weights' tensors are held with the value so that their memory cannot be
            # freed and reused by new weights at the same address while the key names it.
            self._value = (full_key, [p.detach() for p in params],
                           _built_outside_inference_mode(compute))
        return self._value[2]

    def train(self, mode: bool = True) -> "_PositionMLP":
        """Switch mode and drop the cached value so no stale term survives a mode change."""
        self._value = None
        return super().train(mode)


@register_notrace_module  # reason: geometry from sizes, cached per size in eval mode
class RelativePositionBias(_PositionMLP):
    """Continuous relative position bias (Swin v2 style), one value per head and token pair.

    Returned as an additive attention mask of shape (1, heads, n, n): ``n_prefix`` leading
    tokens (the carrier tokens of a window) get zero bias, and ``order`` permutes the grid's
    tokens (used for window-major carrier tokens).
    """

    def __init__(self, num_heads: int):
        super().__init__(num_heads)
        self.num_heads = num_heads

    def forward(self, grid: tuple[int, int], n_prefix: int = 0, ct_size: int = 0,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Bias mask for tokens of a ``grid`` (h, w), with ``n_prefix`` unbiased tokens in front."""
        device = self.cpb_mlp[0].weight.device
        h, w = grid

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            index = gen_relative_position_index((h, w), device=device)
            if ct_size:
                order = window_major_order(h, w, ct_size, device)
                index = index[order][:, order]
            return log_spaced_relative_coords(h, w, device), index.reshape(-1)

        def compute() -> torch.Tensor:
            coords, index = self._geometry_cached((h, w, ct_size, device), build)
            table = self.cpb_mlp(coords)
            bias = 16 * torch.sigmoid(table[index].view(h * w, h * w, -1).permute(2, 0, 1))
            if n_prefix:
                bias = F.pad(bias, (n_prefix, 0, n_prefix, 0))
            return bias.unsqueeze(0).to(dtype)

        return self._value_cached((h, w, n_prefix, ct_size, device, dtype), compute)


@register_notrace_module  # reason: geometry from sizes, cached per size in eval mode
class AbsolutePositionEmbedding(_PositionMLP):
    """MLP-based absolute position embedding of a token grid, added to the tokens."""

    def __init__(self, dim: int):
        super().__init__(dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], ct_size: int = 0) -> torch.Tensor:
        """Add the embedding of ``grid`` (h, w) to ``x`` of shape (B, h*w, C), raster or window-major."""
        device = self.cpb_mlp[0].weight.device
        h, w = grid

        def build() -> torch.Tensor:
            coords = centred_grid_coords(h, w, device)
            return coords[window_major_order(h, w, ct_size, device)] if ct_size else coords

        def compute() -> torch.Tensor:
            coords = self._geometry_cached((h, w, ct_size, device), build)
            return self.cpb_mlp(coords).unsqueeze(0).to(x.dtype)

        return x + self._value_cached((h, w, ct_size, device, x.dtype), compute)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


@register_notrace_module  # reason: in place or not is decided per call, not when traced
class InplaceGELU(nn.GELU):
    """GELU that works in place when no autograd graph is recorded (inference).

    Out-of-place activations of large maps cost more in fresh-memory page faults than in
    arithmetic on the CPU; in place they are several times faster.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact (erf) GELU."""
        if torch.is_grad_enabled():
            return F.gelu(x)
        return torch.ops.aten.gelu_(x)


@register_notrace_function  # reason: in place or not is decided per call, not when traced
def add_residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch``, reusing ``branch``'s memory when no autograd graph is recorded."""
    if torch.is_grad_enabled() or branch.shape != x.shape:
        return x + branch
    return branch.add_(x)


class Mlp(nn.Module):
    """Two-layer feed-forward network."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = InplaceGELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply fc1, GELU, fc2."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

class WindowAttention(nn.Module):
    """Multi-head self-attention with a continuous relative position bias, via SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pos_emb_funct = RelativePositionBias(num_heads)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], n_prefix: int = 0,
                ct_size: int = 0, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over (B, n_prefix + h*w, C) tokens whose last h*w lie on ``grid``.

        ``key_bias`` (n,): added to every query's logit of each key (-inf hides a key).
        """
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.pos_emb_funct(grid, n_prefix, ct_size, dtype=q.dtype)
        if key_bias is not None:
            bias = bias + key_bias.to(bias.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0)
        x = plain_strides_for_export(x.transpose(1, 2))
        return self.proj_drop(self.proj(x.reshape(b, n, c)))

