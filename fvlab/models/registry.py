"""Named FasterViT variants, checkpoint loading, and registration with timm."""

from __future__ import annotations

import argparse
import inspect
import pickle
import re
from contextlib import contextmanager
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from fvlab.models.fastervit import FasterViT
from fvlab.models.swin import SWIN_VARIANTS, HatSwinTransformer, create_hat_swin, load_swin_weights

__all__ = ["VARIANTS", "SWIN_VARIANTS", "arch_defaults", "CheckpointMismatchError", "UntrustedCheckpointError", "build_model", "create_model",
           "list_variants", "load_checkpoint", "read_checkpoint", "trust_checkpoints", "trusted_checkpoints",
           "checkpoints_trusted", "checkpoint_filter_fn", "variant_config"]

_IMAGENET = dict(depths=[2, 3, 6, 5], num_heads=[2, 4, 8, 16], window_size=7, ct_size=2,
                 hat=[False, False, True, False], mlp_ratio=4.0)

# The ImageNet-1K configurations of the official registry, plus small CPU-sized ones.
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

# Buffers of the official implementation that are pure functions of geometry (or caches of
# position-MLP outputs): recomputed here, never loaded.
DERIVED_SUFFIXES = ("relative_coords_table", "relative_position_index", "relative_bias")
# The official tokenizer registers its depthwise conv twice (".pos_embed." and this alias).
TOKENIZER_ALIAS = ".global_tokenizer.to_global_feature.pos."

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


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model."""


def list_variants() -> list[str]:
    """Names of the built-in variants: FasterViT's, then the ``hat_swin_*`` ones."""
    return [*VARIANTS, *SWIN_VARIANTS]


def _constructor_defaults(cls: type) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # a subclass's defaults win over its base's
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params.update({n: p.default for n, p in inspect.signature(init).parameters.items()
                       if p.default is not inspect.Parameter.empty})
    return params


def arch_defaults(name: str | None) -> dict[str, Any]:
    """Every constructor argument's value for the named variant (None: FasterViT's own defaults)."""
    if name in SWIN_VARIANTS:
        return {**_constructor_defaults(HatSwinTransformer), **SWIN_VARIANTS[name]}
    return {**_constructor_defaults(FasterViT), **VARIANTS.get(name or "", {})}


def _valid_arguments(name: str | None) -> set[str]:
    if name in SWIN_VARIANTS:
        return set(_constructor_defaults(HatSwinTransformer)) - {"device", "dtype"}
    return set(inspect.signature(FasterViT.__init__).parameters) - {"self"}


def variant_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of a named variant with ``overrides`` applied."""
    if name not in VARIANTS:
        raise ValueError(f"unknown FasterViT variant {name!r}; known: {', '.join(VARIANTS)}")
    return {**VARIANTS[name], **overrides}


class UntrustedCheckpointError(ValueError):
    """A checkpoint that holds more than tensors and the plain values official checkpoints hold."""


# Official NVlabs (timm train script) checkpoints pickle their argparse options beside the weights.
OFFICIAL_CHECKPOINT_GLOBALS = [argparse.Namespace]
_TRUST_CHECKPOINTS: ContextVar[bool] = ContextVar("fvlab_trust_checkpoints", default=False)


def trust_checkpoints(trust: bool = True) -> Token[bool]:
    """Let checkpoints run their pickled code for the rest of this context (the CLI's --trust-checkpoint)."""
    return _TRUST_CHECKPOINTS.set(trust)


@contextmanager
def trusted_checkpoints(trust: bool = True) -> Iterator[None]:
    """Within the block, checkpoint files load as fully trusted pickles (``trust``) or not."""
    token = trust_checkpoints(trust)
    try:
        yield
    finally:
        _TRUST_CHECKPOINTS.reset(token)


def checkpoints_trusted() -> bool:
    """Whether the current context trusts checkpoint files (``--trust-checkpoint``)."""
    return _TRUST_CHECKPOINTS.get()


def read_checkpoint(path: str | Path, *, trust_checkpoint: bool | None = None, mmap: bool = False) -> Any:
    """Load a checkpoint file as tensors and plain values; UntrustedCheckpointError for anything else.

    ``trust_checkpoint`` (default: the context's setting) loads any pickle, which can run code.
    ``mmap`` maps the tensors instead of reading them: a cheap check of a big file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if trust_checkpoint is None:
        trust_checkpoint = checkpoints_trusted()
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(OFFICIAL_CHECKPOINT_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not mmap or "mmap" not in str(err):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as err:
        # torch's own text suggests allowlisting the global: the opposite of what an unknown file needs.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        refused = f"it pickles {found.group(1)}" if found else str(err).split("\n", 1)[0][:200]
        raise UntrustedCheckpointError(
            f"checkpoint {path} holds more than tensors and plain values ({refused}); loading it could run code. Only if you trust this file, pass --trust-checkpoint "
              "(in Python: create_model(..., trust_checkpoint=True))") from None


# Where a LightningModule keeps its FasterViT in its state dict, best first: fvlab's
# ImageClassifier keeps the EMA copy, the weights it validates and picks best.ckpt by, under
# "ema.module."; the trained weights under "model." (beside metric states such as
# "val_acc1_best.max_value").
LIGHTNING_EMA_PREFIX = "ema.module."
LIGHTNING_MODEL_PREFIX = "model."


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: FasterViT | None = None,
                         use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Extract a FasterViT state dict from an official, timm, Lightning or plain checkpoint.

    A checkpoint written by ``fvlab fit`` with ``model.ema`` holds two sets of weights: the
    EMA ones (``ema.module.*``, what validation and best.ckpt went by) are taken with
    ``use_ema``, the trained ones (``model.*``) without it.
    """
    state = checkpoint
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    prefixes = (LIGHTNING_EMA_PREFIX, LIGHTNING_MODEL_PREFIX) if use_ema else (LIGHTNING_MODEL_PREFIX,)
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    # Wrappers: DataParallel/DDP ("module."), torch.compile ("_orig_mod.").
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if key.endswith(DERIVED_SUFFIXES):
            continue
        if TOKENIZER_ALIAS in key:
            key = key.replace(TOKENIZER_ALIAS, ".global_tokenizer.pos_embed.")
        out.setdefault(key, value)
    return out


def load_checkpoint(model: FasterViT, checkpoint_path: str | Path, use_ema: bool = True,
                    trust_checkpoint: bool | None = None) -> FasterViT:
    """Load a checkpoint file into ``model`` (its EMA weights if it has them and ``use_ema``),
    raising on any missing, unexpected or misshapen key (``trust_checkpoint``: see read_checkpoint)."""
    state = checkpoint_filter_fn(read_checkpoint(checkpoint_path, trust_checkpoint=trust_checkpoint), model,
                                 use_ema=use_ema)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        def show(title: str, keys: list[str]) -> str:
            more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
            return f"\n  {title} ({len(keys)}):\n    " + "\n    ".join(keys[:20]) + more if keys else ""
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint_path} does not fit this model; build the model with the "
            f"configuration the checkpoint was trained with"
            + show("shape mismatches", mismatched) + show("missing in checkpoint", missing)
            + show("unexpected in checkpoint", unexpected))
    model.load_state_dict(state, strict=True)
    return model


