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


# ---- loading a checkpoint never runs code unless trusted -------------------------------------


class WritesAFile:
    """Unpickled, it opens (creates) a file: stands for any code a downloaded pickle could run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint with valid fastervit_micro weights and a pickle that writes ``marker`` when loaded."""
    marker = tmp_path / "pwned"
    path = tmp_path / "downloaded.pth"
    state = create_model("fastervit_micro", num_classes=4).state_dict()
    torch.save({"state_dict": state, "payload": WritesAFile(marker)}, path)
    return path, marker


def test_crafted_checkpoint_is_refused_unless_trusted(tmp_path: Path) -> None:
    from fvlab.models import UntrustedCheckpointError, trusted_checkpoints

    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(UntrustedCheckpointError, match=r"downloaded\.pth.*pickles io\.open.*--trust-checkpoint"):
        create_model("fastervit_micro", num_classes=4, checkpoint_path=path)
    assert not marker.exists()
    create_model("fastervit_micro", num_classes=4, checkpoint_path=path, trust_checkpoint=True)
    assert marker.exists()  # trusted: the pickle ran, as torch.load(weights_only=False) does
    marker.unlink()
    with trusted_checkpoints():
        create_model("fastervit_micro", num_classes=4, checkpoint_path=path)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UntrustedCheckpointError):  # the trust ended with the block
        create_model("fastervit_micro", num_classes=4, checkpoint_path=path)
    assert not marker.exists()


def test_official_layout_with_argparse_namespace_loads_without_trust(tmp_path: Path) -> None:
    import argparse

    ref = create_model("fastervit_micro", num_classes=4)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p))
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ref(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    # As the NVlabs (timm train script) files hold them: options, optimizer, EMA, metric.
    args = argparse.Namespace(model="faster_vit_0_224", lr=1e-3, input_size=[3, 224, 224], mean=None,
                              betas=(0.9, 0.999), amp=True, device="cuda:0", drop_path=0.2)
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    path = tmp_path / "fastervit_0_224_1k.pth.tar"
    torch.save({"epoch": 310, "arch": "faster_vit_0_224", "state_dict": state, "optimizer": optimizer.state_dict(),
                "version": 2, "args": args, "metric": 78.2, "state_dict_ema": state}, path)
    model = create_model("fastervit_micro", num_classes=4, checkpoint_path=path)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # for that load only


def test_cli_refuses_a_crafted_checkpoint_with_exit_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    path, marker = crafted_checkpoint(tmp_path)
    config = {"name": "from_download", "model": {"arch": {"name": "fastervit_micro", "checkpoint_path": str(path)}},
              "data": SYNTHETIC, "trainer": FAST_TRAINER}
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump(config, sort_keys=False))
    runs = tmp_path / "runs"
    plain = dict(config, model={"arch": {"name": "fastervit_micro"}})
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    # The opt-in loads it (and so runs its pickle: trusted means trusted), for that command only.
    assert main(["profile", str(experiment), "--no-throughput", "--trust-checkpoint", "--runs-dir", str(runs)]) == 0
    assert marker.exists()
    marker.unlink()
    capsys.readouterr()
    for argv in (["fit", str(experiment), "--runs-dir", str(runs)],
                 ["profile", str(experiment), "--no-throughput"],
                 # Lightning's own loading: a crafted --ckpt_path is refused before Lightning reads it.
                 ["fit", str(tmp_path / "plain.yaml"), "--ckpt_path", str(path), "--runs-dir", str(runs)],
                 ["validate", str(tmp_path / "plain.yaml"), "--ckpt_path", str(path), "--runs-dir", str(runs)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(path) in err and "--trust-checkpoint" in err and "Traceback" not in err, argv
        assert len(err.strip().splitlines()) == 1, err
        assert not marker.exists() and not runs.exists(), argv
