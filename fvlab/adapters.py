"""The one place fvlab uses what its libraries do not publish, each with the reason there is no public way.

tests/test_adapters.py fails when a library changes one of these, so a timm or Lightning upgrade
that breaks them is found here, not in a run.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

# timm publishes no feature-index helper or group sentinel; its own models import these two from
# its private modules, and fvlab's models follow timm's conventions (forward_intermediates'
# indices, group_matcher's "group with the previous block").
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP

__all__ = ["feature_take_indices", "MATCH_PREV_GROUP", "CHECKPOINT_PATH_KEYS", "relocate_checkpoint_state",
           "tensorboard_writer_started", "tensorboard_adds_hp_metric", "ConfigOverCheckpointHparams"]

# The path-valued keys of ``ModelCheckpoint.state_dict()``. Lightning restores a ModelCheckpoint's
# best score only when the checkpoint's ``dirpath`` is the callback's own, and offers no way to
# resume another directory's checkpoint with its best score (a sweep trial continued in a new
# attempt directory needs exactly that), so the saved paths are moved to the new directory.
CHECKPOINT_PATH_KEYS = ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path")


def relocate_checkpoint_state(callbacks: Mapping[str, Any], old_dir: str | os.PathLike,
                              new_dir: str | os.PathLike) -> int:
    """Point every ModelCheckpoint state in a checkpoint's ``callbacks`` from ``old_dir`` to ``new_dir``; how many."""
    old, new = os.path.realpath(old_dir), os.path.realpath(new_dir)

    def moved(path: Any) -> Any:
        return new + path[len(old):] if isinstance(path, str) and path.startswith(old) else path

    count = 0
    for key, state in callbacks.items():
        if not (key.startswith("ModelCheckpoint") and isinstance(state, dict)):
            continue
        for name in CHECKPOINT_PATH_KEYS:
            if name in state:
                state[name] = moved(state[name])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {moved(path): score for path, score in state["best_k_models"].items()}
        count += 1
    return count


def tensorboard_writer_started(logger: Any) -> bool:
    """Whether a TensorBoardLogger has made its SummaryWriter yet.

    Its public ``experiment`` makes the writer (and an events file) on first access, so asking
    through it would start one; the logger keeps the answer only in ``_experiment``.
    """
    return getattr(logger, "_experiment", None) is not None


def tensorboard_adds_hp_metric(logger: Any) -> bool:
    """Whether a TensorBoardLogger was made with ``default_hp_metric=True`` (it adds a stray ``hp_metric``).

    The logger keeps its constructor argument only in ``_default_hp_metric``.
    """
    return bool(getattr(logger, "_default_hp_metric", False))


class ConfigOverCheckpointHparams:
    """A LightningCLI mixin: a subcommand's ``--ckpt_path`` gives the weights, never the model's settings.

    LightningCLI (``run=True``) reads a checkpoint's ``hyper_parameters`` over the parsed ``model``
    section in its private ``_parse_ckpt_path``, with no switch to turn it off. fvlab's run config is
    the experiment's (file, variant, command line): another variant's checkpoint must fail to load
    rather than quietly rebuild that variant, and ``--model.*`` options must hold.
    """

    def _parse_ckpt_path(self) -> None:
        """Leave the parsed config as it is."""