def create_model(name: str, checkpoint_path: str | Path | None = None, trust_checkpoint: bool | None = None,
                 **overrides: Any) -> FasterViT | HatSwinTransformer:
    """Build a named variant with ``overrides``; load ``checkpoint_path`` (official or ours) if given.

    A ``hat_swin_*`` variant also loads timm's Swin weights, its HAT weights then new (a warning
    names them; ``fvlab.models.swin.load_swin_weights`` also returns them).

    The checkpoint is read as tensors and plain values only; ``trust_checkpoint=True`` loads any
    pickle (it can run code: only for files you trust).
    """
    if name in SWIN_VARIANTS:
        model = create_hat_swin(name, **overrides)
        if checkpoint_path is not None:
            load_swin_weights(model, checkpoint_path, trust_checkpoint=trust_checkpoint)
        return model
    model = FasterViT(**variant_config(name, **overrides))
    model.pretrained_cfg = model.default_cfg = dict(default_cfgs[name].default.to_dict(), architecture=name)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, trust_checkpoint=trust_checkpoint)
    return model


def build_model(arch: str | Mapping[str, Any], trust_checkpoint: bool | None = None, **overrides: Any) -> FasterViT:
    """Build from an arch spec: a variant name, ``{name: ..., **overrides}`` or full arguments."""
    spec = {"name": arch} if isinstance(arch, str) else dict(arch)
    spec.update(overrides)
    name = spec.pop("name", None)
    checkpoint_path = spec.pop("checkpoint_path", None)
    valid = _valid_arguments(name)
    unknown = sorted(set(spec) - valid)
    if unknown:
        kind = "Swin" if name in SWIN_VARIANTS else "FasterViT"
        raise ValueError(f"unknown {kind} argument(s) {', '.join(map(repr, unknown))}; "
                         f"valid: name, checkpoint_path, {', '.join(sorted(valid))}")
    if name is None:
        model = FasterViT(**spec)
        if checkpoint_path is not None:
            load_checkpoint(model, checkpoint_path, trust_checkpoint=trust_checkpoint)
        return model
    return create_model(name, checkpoint_path=checkpoint_path, trust_checkpoint=trust_checkpoint, **spec)


def _timm_create(variant: str, pretrained: bool = False, **kwargs: Any) -> FasterViT:
    config = {k: v for k, v in VARIANTS[variant].items() if k not in kwargs}
    return build_model_with_cfg(
        FasterViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3),
                         feature_cls="getter"),
        **config, **kwargs)


@register_model
def fastervit_0(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-0 (31.4 M params, 3.37 GFLOPs at 224)."""
    return _timm_create("fastervit_0", pretrained, **kwargs)


@register_model
def fastervit_1(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-1 (53.4 M params, 5.33 GFLOPs at 224)."""
    return _timm_create("fastervit_1", pretrained, **kwargs)


@register_model
def fastervit_2(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-2 (75.9 M params, 8.78 GFLOPs at 224)."""
    return _timm_create("fastervit_2", pretrained, **kwargs)


@register_model
def fastervit_3(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-3 (159.6 M params, 18.4 GFLOPs at 224)."""
    return _timm_create("fastervit_3", pretrained, **kwargs)


@register_model
def fastervit_4(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-4 (365.6 M params, official registry config)."""
    return _timm_create("fastervit_4", pretrained, **kwargs)


@register_model
def fastervit_5(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-5 (957.5 M params)."""
    return _timm_create("fastervit_5", pretrained, **kwargs)


@register_model
def fastervit_6(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """FasterViT-6 (1360.3 M params)."""
    return _timm_create("fastervit_6", pretrained, **kwargs)


@register_model
def fastervit_tiny(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """A CPU-sized FasterViT for 64-128 px images (fvlab)."""
    return _timm_create("fastervit_tiny", pretrained, **kwargs)


@register_model
def fastervit_micro(pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """A smoke-test FasterViT for 32-64 px images (fvlab)."""
    return _timm_create("fastervit_micro", pretrained, **kwargs)
