"""A weight-sharing FasterViT over a search space: every subnet of the space runs on one model.

Which HAT settings share weights (FasterViT, arXiv 2306.06189; the idea of training one network
for many sub-architectures is Once-for-All's, arXiv 1908.09791):

- ``window_size`` and ``ct_size`` change no parameter shape: the position terms are MLPs over
  coordinates and carrier tokens are pooled from the stage input;
- ``hat`` off (or ``ct_size`` 0) in a stage leaves its carrier-token weights unused, a strict subset;
- a stage of d blocks is the first d blocks of a deeper one; the last of those d does what a
  stage's last block does (propagation, with ``do_propagation``).

So the supernet is a :class:`~fvlab.models.fastervit.FasterViT` with the largest depths of the
space and HAT weights in every transformer stage where some subnet of the space turns HAT on. A
subnet is set at run time (:meth:`FasterViTSupernet.set_subnet`, :meth:`FasterViTSupernet.subnet`)
by setting each stage's and block's geometry attributes, so the forward pass is FasterViT's own:
with a subnet set, the supernet computes what a stand-alone ``FasterViT`` built with the subnet's
arguments computes when it holds the subnet's weights (:func:`extract_subnet`).
"""

from __future__ import annotations

import os
import random
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from fvlab.models.factory import arch_defaults
from fvlab.models.fastervit import NUM_CONV_STAGES, FasterViT, _per_stage
from fvlab.models.hat import propagation_index, tie_zero_gradients

__all__ = ["SUBNET_KEYS", "FasterViTSupernet", "extract_subnet", "recalibrate_batchnorm"]

# FasterViT arguments that a subnet may set: none of them changes a parameter's shape.
SUBNET_KEYS = ("depths", "window_size", "ct_size", "hat", "do_propagation")


def _size(key: str, value: Any, n: int) -> float:
    """How large a choice of ``key`` is, to order choices: the sum over stages (True counts 1)."""
    if key == "do_propagation":
        return float(bool(value))
    kind = bool if key == "hat" else int
    return float(sum(_per_stage(key, value, n, kind)))


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
                f"supernet space key(s) {', '.join(map(repr, unknown))} would change parameter shapes; "
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
                            "ct_size": [1 if h else 0 for h in hat_weights], "do_propagation": False})
        self.space = choices
        self.base_arch = base
        self.max_depths = max_depths
        self.hat_weights = hat_weights
        self._resolved: dict[str, _Subnet] = {}
        self._active: dict[str, Any] = {}
        self._inactive: list[nn.Parameter] = []
        self.set_subnet(self.largest_subnet())

    # ---- which subnet ---------------------------------------------------------------

    @property
    def active_subnet(self) -> dict[str, Any]:
        """The active subnet's settings (a value per key of ``SUBNET_KEYS``)."""
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
        config = {k: pick(v, key=lambda c, k=k: _size(k, c, n)) for k, v in self.space.items()}
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
            config = {k: rng.choice(v) for k, v in self.space.items()}
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
        self._active = {k: sub.arch[k] for k in SUBNET_KEYS}

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
        sub = _Subnet(
            arch={**arch, "depths": list(depths)}, depths=list(model.depths),
            window_size=list(model.window_size), ct_size=list(model.ct_size),
            propagate=model.model_args["do_propagation"] and any(model.ct_size),
            model_args=dict(model.model_args),
            parameter_names=frozenset(name for name, _ in model.named_parameters()),
            state_keys=tuple(model.state_dict().keys()))
        if len(self._resolved) >= 4096:  # bounded: random subnets of a large space
            self._resolved.clear()
        self._resolved[key] = sub
        return sub

    # ---- forward and accounting -------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """FasterViT's forward on the active subnet; the weights it leaves unused get zero gradients."""
        if torch.is_grad_enabled() and self._inactive:
            x = tie_zero_gradients(x, self._inactive)
        return super().forward_features(x)

    def idle_parameters(self, image_size: int | Sequence[int]) -> list[nn.Parameter]:
        """Weights the active subnet does not use at ``image_size``: those outside it, and its own
        carrier-token weights of stages whose map is one window there."""
        seen = {id(p) for p in self._inactive}
        return [*self._inactive, *(p for p in super().idle_parameters(image_size) if id(p) not in seen)]


def extract_subnet(supernet: FasterViTSupernet, config: Mapping[str, Any] | None = None,
                   path: str | Path | None = None, batches: Iterable[Any] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a subnet (default: the active one) as a stand-alone ``FasterViT``.

    It loads (strictly) into ``FasterViT(**supernet.subnet_arch(config))``. With ``path``, also
    writes ``{"state_dict": ..., "arch": ...}`` there, a checkpoint that ``checkpoint_path`` of
    an arch (``fvlab fit``, ``create_model``) reads like any other. With ``batches``, BatchNorm
    is first recalibrated for the subnet on them (:func:`recalibrate_batchnorm`): without, the
    running statistics are whatever the supernet holds, a mix over every subnet it trained unless
    this subnet was just recalibrated (``fvlab.sweep.oneshot.extract_trial_subnet`` recalibrates
    on the batches its evaluation used).
    """
    with supernet.subnet(config) if config is not None else nullcontext():
        if batches is not None:
            recalibrate_batchnorm(supernet, batches)
        keys = supernet._resolve(supernet.active_subnet).state_keys
        arch = supernet.subnet_arch()
        state = supernet.state_dict()
        weights = {k: state[k].detach().clone() for k in keys}
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
