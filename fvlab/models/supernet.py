"""A weight-sharing FasterViT over a search space: every subnet of the space runs on one model.

Which HAT settings share weights (FasterViT, arXiv 2306.06189; the idea of training one network
for many sub-architectures is Once-for-All's, arXiv 1908.09791):

- ``window_size`` and ``ct_size`` change no parameter shape: the position terms are MLPs over
  coordinates and carrier tokens are pooled from the stage input;
- ``hat`` off (or ``ct_size`` 0) in a stage leaves its carrier-token weights unused, a strict subset;
- a stage of d blocks is the first d blocks of a deeper one; the last of those d does what a
  stage's last block does (propagation, with ``do_propagation``);
- a narrower layer (``dim``: stage-1 channels, doubled per stage; ``mlp_ratio``) is the first k
  channels or hidden units of the widest (AutoFormer's weight entanglement, arXiv 2107.00651;
  Once-for-All's elastic width), q, k and v each narrowed in packed qkv layers; fewer
  ``num_heads`` split the same channels into fewer, wider heads and take the first k outputs of
  the relative position bias.

So the supernet is a :class:`~fvlab.models.fastervit.FasterViT` with the largest depths and widths
of the space and HAT weights in every transformer stage where some subnet of the space turns HAT
on. A subnet is set at run time (:meth:`FasterViTSupernet.set_subnet`,
:meth:`FasterViTSupernet.subnet`) by setting each stage's and block's geometry attributes, so the
forward pass is FasterViT's own; a narrower subnet runs its stand-alone structure (built on the
meta device) on leading blocks of the supernet's tensors (``torch.func.functional_call``, so
gradients and BatchNorm statistics land in the supernet's). Either way, with a subnet set, the
supernet computes what a stand-alone ``FasterViT`` built with the subnet's arguments computes
when it holds the subnet's weights (:func:`extract_subnet`).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fvlab.models.factory import arch_defaults
from fvlab.models.fastervit import NUM_CONV_STAGES, FasterViT, _per_stage
from fvlab.models.hat import propagation_index, tie_zero_gradients

__all__ = ["SUBNET_KEYS", "SHAPE_KEYS", "WIDTH_KEYS", "FasterViTSupernet", "extract_subnet",
           "recalibrate_batchnorm"]

# FasterViT arguments that a subnet may set without changing a parameter's shape ...
SHAPE_KEYS = ("depths", "window_size", "ct_size", "hat", "do_propagation")
# ... and the widths: a narrower subnet uses the first k channels, hidden units or heads of each
# layer (weight entanglement, as in AutoFormer and Once-for-All).
WIDTH_KEYS = ("dim", "mlp_ratio", "num_heads")
SUBNET_KEYS = (*SHAPE_KEYS, *WIDTH_KEYS)
_STRUCTURES = 32  # narrow subnets whose meta-device structure is kept (built again in ~10 ms)


def _size(key: str, value: Any, n: int) -> float:
    """How large a choice of ``key`` is, to order choices: the sum over stages (True counts 1)."""
    if key == "do_propagation":
        return float(bool(value))
    if key in ("dim", "mlp_ratio"):
        return float(value)
    kind = bool if key == "hat" else int
    return float(sum(_per_stage(key, value, n, kind)))


def _first(tensor: torch.Tensor, shape: Sequence[int], packed: bool = False) -> torch.Tensor:
    """The leading ``shape`` block of ``tensor`` (the first k of every dimension); ``packed``: dim 0
    holds q, k and v one after the other, each narrowed to its first third of ``shape[0]``."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    if packed:
        rows = shape[0] // 3
        parts = tensor.view(3, tensor.shape[0] // 3, *tensor.shape[1:])
        return parts[(slice(None), slice(0, rows), *(slice(0, n) for n in shape[1:]))].reshape(shape)
    return tensor[tuple(slice(0, n) for n in shape)]


def _packed(name: str) -> bool:
    """Whether a parameter packs q, k and v along its first dimension (attention's ``qkv`` linears)."""
    return name.endswith(("qkv.weight", "qkv.bias"))


@dataclass(frozen=True)
class _Subnet:
    """What the supernet needs to know of one subnet: read off a stand-alone model built on the
    meta device (which also checks the arguments the way FasterViT does)."""

    arch: dict[str, Any]  # the stand-alone FasterViT's arguments
    depths: list[int]
    window_size: list[int]
    ct_size: list[int]  # 0 where the stage has no carrier tokens (hat off or ct_size 0)
    propagate: bool
    model_args: dict[str, Any]
    parameter_names: frozenset[str]
    state_keys: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]  # of the stand-alone model's state, persistent buffers included
    narrow: bool  # some weight is a leading block of the supernet's (a width below the largest)


