"""fvlab loads its own checkpoints: best.ckpt written by `fvlab fit`, with and without EMA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fvlab.cli import main
from fvlab.models import create_model

pytestmark = pytest.mark.filterwarnings("ignore")

SYNTHETIC = {"class_path": "fvlab.data.SyntheticDataModule",
             "init_args": {"image_size": 32, "num_classes": 4, "in_chans": 3, "num_samples": 64,
                           "val_samples": 32, "batch_size": 16}}
FAST_TRAINER = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                "log_every_n_steps": 1, "num_sanity_val_steps": 0}


def fit(tmp_path: Path, name: str, seed: int = 0, **model: object) -> Path:
    """Train a tiny experiment with `fvlab fit`; return its run directory."""
    config = {"name": name, "seed_everything": seed,
              "model": {"arch": {"name": "fastervit_micro"}, "lr": 1e-3, **model},
              "data": SYNTHETIC, "trainer": FAST_TRAINER}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["fit", str(path), "--runs-dir", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / name / "default"
    assert json.loads((run / "metrics.json").read_text())["status"] == "complete"
    return run


def weights(checkpoint: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers stored under ``prefix`` in a Lightning checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("ema", [False, True], ids=["plain", "ema"])
def test_best_checkpoint_of_a_fit_loads_and_fine_tunes(tmp_path: Path, ema: bool) -> None:
    best = fit(tmp_path, "source", ema=ema) / "checkpoints" / "best.ckpt"
    trained = weights(best, "model.")
    expected = weights(best, "ema.module.") if ema else trained
    if ema:  # the two sets differ, so loading the wrong one cannot pass
        assert expected.keys() == trained.keys()
        assert any(not torch.equal(expected[k], trained[k]) for k in trained)

    model = create_model("fastervit_micro", num_classes=4, checkpoint_path=best)
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)

    # Fine-tuning from it (a different seed: a fresh start would land far away). A learning
    # rate far below float32 resolution, held constant, keeps the weights where they loaded.
    run = fit(tmp_path, "finetune", seed=1, arch={"name": "fastervit_micro",
                                                    "checkpoint_path": str(best)},
              lr=1e-12, scheduler="none")
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2
    tuned = weights(last, "model.")
    parameters = [name for name, _ in model.named_parameters()]
    assert all(torch.allclose(tuned[k], expected[k], atol=1e-7) for k in parameters)
    if ema:
        assert not all(torch.allclose(tuned[k], trained[k], atol=1e-7) for k in parameters)
    # BatchNorm statistics move with every training batch: it did train.
    running = [k for k in tuned if k.endswith("running_mean")]
    assert any(not torch.equal(tuned[k], expected[k]) for k in running)
