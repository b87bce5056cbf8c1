"""``fvlab.models.factory``: create_model's unknown variants, checkpoints it loads (ours, mismatched
ones listing their keys), and ``import fvlab`` exposing it."""

from __future__ import annotations

import warnings

import pytest
import torch

import fvlab
from fvlab.models import CheckpointMismatchError, create_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_unknown_variant_lists_known_names() -> None:
    with pytest.raises(ValueError, match="fastervit_tiny"):
        create_model("fastervit_99")


def test_mismatched_checkpoint_lists_keys(tmp_path) -> None:
    torch.save(create_model("fastervit_micro").state_dict(), tmp_path / "micro.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        create_model("fastervit_micro", dim=24, checkpoint_path=tmp_path / "micro.pth")
    message = str(err.value)
    assert "shape mismatches" in message and "patch_embed.conv_down.3.weight" in message
    state = create_model("fastervit_micro").state_dict()
    del state["head.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match="missing in checkpoint"):
        create_model("fastervit_micro", checkpoint_path=tmp_path / "partial.pth")


def test_our_own_checkpoint_round_trips(tmp_path) -> None:
    model = create_model("fastervit_micro", num_classes=7).eval()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "lightning.ckpt")
    loaded = create_model("fastervit_micro", num_classes=7,
                          checkpoint_path=tmp_path / "lightning.ckpt").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_import_fvlab_exposes_model_api() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fvlab.create_model("fastervit_micro")
    assert isinstance(model, fvlab.FasterViT)