class FasterViTSupernet(FasterViT):
    """A FasterViT holding every subnet of a search space over ``SUBNET_KEYS``; one is active.

    Args:
        space: argument name (one of ``SUBNET_KEYS``) -> the values it takes in the space, each
            as ``FasterViT`` accepts it (an int or bool for every stage, or one per stage).
        **arch: the other ``FasterViT`` arguments, shared by every subnet (e.g. a variant's
            config plus ``num_classes``); a ``SUBNET_KEYS`` argument given here and not in
            ``space`` is fixed for every subnet.

    The model has the largest depth of the space in each stage and carrier-token weights in
    each transformer stage where some subnet has HAT on with ``ct_size`` > 0. Built with the
    largest subnet (:meth:`largest_subnet`) active. ``model_args`` (and with it a sweep's
    canonical form), ``idle_parameters``, ``feature_sizes`` and ``check_image_size`` describe the
    active subnet, as its stand-alone model would; the weights it does not use count as idle, and when training they get zero
    gradients (so DistributedDataParallel needs no ``find_unused_parameters``).
    """

    def __init__(self, space: Mapping[str, Sequence[Any]], **arch: Any):
        unknown = sorted(set(space) - set(SUBNET_KEYS))
        if unknown:
            raise ValueError(
                f"supernet space key(s) {', '.join(map(repr, unknown))} cannot share weights; "
                f"a supernet shares weights over {', '.join(SUBNET_KEYS)} only")
        for key, values in space.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"supernet space {key!r} must be a non-empty list of values, got {values!r}")
        base = {**arch_defaults(None), **arch}
        choices = {key: list(space.get(key, [base[key]])) for key in SUBNET_KEYS}
        depth_choices = [list(d) if isinstance(d, (list, tuple)) else d for d in choices["depths"]]
        if not all(isinstance(d, list) and d for d in depth_choices):
            raise ValueError(f"supernet space 'depths' values must be lists (one depth per stage), "
                             f"got {choices['depths']!r}")
        n = len(depth_choices[0])
        if any(len(d) != n for d in depth_choices):
            raise ValueError(f"supernet space 'depths' values must all have {n} stages, got {choices['depths']!r}")
        max_depths = [max(d[i] for d in depth_choices) for i in range(n)]
        hats = [_per_stage("hat", h, n, bool) for h in choices["hat"]]
        cts = [_per_stage("ct_size", c, n, int) for c in choices["ct_size"]]
        # Independent keys make a product space: stage i needs carrier weights if any hat choice
        # turns it on and any ct_size choice is positive there.
        hat_weights = [i >= NUM_CONV_STAGES and any(h[i] for h in hats) and any(c[i] > 0 for c in cts)
                       for i in range(n)]
        # Built with ct_size 1 wherever HAT weights exist: valid with any window, and the weights'
        # shapes do not depend on it. The active subnet's settings follow from set_subnet.
        super().__init__(**{**base, "depths": max_depths, "hat": hat_weights,
                            "ct_size": [1 if h else 0 for h in hat_weights], "do_propagation": False,
                            **self._widest(choices, n)})
        self.space = choices
        # The keys a subnet sets: the shape keys, and the widths the space searches (a width the
        # space leaves alone stays out of every subnet, as before widths could be searched).
        self.subnet_keys = [*SHAPE_KEYS, *(k for k in WIDTH_KEYS if k in space)]
        self.base_arch = base
        self.max_depths = max_depths
        self.hat_weights = hat_weights
        self._resolved: dict[str, _Subnet] = {}
        self._structures: OrderedDict[str, nn.Module] = OrderedDict()  # plain dict: not submodules
        self._own_modules: dict[str, nn.Module] | None = None
        self._active: dict[str, Any] = {}
        self._inactive: list[nn.Parameter] = []
        self.set_subnet(self.largest_subnet())

    @staticmethod
    def _widest(choices: Mapping[str, list[Any]], n: int) -> dict[str, Any]:
        """The largest width of each width key: every narrower choice is a leading block of it."""
        heads = [_per_stage("num_heads", h, n, int) for h in choices["num_heads"]]
        return {"dim": max(choices["dim"]), "mlp_ratio": max(choices["mlp_ratio"]),
                "num_heads": [max(h[i] for h in heads) for i in range(n)]}

    # ---- which subnet ---------------------------------------------------------------

    @property
    def active_subnet(self) -> dict[str, Any]:
        """The active subnet's settings (a value per key of ``subnet_keys``)."""
        return dict(self._active)

    def largest_subnet(self, image_size: int | Sequence[int] | None = None) -> dict[str, Any]:
        """Each key at its largest value (per-stage sum; True counts 1), except that with
        ``image_size`` the window size is the one whose subnet uses the most weights there."""
        return self._extreme(max, image_size)

    def smallest_subnet(self, image_size: int | Sequence[int] | None = None) -> dict[str, Any]:
        """Each key at its smallest value (per-stage sum; True counts 1), except that with
        ``image_size`` the window size is the one whose subnet uses the fewest weights there."""
        return self._extreme(min, image_size)

    def _extreme(self, pick: Any, image_size: int | Sequence[int] | None) -> dict[str, Any]:
        n = len(self.max_depths)
        config = {k: pick(self.space[k], key=lambda c, k=k: _size(k, c, n)) for k in self.subnet_keys}
        if image_size is None or len(self.space.get("window_size", ())) < 2:
            return config
        # A larger window is not a larger network: where a stage's map becomes one window its
        # carrier tokens stop, and their weights go idle (the one-window rule).
        def used(ws: Any) -> tuple[int, float]:
            arch = self._resolve({**config, "window_size": ws}).arch
            with torch.device("meta"):
                model = FasterViT(**arch)
            idle = sum(p.numel() for p in model.idle_parameters(image_size))
            return sum(p.numel() for p in model.parameters()) - idle, _size("window_size", ws, n)

        valid = []
        for ws in self.space["window_size"]:
            try:
                valid.append((used(ws), ws))
            except ValueError:
                continue
        if valid:
            config["window_size"] = pick(valid, key=lambda item: item[0])[1]
        return config

    def sample_subnet(self, rng: random.Random, attempts: int = 100) -> dict[str, Any]:
        """A random valid subnet of the space (each key uniform over its values)."""
        for _ in range(attempts):
            config = {k: rng.choice(self.space[k]) for k in self.subnet_keys}
            try:
                self._resolve(config)
            except ValueError:
                continue  # e.g. ct_size larger than window_size: not a subnet
            return config
        raise ValueError(f"no valid subnet in {attempts} random draws from the space {self.space}")

    def subnet_arch(self, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``FasterViT`` arguments of a subnet (default: the active one) as a stand-alone model."""
        return dict(self._resolve(self._active if config is None else config).arch)

    def set_subnet(self, config: Mapping[str, Any]) -> None:
        """Make ``config`` the active subnet (keys of ``SUBNET_KEYS``; a missing key takes the value
        the supernet was built with in ``arch``, else FasterViT's default)."""
        sub = self._resolve(config)
        device = next(self.parameters()).device
        for i, stage in enumerate(self.levels):
            stage.depth = sub.depths[i]
            if stage.conv:
                continue
            ws, ct = sub.window_size[i], sub.ct_size[i]
            stage.window_size, stage.ct_size = ws, ct
            if self.hat_weights[i]:
                stage.global_tokenizer.window_size = ws
                stage.global_tokenizer.ct_size = max(ct, 1)
            for j, block in enumerate(stage.blocks):
                block.window_size, block.ct_size = ws, ct
                block.propagate = sub.propagate and ct > 0 and j == sub.depths[i] - 1
                if block.propagate:
                    index = propagation_index(ws, ct)
                    block.register_buffer("propagation_index", index.to(device), persistent=False)
        self.depths, self.window_size, self.ct_size = list(sub.depths), list(sub.window_size), list(sub.ct_size)
        self.model_args = dict(sub.model_args)
        self._inactive = [p for name, p in self.named_parameters() if name not in sub.parameter_names]
        self._active = {k: sub.arch[k] for k in self.subnet_keys}

    @contextmanager
    def subnet(self, config: Mapping[str, Any]) -> Iterator["FasterViTSupernet"]:
        """Run with ``config`` active, then restore the subnet active before."""
        previous = self.active_subnet
        self.set_subnet(config)
        try:
            yield self
        finally:
            self.set_subnet(previous)

    def _resolve(self, config: Mapping[str, Any]) -> _Subnet:
        """Check ``config`` against the supernet's weights and FasterViT's rules; cached per config."""
        unknown = sorted(set(config) - set(SUBNET_KEYS))
        if unknown:
            raise ValueError(f"subnet key(s) {', '.join(map(repr, unknown))} are not subnet settings; "
                             f"a subnet sets {', '.join(SUBNET_KEYS)}")
        key = repr(sorted(config.items()))
        if key in self._resolved:
            return self._resolved[key]
        arch = {**self.base_arch, **config}
        depths = arch["depths"]
        if not isinstance(depths, (list, tuple)) or len(depths) != len(self.max_depths):
            raise ValueError(f"subnet depths must list {len(self.max_depths)} stages, got {depths!r}")
        for i, (d, most) in enumerate(zip(depths, self.max_depths)):
            if isinstance(d, int) and not isinstance(d, bool) and d > most:
                raise ValueError(f"subnet depths[{i}]={d} exceeds the supernet's {most} block(s) in stage {i}")
        # Checks every other argument as FasterViT does, without allocating weights.
        with torch.device("meta"):
            model = FasterViT(**arch)
        for i, ct in enumerate(model.ct_size):
            if ct > 0 and not self.hat_weights[i]:
                raise ValueError(
                    f"subnet turns HAT on in stage {i} (hat, ct_size={ct}), where no subnet of the "
                    f"supernet's space does, so it has no carrier-token weights there")
        state = model.state_dict()
        full = dict(self.state_dict(keep_vars=True))
        for name, value in state.items():
            if name not in full or any(a > b for a, b in zip(value.shape, full[name].shape)):
                raise ValueError(f"subnet {name} {tuple(value.shape)} is wider than the supernet's "
                                 f"{tuple(full[name].shape) if name in full else '(absent)'}: a subnet's widths "
                                 f"(dim, mlp_ratio, num_heads) must be at most the space's largest")
        sub = _Subnet(
            arch={**arch, "depths": list(depths)}, depths=list(model.depths),
            window_size=list(model.window_size), ct_size=list(model.ct_size),
            propagate=model.model_args["do_propagation"] and any(model.ct_size),
            model_args=dict(model.model_args),
            parameter_names=frozenset(name for name, _ in model.named_parameters()),
            state_keys=tuple(state.keys()),
            shapes={name: tuple(value.shape) for name, value in state.items()},
            narrow=any(tuple(value.shape) != tuple(full[name].shape) for name, value in state.items()))
        if len(self._resolved) >= 4096:  # bounded: random subnets of a large space
            self._resolved.clear()
        self._resolved[key] = sub
        return sub

    # ---- forward and accounting -------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """FasterViT's forward on the active subnet; the weights it leaves unused get zero gradients."""
        if torch.is_grad_enabled() and self._inactive:
            x = tie_zero_gradients(x, self._inactive)
        if self._narrow():
            if torch.is_grad_enabled() and any(stage.grad_checkpointing for stage in self.levels):
                # A checkpointed block recomputes in backward, after functional_call has put the
                # structure's meta weights back: recompute the whole call, which swaps them in again.
                return checkpoint(self._call_narrow, "forward_features", x, use_reentrant=False)
            return self._call_narrow("forward_features", x)
        return super().forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """FasterViT's head on the active subnet's features (its first channels of the norm and head)."""
        if self._narrow():
            return self._call_narrow("forward_head", x, pre_logits)
        return super().forward_head(x, pre_logits=pre_logits)

    def forward_intermediates(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """FasterViT's per-stage feature maps of the active subnet (its own widths when narrow)."""
        if self._narrow():
            return self._call_narrow("forward_intermediates", x, **kwargs)
        return super().forward_intermediates(x, **kwargs)

    # ---- narrow subnets: the stand-alone structure run on leading blocks of the weights ----

    def _narrow(self) -> bool:
        return bool(self._active) and self._resolve(self._active).narrow

    def _structure(self) -> nn.Module:
        """The active subnet's stand-alone FasterViT on the meta device (its geometry, no weights)."""
        key = repr(sorted(self._active.items()))
        if key in self._structures:
            self._structures.move_to_end(key)
            return self._structures[key]
        with torch.device("meta"):
            model = FasterViT(**self._resolve(self._active).arch)
        self._structures[key] = model
        while len(self._structures) > _STRUCTURES:
            self._structures.popitem(last=False)
        return model

    def subnet_tensors(self, config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The subnet's weights and persistent buffers as views of the supernet's: the leading block
        of each (q, k and v each narrowed in packed qkv layers). Gradients and BatchNorm updates reach
        the supernet's tensors."""
        sub = self._resolve(self._active if config is None else config)
        full = dict(self.state_dict(keep_vars=True))
        return {name: _first(full[name], shape, _packed(name)) for name, shape in sub.shapes.items()}

    def _call_narrow(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method`` of the active subnet's stand-alone structure, run on :meth:`subnet_tensors`."""
        structure = self._structure()
        if self._own_modules is None:  # the module tree is fixed once built: read it once
            self._own_modules = dict(self.named_modules())
        own = self._own_modules
        tensors = self.subnet_tensors()
        for name, module in structure.named_modules():
            source = own.get(name)
            if source is not None:  # the supernet's state decides: train/eval, recalibration, drop path
                module.training = source.training
                # drop_prob: the supernet's schedule over its largest depths, as a full-width subnet runs.
                for attr in ("momentum", "drop_prob"):
                    if hasattr(source, attr) and hasattr(module, attr):
                        setattr(module, attr, getattr(source, attr))
            if getattr(module, "propagate", False):
                index = propagation_index(module.window_size, module.ct_size)
                tensors[f"{name}.propagation_index"] = index.to(args[0].device)
        return torch.func.functional_call(_Method(structure, method), {f"module.{k}": v for k, v in tensors.items()},
                                          args, kwargs, strict=True)

    def used_parameter_count(self, image_size: int | Sequence[int]) -> int:
        """Parameters the active subnet uses at ``image_size``, as its stand-alone model counts them
        (a narrow subnet uses leading blocks of tensors, which ``idle_parameters`` cannot say)."""
        structure = self._structure()
        idle = {id(p) for p in structure.idle_parameters(image_size)}
        return sum(p.numel() for p in structure.parameters() if id(p) not in idle)

    def idle_parameters(self, image_size: int | Sequence[int]) -> list[nn.Parameter]:
        """Weights the active subnet does not use at ``image_size``: those outside it, and its own
        carrier-token weights of stages whose map is one window there."""
        seen = {id(p) for p in self._inactive}
        return [*self._inactive, *(p for p in super().idle_parameters(image_size) if id(p) not in seen)]


class _Method(nn.Module):
    """Calls one method of a module, so that ``functional_call`` can run more than ``forward``."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``module.<method>(*args, **kwargs)``."""
        return getattr(self.module, self.method)(*args, **kwargs)


def extract_subnet(supernet: FasterViTSupernet, config: Mapping[str, Any] | None = None,
                   path: str | Path | None = None, batches: Iterable[Any] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a subnet (default: the active one) as a stand-alone ``FasterViT``.

    It loads (strictly) into ``FasterViT(**supernet.subnet_arch(config))``. With ``path``, also
    writes ``{"state_dict": ..., "arch": ...}`` there, a checkpoint that ``checkpoint_path`` of
    an arch (``fvlab fit``, ``create_model``) reads like any other. With ``batches``, BatchNorm
    is first recalibrated for the subnet on them (:func:`recalibrate_batchnorm`): without, the
    running statistics are whatever the supernet holds, a mix over every subnet it trained unless
    this subnet was just recalibrated (``fvlab.sweep.oneshot.extract_trial_subnet`` recalibrates
    on the batches its evaluation used). The supernet's own statistics are restored afterwards.
    """
    with supernet.subnet(config) if config is not None else nullcontext():
        # The supernet keeps its own statistics: only the written subnet gets the recalibrated ones.
        kept = {name: b.detach().clone() for name, b in supernet.named_buffers()} if batches is not None else {}
        if batches is not None:
            recalibrate_batchnorm(supernet, batches)
        arch = supernet.subnet_arch()
        weights = {k: v.detach().clone() for k, v in supernet.subnet_tensors().items()}
        with torch.no_grad():
            for name, buffer in supernet.named_buffers():
                if name in kept:
                    buffer.copy_(kept[name])
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside, then renamed: a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            torch.save({"state_dict": {k: v.cpu() for k, v in weights.items()}, "arch": arch}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return weights


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (inputs, or (inputs, labels)),
    as the plain average over them; returns the number of batches used.

    A supernet's running statistics mix every subnet trained; each evaluated subnet needs its
    own (AttentiveNAS recalibrates on 64 batches). Only the BatchNorms run in training mode
    (dropout and drop path stay off); the model's mode is restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    was_training = model.training
    device = next(model.parameters()).device
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: every batch weighs the same
    model.eval()
    for bn in norms:
        bn.train()
    used = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            used += 1
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return used
