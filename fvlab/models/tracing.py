"""What changes when a forward pass is captured as a graph instead of run: every such case, named.

fvlab's models run one code path at every input size: window geometry, the carrier-token rule
and the position terms follow the actual feature size. A forward pass meets that size in one of
three forms, and each needs its own handling:

- **known to Python**: eager runs; ``torch.jit.trace`` (fvcore counts FLOPs by tracing one
  concrete size, :func:`spatial_size` gives it ints); ``torch.compile``, whose guards check a
  decision again for every new size. Decisions on sizes are Python ``if`` statements and
  geometry-dependent terms are cached per size.
- **symbolic, for export** (``torch.export`` / ONNX with a dynamic image size): no guard is ever
  checked at run time, so a decision on the size is computed by the graph itself and every
  geometry term is part of the graph (:func:`exporting`, :func:`export_geometry_scope`).
- **FX proxies** (``torch.fx`` symbolic tracing: timm's feature extraction, FX tools): as with
  export the graph decides, but the traced module must compute what eager computes, bit for
  bit, so both branches of a decision are in the graph and one is selected (:func:`select`).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.fx
from timm.models import register_notrace_function

__all__ = ["capturing_graph", "decided_in_python", "export_geometry_scope", "exporting", "fx_proxy",
           "graph_condition", "plain_strides_for_export", "select", "shared_in_export", "sizes_known",
           "spatial_size"]


# ---- which form the sizes take ------------------------------------------------------------


def sizes_known(*sizes: Any) -> bool:
    """Whether every size is a plain int (not a SymInt of export or torch.compile, not an FX Proxy)."""
    return all(isinstance(s, int) for s in sizes)


def decided_in_python(*sizes: Any) -> bool:
    """Whether a decision on ``sizes`` may be a Python ``if``: the sizes are ints, or torch.compile
    guards the decision (it recompiles for a size that decides otherwise)."""
    return sizes_known(*sizes) or (torch.compiler.is_compiling() and not exporting())


def fx_proxy(*values: Any) -> bool:
    """Whether any value is a ``torch.fx`` Proxy: the forward pass is being traced symbolically."""
    return any(isinstance(v, torch.fx.Proxy) for v in values)


def exporting() -> bool:
    """Whether the forward pass is being exported (``torch.export``, ONNX)."""
    return torch.compiler.is_exporting()


def capturing_graph() -> bool:
    """Whether torch.compile or export captures the forward pass: values cached in Python (eval-mode
    position terms) would be baked into the graph as constants, so they are computed instead."""
    return torch.compiler.is_compiling() or exporting()


def spatial_size(x: torch.Tensor) -> tuple[Any, Any]:
    """(H, W) of a (B, C, H, W) map; plain ints under ``torch.jit.trace`` (fvcore counts FLOPs by
    tracing one concrete size: the caches and ``avg_pool2d`` then stay what eager runs)."""
    h, w = x.shape[-2:]
    if torch.jit.is_tracing():
        return int(h), int(w)
    return h, w


# ---- decisions the graph takes ---------------------------------------------------------------


@register_notrace_function  # reason: a tensor built from a size
def graph_condition(count: Any, like: torch.Tensor) -> torch.Tensor:
    """(1,) bool tensor ``count > 1`` on ``like``'s device, for a count that only the graph knows
    (a SymInt of export, a Proxy of FX tracing)."""
    return torch.zeros(1, dtype=torch.long, device=like.device).add(count) > 1


def select(condition: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    """FX tracing: one of two branches, both in the graph, chosen by a (1,) bool ``condition``.

    Each branch runs exactly the operations eager runs on its side of the decision, so the traced
    module's output equals eager's bit for bit (masking the unused branch would change the shapes
    the matrix products run on, and with them the rounding); the unselected branch gets zero
    gradients.
    """
    return torch.where(condition, if_true, if_false)


# ---- export: graph size and strides ----------------------------------------------------------


# Geometry tables built during one export trace, shared by the blocks of a stage; None outside.
_EXPORT_GEOMETRY: contextvars.ContextVar[dict | None] = contextvars.ContextVar("_EXPORT_GEOMETRY", default=None)


@contextmanager
def export_geometry_scope() -> Iterator[None]:
    """While exporting, within the block: geometry tables of one key are built once and shared (the
    blocks of a stage all use its carrier grid's), instead of each block adding the same symbolic
    index arithmetic to the graph (export time, graph size). Elsewhere, and when nested: nothing."""
    if not exporting() or _EXPORT_GEOMETRY.get() is not None:
        yield
        return
    token = _EXPORT_GEOMETRY.set({})
    try:
        yield
    finally:
        _EXPORT_GEOMETRY.reset(token)


def shared_in_export(key: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, once per ``key`` within an :func:`export_geometry_scope` (else every call)."""
    shared = _EXPORT_GEOMETRY.get()
    if shared is None:
        return build()
    key = tuple(map(str, key))
    if key not in shared:
        shared[key] = build()
    return shared[key]


def plain_strides_for_export(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a fresh contiguous tensor while exporting, else unchanged.

    SDPA's symbolic output strides hold Max(1, n), which the exporter cannot prove viewable; a
    contiguous copy has plain strides (eager: no copy).
    """
    return x.clone(memory_format=torch.contiguous_format) if exporting() else x
