"""Hierarchical Attention (HAT, FasterViT, arXiv 2306.06189): one mechanism for any block that
attends within windows.

Each window owns ``ct_size`` x ``ct_size`` *carrier tokens*. Per stage, and per block:

1. **initialisation** (:class:`TokenInitializer`, once per stage): a depthwise 3x3 conv of the
   stage input, average-pooled to the carrier tokens of each window;
2. **global carrier attention** (:meth:`CarrierTokenAttention.carrier_global_attention`): the
   carrier tokens of all windows attend to each other, then pass an MLP;
3. **local attention** (:func:`join_carrier_tokens` / :func:`split_carrier_tokens`): each window
   attends over [its carrier tokens, its own tokens] with the host block's attention and MLP;
4. **propagation** (:meth:`CarrierTokenAttention.propagate_carrier_tokens`, last block of a
   stage, optional): carrier tokens are upsampled onto their window and added.

Carrier tokens are kept in window-major order (all tokens of window 0, then window 1, ...) so
that moving between the global view (B, windows * ct**2, C) and the per-window view
(B * windows, ct**2, C) is a free reshape.

The rule of when carrier tokens exist (:func:`by_one_window_rule`) is the official
any-resolution model's: only where a stage's map, padded to whole windows, spans more than one
window. It is decided on every call from the actual size, so a model built once keeps the rule
at every resolution; where the size is unknown to Python (export with a symbolic size, FX
tracing) the graph decides itself (see ``tracing.py``).

FasterViT (``fastervit.py``) and timm's Swin (``swin.py``) host this mechanism: the weights are
registered on the host block under the official FasterViT names (``hat_norm1``, ``hat_attn``,
``gamma1`` ...), so that official checkpoints load.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import DropPath
from timm.models import register_notrace_function

from fvlab.models.layers import AbsolutePositionEmbedding, Mlp, WindowAttention
from fvlab.models.tracing import decided_in_python, fx_proxy, graph_condition, select, sizes_known, spatial_size

__all__ = ["CarrierTokenAttention", "TokenInitializer", "by_one_window_rule", "carrier_pool_geometry",
           "hidden_prefix_bias", "join_carrier_tokens", "pool_carrier_tokens", "propagation_index",
           "split_carrier_tokens", "tie_zero_gradients", "windows_spanned"]


def windows_spanned(h: int, w: int, window_size: int) -> int:
    """Number of windows an h x w map covers once padded to whole windows."""
    return math.ceil(h / window_size) * math.ceil(w / window_size)


def carrier_pool_geometry(size: int, window_size: int, ct_size: int) -> tuple[int, int]:
    """Average-pool (kernel, stride) that turns a padded side into ct_size tokens per window.

    The stride is ``window_size // ct_size``; when ct_size does not divide window_size
    (FasterViT-0 to 6: 7 and 2) the kernel grows with the number of windows, as in the
    official implementation.
    """
    # ``size`` is a whole number of windows, so size // out == window_size // ct_size.
    out = ct_size * (size // window_size)
    stride = window_size // ct_size
    return size - (out - 1) * stride, stride


def _band_average(size: int, window_size: int, ct_size: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """(out, size) matrix whose rows average the pooling windows of :func:`carrier_pool_geometry`."""
    kernel, stride = carrier_pool_geometry(size, window_size, ct_size)
    start = torch.arange(ct_size * (size // window_size), device=device)[:, None] * stride
    pos = torch.arange(size, device=device)[None, :]
    return ((pos >= start) & (pos < start + kernel)).to(dtype) / kernel


@register_notrace_function  # reason: pooling kernel depends on the input size
def pool_carrier_tokens(x: torch.Tensor, window_size: int, ct_size: int) -> torch.Tensor:
    """Average-pool a padded (B, C, H, W) map to ct_size x ct_size tokens per window.

    Concrete sizes use ``avg_pool2d``. Symbolic sizes (export with a dynamic image size)
    cannot: ONNX pooling kernels are constants, so the same averages are taken as two
    matrix products with band matrices built from the size.
    """
    h, w = spatial_size(x)
    if window_size % ct_size == 0:  # kernel == stride, independent of the size
        return F.avg_pool2d(x, window_size // ct_size)
    if sizes_known(h, w):
        kh, sh = carrier_pool_geometry(h, window_size, ct_size)
        kw, sw = carrier_pool_geometry(w, window_size, ct_size)
        return F.avg_pool2d(x, (kh, kw), (sh, sw))
    rows = _band_average(h, window_size, ct_size, x.device, x.dtype)
    cols = _band_average(w, window_size, ct_size, x.device, x.dtype)
    return rows @ x @ cols.transpose(0, 1)


@register_notrace_function  # reason: tensors built from sizes
def hidden_prefix_bias(live: torch.Tensor, n_prefix: int, n_tokens: int) -> torch.Tensor:
    """(n_prefix + n_tokens,) key bias: 0 everywhere, except -inf on the prefix where ``live`` is False."""
    is_prefix = torch.arange(n_prefix + n_tokens, device=live.device) < n_prefix
    return torch.zeros(n_prefix + n_tokens, device=live.device).masked_fill(
        is_prefix & ~live, float("-inf"))


class TokenInitializer(nn.Module):
    """Carrier tokens from a stage input: depthwise 3x3 conv, then average pooling per window."""

    def __init__(self, dim: int, window_size: int, ct_size: int):
        super().__init__()
        self.window_size = window_size
        self.ct_size = ct_size
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a padded (B, C, H, W) input to window-major carrier tokens (B, nw*ct*ct, C)."""
        x = pool_carrier_tokens(self.pos_embed(x), self.window_size, self.ct_size)
        b, c, gh, gw = x.shape
        ct = self.ct_size
        x = x.reshape(b, c, gh // ct, ct, gw // ct, ct).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, gh * gw, c)



def propagation_index(window_size: int, ct_size: int) -> torch.Tensor:
    """(window_size**2,) index of the carrier token each window token takes (nearest-neighbour upsampling)."""
    src = torch.arange(ct_size, dtype=torch.float32).view(1, 1, ct_size)
    src = F.interpolate(src, size=window_size, mode="nearest").long().view(-1)
    return (src[:, None] * ct_size + src[None, :]).view(-1)


def join_carrier_tokens(windows: torch.Tensor, carrier_tokens: torch.Tensor, ct_size: int
                        ) -> tuple[torch.Tensor, int]:
    """Prefix each window (B*nw, n, C) with its carrier tokens from window-major (B, nw*ct*ct, C);
    returns the joined tokens and the prefix length."""
    n_ct = ct_size * ct_size
    return torch.cat((carrier_tokens.reshape(windows.shape[0], n_ct, -1), windows), dim=1), n_ct


def split_carrier_tokens(tokens: torch.Tensor, n_ct: int, like: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`join_carrier_tokens`: (window tokens, carrier tokens shaped like ``like``,
    carrier tokens per window (B*nw, n_ct, C))."""
    ct_windows, windows = tokens.split((n_ct, tokens.shape[1] - n_ct), dim=1)
    return windows, ct_windows.reshape(like.shape), ct_windows


def by_one_window_rule(x: torch.Tensor, rows: Any, cols: Any, carrier_tokens: Callable[[], torch.Tensor],
                       carrier_parameters: Callable[[], Sequence[nn.Parameter]],
                       run: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
                       ) -> torch.Tensor:
    """``run(x, carrier tokens or None, live or None)`` for a stage input ``x`` of ``rows`` x ``cols``
    windows (once padded), with carrier tokens (``carrier_tokens()``) only where it spans more
    than one window.

    Where Python knows the sizes (see ``tracing.decided_in_python``) it decides: one window runs
    plain window attention (``run(x, None, None)``), its input tied to the unused HAT weights by
    :func:`tie_zero_gradients` when training. Otherwise the graph decides, with ``live``, a (1,)
    bool tensor: FX tracing runs both branches and selects one (the traced output is eager's, bit
    for bit); export, whose graph should not run a stage twice, computes the carrier tokens and
    passes ``live`` to the blocks, which hide them (:func:`hidden_prefix_bias`) and do not
    propagate them where it is False.
    """
    if decided_in_python(rows, cols):
        if rows * cols > 1:
            return run(x, carrier_tokens(), None)
        if torch.is_grad_enabled():
            x = tie_zero_gradients(x, carrier_parameters())
        return run(x, None, None)
    live = graph_condition(rows * cols, x)
    if fx_proxy(rows, cols):
        return select(live, run(x, carrier_tokens(), None), run(x, None, None))
    return run(x, carrier_tokens(), live)


def tie_zero_gradients(x: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """``x`` tied to ``params`` by an exact zero, so that unused carrier-token weights get zero
    gradients rather than none: DistributedDataParallel (without ``find_unused_parameters``)
    expects a gradient for every parameter, and training on one device or several then treats
    these weights alike."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return x
    # Sums over empty slices: exactly 0 whatever the weights hold (even inf or NaN), no arithmetic.
    return x + sum(p.reshape(-1)[:0].sum() for p in params).to(x.dtype)


class CarrierTokenAttention:
    """Mixin giving a window-attention block (an ``nn.Module``) the HAT weights and steps.

    The weights are registered on the block itself, under the names of the official FasterViT
    checkpoints: ``hat_norm1``, ``hat_attn`` (attention among carrier tokens with a continuous
    relative position bias over the carrier grid), ``hat_norm2``, ``hat_mlp``, ``hat_pos_embed``
    (an MLP position embedding of the carrier grid), layer scales ``gamma1``/``gamma2`` (None when
    off) and, with propagation, the ``propagation_index`` buffer.
    """

    def init_carrier_attention(self, dim: int, num_heads: int, window_size: int, ct_size: int,
                               mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                               attn_drop: float = 0.0, drop_path: float = 0.0,
                               layer_scale: float | None = None, propagate: bool = False) -> None:
        """Register the HAT weights of one block (in the order of the official model)."""
        def scale() -> nn.Parameter | None:
            return nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale is not None else None

        self.ct_size = ct_size
        self.hat_norm1 = nn.LayerNorm(dim)
        self.hat_norm2 = nn.LayerNorm(dim)
        self.hat_attn = WindowAttention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                        attn_drop=attn_drop, proj_drop=drop)
        self.hat_mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio), drop=drop)
        self.hat_drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.hat_pos_embed = AbsolutePositionEmbedding(dim)
        self.gamma1 = scale()
        self.gamma2 = scale()
        if propagate:
            self.register_buffer("propagation_index", propagation_index(window_size, ct_size),
                                 persistent=False)

    @staticmethod
    def _scaled(y: torch.Tensor, gamma: nn.Parameter | None) -> torch.Tensor:
        return y if gamma is None else y * gamma

    def carrier_global_attention(self, carrier_tokens: torch.Tensor, carrier_grid: tuple[int, int]
                                 ) -> torch.Tensor:
        """Window-major carrier tokens (B, nw*ct*ct, C) on ``carrier_grid`` after position embedding,
        attention among all of them, and the carrier MLP (each a residual branch)."""
        ct = self.hat_pos_embed(carrier_tokens, carrier_grid, self.ct_size)
        ct = ct + self.hat_drop_path(self._scaled(
            self.hat_attn(self.hat_norm1(ct), carrier_grid, 0, self.ct_size), self.gamma1))
        return ct + self.hat_drop_path(self._scaled(self.hat_mlp(self.hat_norm2(ct)), self.gamma2))

    def propagate_carrier_tokens(self, windows: torch.Tensor, ct_windows: torch.Tensor,
                                 live: torch.Tensor | None = None) -> torch.Tensor:
        """Add each window's carrier tokens (B*nw, ct*ct, C), upsampled, onto its tokens (B*nw, ws*ws, C)
        (scaled by ``gamma1``; nothing added where ``live`` is False)."""
        spread = self._scaled(ct_windows[:, self.propagation_index], self.gamma1)
        return windows + (spread if live is None else spread * live.to(spread.dtype))
