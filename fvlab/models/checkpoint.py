"""Checkpoint files: the one trust policy for reading them, unwrapping their weights, strict loading.

The policy: a checkpoint file is read as tensors and plain values only (``torch.load`` with
``weights_only=True``, allowing the few globals official checkpoints pickle). Loading any pickle,
which can run code, takes an explicit opt-in: ``trust_checkpoint=True`` for one read,
:func:`trusted_checkpoints` for a block, or the CLI's ``--trust-checkpoint`` (which sets it for
the command). Lightning's own checkpoint loading follows the same setting: pass
``weights_only=not checkpoints_trusted()``.
"""

from __future__ import annotations

import argparse
import pickle
import re
from contextlib import contextmanager
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

__all__ = ["CheckpointMismatchError", "UntrustedCheckpointError", "checkpoints_trusted", "load_state_dict_strictly",
           "read_checkpoint", "trust_checkpoints", "trusted_checkpoints", "unwrap_state_dict"]


class UntrustedCheckpointError(ValueError):
    """A checkpoint that holds more than tensors and the plain values official checkpoints hold."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model."""


# ---- trust --------------------------------------------------------------------------------

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


# ---- weights ------------------------------------------------------------------------------

# Where a LightningModule keeps its network in its state dict, best first: fvlab's
# ImageClassifier keeps the EMA copy, the weights it validates and picks best.ckpt by, under
# "ema.module."; the trained weights under "model." (beside metric states such as
# "val_acc1_best.max_value").
LIGHTNING_EMA_PREFIX = "ema.module."
LIGHTNING_MODEL_PREFIX = "model."


def unwrap_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The network's tensors of an official, timm, Lightning or plain checkpoint, without wrapper prefixes.

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
    return state


def load_state_dict_strictly(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``model``, raising CheckpointMismatchError that lists every missing,
    unexpected or misshapen key (``source`` names the checkpoint in the message)."""
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
            f"checkpoint {source} does not fit this model; build the model with the "
            f"configuration the checkpoint was trained with"
            + show("shape mismatches", mismatched) + show("missing in checkpoint", missing)
            + show("unexpected in checkpoint", unexpected))
    model.load_state_dict(state, strict=True)
