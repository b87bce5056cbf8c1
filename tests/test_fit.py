"""`fvlab fit`: ImageClassifier, run directories, TensorBoard, bad input, failures, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fvlab.cli import main
from fvlab.data import SyntheticDataModule
from fvlab.lit.callbacks import MODEL_METRICS
from fvlab.lit.module import ImageClassifier
from fvlab.models import ArchConfig

pytestmark = pytest.mark.filterwarnings("ignore")

MICRO = {"name": "fastervit_micro"}
SYNTHETIC = {"class_path": "fvlab.data.SyntheticDataModule",
             "init_args": {"image_size": 32, "num_classes": 4, "in_chans": 3, "num_samples": 64,
                           "val_samples": 32, "batch_size": 16}}
FAST_TRAINER = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1,
                "num_sanity_val_steps": 0}


def write_experiment(path: Path, **sections) -> Path:
    config = {"name": "exp", "seed_everything": 0, "model": {"arch": dict(MICRO), "lr": 1e-3},
              "data": SYNTHETIC, "trainer": FAST_TRAINER}
    config.update(sections)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_fit(tmp_path: Path, experiment: Path, *extra: str) -> int:
    return main(["fit", str(experiment), "--runs-dir", str(tmp_path / "runs"), *extra])


# ---- ImageClassifier -------------------------------------------------------------------


class LrRecorder(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_warmup_cosine_schedule_steps_per_batch() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(ArchConfig(name="fastervit_micro"), num_classes=4, lr=1e-2,
                            warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-4)
    recorder = LrRecorder()
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         num_sanity_val_steps=0, callbacks=[recorder])
    trainer.fit(model, datamodule=SyntheticDataModule(num_classes=4, num_samples=64, batch_size=16))
    lrs = recorder.lrs
    assert len(lrs) == 12
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] <= 1e-2  # linear warm-up over the first epoch
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # then cosine decay, step by step
    assert lrs[-1] > 1e-4 and lrs[-1] < 2e-3


def test_per_epoch_schedule_and_lamb() -> None:
    model = ImageClassifier(ArchConfig(name="fastervit_micro"), num_classes=4, lr=1e-2,
                            optimizer="lamb", step_per_batch=False, min_lr=1e-4)
    recorder = LrRecorder()
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         num_sanity_val_steps=0, callbacks=[recorder])
    trainer.fit(model, datamodule=SyntheticDataModule(num_classes=4, num_samples=64, batch_size=16))
    assert type(trainer.optimizers[0]).__name__.lower() == "lamb"
    lrs = recorder.lrs
    assert lrs[0] == lrs[1] > lrs[2] == lrs[3] > lrs[4] == lrs[5]  # constant within an epoch


def test_ema_weights_are_used_for_validation_and_mixup_trains() -> None:
    torch.manual_seed(0)
    model = ImageClassifier(ArchConfig(name="fastervit_micro"), num_classes=4, lr=1e-2, ema=True,
                            ema_decay=0.5, mixup=0.8, cutmix=1.0)
    data = SyntheticDataModule(num_classes=4, num_samples=64, batch_size=16)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    assert model.eval_network() is model.ema.module
    ema_params = dict(model.ema.module.named_parameters())
    assert any(not torch.equal(p, ema_params[n]) for n, p in model.model.named_parameters())
    x, y = next(iter(data.val_dataloader()))
    model.eval()
    with torch.no_grad():
        expected = (model.ema.module(x).argmax(1) == y).float().mean()
    result = trainer.validate(model, datamodule=data, verbose=False)[0]
    assert result["val/acc1"] == pytest.approx(float(expected))
    assert "model.levels.0.blocks.0.conv1.weight" in model.state_dict()
    assert "ema.module.levels.0.blocks.0.conv1.weight" in model.state_dict()
    assert not any(k.startswith("network.") for k in model.state_dict())


# ---- fvlab fit -------------------------------------------------------------------------


def test_fit_writes_one_run_per_variant_with_tensorboard_hparams(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={
        "no_carrier": {"model.arch.hat": False}, "ct1": {"model.arch.ct_size": 1}})
    assert run_fit(tmp_path, experiment) == 0
    out = capsys.readouterr().out
    root = tmp_path / "runs" / "exp"
    assert "| no_carrier" in out and "| ct1" in out
    assert "[exp/ct1] epoch 1/1 train/loss_epoch=" in out  # one line per epoch off a terminal
    for variant in ("no_carrier", "ct1"):
        run = root / variant
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["epochs"] == 1
        assert metrics["image_size"] == 32 and metrics["device"] == "cpu"
        for name in ("val/acc1", "val/acc5", "val/acc1_best", "val/loss", *MODEL_METRICS):
            assert isinstance(metrics[name], float), name
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "checkpoints" / "best.ckpt").is_file()
        resolved = yaml.safe_load((run / "config.yaml").read_text())
        assert resolved["name"] == "exp"
        assert resolved["model"]["arch"]["name"] == "fastervit_micro"
        assert "num_classes" not in resolved["model"]  # linked from the data, not repeated
        events = EventAccumulator(str(run))
        events.Reload()
        scalars = set(events.Tags()["scalars"])
        assert {"val/acc1_best", "train/loss", "train/loss_epoch", "train/lr", *MODEL_METRICS} <= scalars
        assert "hp_metric" not in scalars
        content = events.PluginTagToContent("hparams")
        exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
        assert {m.name.tag for m in exp.experiment.metric_infos} == {"val/acc1_best", *MODEL_METRICS}
        session = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]).session_start_info
        assert session.hparams["arch.name"].string_value == "fastervit_micro"
        assert session.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    no_carrier = json.loads((root / "no_carrier" / "metrics.json").read_text())
    ct1 = json.loads((root / "ct1" / "metrics.json").read_text())
    assert no_carrier["model/params_m"] < ct1["model/params_m"]
    assert "no_carrier" in (root / "summary.md").read_text()
    assert (root / "summary.csv").read_text().count("\n") == 3

    # A rerun skips complete variants; --force re-runs the named one only.
    before = (root / "ct1" / "metrics.json").stat().st_mtime_ns
    assert run_fit(tmp_path, experiment) == 0
    assert "complete, skipped" in capsys.readouterr().out
    assert (root / "ct1" / "metrics.json").stat().st_mtime_ns == before
    assert run_fit(tmp_path, experiment, "--variant", "ct1", "--force") == 0
    assert (root / "ct1" / "metrics.json").stat().st_mtime_ns != before
    assert len(list((root / "ct1").glob("events.out.tfevents.*"))) == 1  # a fresh run, not mixed


def test_single_run_without_ablation_is_named_default(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path / "one.yaml")
    assert run_fit(tmp_path, experiment, "--model.arch.ct_size", "0") == 0
    metrics = json.loads((tmp_path / "runs" / "exp" / "default" / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    resolved = yaml.safe_load((tmp_path / "runs" / "exp" / "default" / "config.yaml").read_text())
    assert resolved["model"]["arch"]["ct_size"] == 0
    # The resolved config re-runs as it is.
    rerun = tmp_path / "again"
    assert main(["fit", str(tmp_path / "runs" / "exp" / "default" / "config.yaml"),
                 "--runs-dir", str(rerun)]) == 0
    again = json.loads((rerun / "exp" / "default" / "metrics.json").read_text())
    assert again["val/acc1"] == pytest.approx(metrics["val/acc1"])


@pytest.mark.parametrize("extra, sections, message", [
    (["--variant", "nope"], {}, "unknown variant 'nope'"),
    (["--model.arch.foo", "1"], {}, "model.arch.foo"),
    (["--model.arch.ct_size", "abc"], {}, "model.arch.ct_size"),
    (["--trainer.max_epochs", "x"], {}, "trainer.max_epochs"),
    ([], {"model": {"arch": {"name": "fastervit_micro", "window_size": 4}, "lr": 1e-3}},
     "window_size[2]=4 does not fit"),
    ([], {"model": {"arch": {"name": "fastervit_micro", "ct_size": 3}, "lr": 1e-3}}, "ct_size[2]=3"),
    ([], {"data": {"class_path": "fvlab.data.ImageFolderDataModule",
                   "init_args": {"root": "/no/such/imagenet"}}}, "/no/such/imagenet"),
    ([], {"model": {"arch": {"name": "fastervit_99"}}}, "fastervit_99"),
    ([], {"modle": {"lr": 0.1}}, "modle"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys, extra, sections, message) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={"a": {}}, **sections)
    assert run_fit(tmp_path, experiment, *extra) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_missing_experiment_file_exits_2(tmp_path: Path, capsys) -> None:
    assert run_fit(tmp_path, tmp_path / "nope.yaml") == 2
    assert "nope.yaml" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["fit", str(write_experiment(tmp_path / "exp.yaml")), "--runs-dir",
                 str(tmp_path / "afile")]) == 2
    assert "--runs-dir" in capsys.readouterr().err


class NaNData(SyntheticDataModule):
    """Synthetic data whose training images turn NaN after the first batch."""

    def train_dataloader(self):
        for i, (x, y) in enumerate(super().train_dataloader()):
            yield (x * float("nan") if i > 0 else x), y


def test_nan_loss_fails_that_variant_only(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", trainer={**FAST_TRAINER, "limit_train_batches": 3},
                                  ablation={"bad": {"data.class_path": "test_fit.NaNData"},
                                            "good": {}})
    assert run_fit(tmp_path, experiment) == 1
    captured = capsys.readouterr()
    bad = json.loads((tmp_path / "runs" / "exp" / "bad" / "metrics.json").read_text())
    good = json.loads((tmp_path / "runs" / "exp" / "good" / "metrics.json").read_text())
    assert bad["status"] == "failed" and "NonFiniteLossError" in bad["error"]
    assert "lower model.lr" in bad["error"]
    assert good["status"] == "complete"
    table = (tmp_path / "runs" / "exp" / "summary.md").read_text()
    assert "failed" in table and "complete" in table
    assert "variant 'bad' failed" in captured.err


class InterruptAtEpoch(pl.Callback):
    """Simulates Ctrl-C at the start of an epoch."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_from_last_checkpoint_matches_uninterrupted_run(tmp_path: Path, capsys) -> None:
    trainer = {"max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 2}
    model = {"arch": dict(MICRO), "lr": 3e-3, "warmup_epochs": 1, "ema": True, "ema_decay": 0.9}
    digits = {"class_path": "fvlab.data.DigitsDataModule",
              "init_args": {"image_size": 32, "batch_size": 16}}
    plain = write_experiment(tmp_path / "plain.yaml", model=model, trainer=trainer, data=digits)
    assert main(["fit", str(plain), "--runs-dir", str(tmp_path / "a")]) == 0

    broken = write_experiment(tmp_path / "broken.yaml", model=model, data=digits, trainer={
        **trainer, "callbacks": [{"class_path": "test_fit.InterruptAtEpoch", "init_args": {"epoch": 1}}]})
    assert main(["fit", str(broken), "--runs-dir", str(tmp_path / "b")]) == 1
    interrupted = json.loads((tmp_path / "b" / "exp" / "default" / "metrics.json").read_text())
    assert interrupted["status"] == "failed" and "interrupted" in interrupted["error"]
    # Without --ckpt_path, the unfinished run is not thrown away.
    assert main(["fit", str(plain), "--runs-dir", str(tmp_path / "b")]) == 2
    assert "--ckpt_path last" in capsys.readouterr().err
    assert main(["fit", str(plain), "--runs-dir", str(tmp_path / "b"), "--ckpt_path", "last"]) == 0

    uninterrupted = json.loads((tmp_path / "a" / "exp" / "default" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "b" / "exp" / "default" / "metrics.json").read_text())
    assert resumed["status"] == "complete" and resumed["epochs"] == uninterrupted["epochs"] == 3
    for name in ("val/acc1", "val/loss", "val/acc1_best", "train/loss_epoch"):
        assert resumed[name] == pytest.approx(uninterrupted[name], abs=1e-5), name


def test_print_config_shows_the_resolved_variant(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={"ct0": {"model.arch.ct_size": 0}})
    assert run_fit(tmp_path, experiment, "--print_config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["arch"]["ct_size"] == 0
    assert not (tmp_path / "runs").exists()


def test_validate_and_test_from_checkpoint(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml")
    assert run_fit(tmp_path, experiment) == 0
    capsys.readouterr()
    assert main(["validate", str(experiment), "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "val/acc1" in capsys.readouterr().out
    ckpt = tmp_path / "runs" / "exp" / "default" / "checkpoints" / "last.ckpt"
    assert main(["test", str(experiment), "--ckpt_path", str(ckpt),
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "test/acc1" in capsys.readouterr().out
    assert main(["validate", str(experiment), "--runs-dir", str(tmp_path / "none")]) == 2


SHIPPED = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))
SMALL = {"ablate_carrier", "ablate_window", "ablate_propagation", "baseline"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_experiment_parses_builds_and_runs(path: Path, tmp_path: Path) -> None:
    from fvlab.experiment import load_experiment
    from fvlab.lit.runner import build_run

    experiment = load_experiment(path)
    overrides = ["--trainer.accelerator", "cpu", "--trainer.precision", "32"]
    if path.stem.startswith("imagenet"):
        from PIL import Image
        for split in ("train", "val"):
            for cls in ("a", "b"):
                (tmp_path / "tree" / split / cls).mkdir(parents=True)
                Image.new("RGB", (40, 40)).save(tmp_path / "tree" / split / cls / "0.png")
        overrides += ["--data.init_args.root", str(tmp_path / "tree")]
    if path.stem.startswith("cifar"):
        overrides += ["--data.class_path", "fvlab.data.SyntheticDataModule",
                      "--data.init_args.num_classes", "100"]
    for variant in experiment.variant_names():
        spec = build_run(experiment.config(variant), tmp_path / "runs" / variant, overrides,
                         experiment=experiment.name, variant=variant)
        assert isinstance(spec.model, ImageClassifier)
    if experiment.name in SMALL:
        assert main(["fit", str(path), "--runs-dir", str(tmp_path / "runs"),
                     "--trainer.fast_dev_run", "1"]) == 0
        for variant in experiment.variant_names():
            metrics = json.loads((tmp_path / "runs" / experiment.name / variant / "metrics.json").read_text())
            assert metrics["status"] == "complete"


def test_cpu_ddp_with_two_processes(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={"v1": {}, "v2": {"model.arch.ct_size": 0}})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(
        [sys.executable, "-m", "fvlab.cli", "fit", str(experiment), "--runs-dir", str(tmp_path / "runs"),
         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for variant in ("v1", "v2"):
        run = tmp_path / "runs" / "exp" / variant
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete"
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert done.stdout.count("| v1") == 1  # the table comes from rank 0 only


def test_fit_on_an_image_folder_in_grey_with_channels_last(tmp_path: Path) -> None:
    from PIL import Image
    for split, n in (("train", 8), ("val", 4)):
        for label, shade in (("dark", 40), ("light", 200)):
            folder = tmp_path / "tree" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (40, 36), color=shade + i).save(folder / f"{i}.png")
    experiment = write_experiment(
        tmp_path / "exp.yaml",
        model={"arch": dict(MICRO), "lr": 1e-3, "channels_last": True},
        data={"class_path": "fvlab.data.ImageFolderDataModule",
              "init_args": {"root": str(tmp_path / "tree"), "image_size": 32, "in_chans": 1,
                            "batch_size": 4, "num_workers": 0}})
    assert run_fit(tmp_path, experiment) == 0
    metrics = json.loads((tmp_path / "runs" / "exp" / "default" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["image_size"] == 32
    ckpt = torch.load(tmp_path / "runs" / "exp" / "default" / "checkpoints" / "last.ckpt",
                      weights_only=True)
    assert ckpt["state_dict"]["model.patch_embed.conv_down.0.weight"].shape[1] == 1  # grey input


@pytest.mark.parametrize("arch, ct_size", [
    ("fastervit_micro", [0, 0, 1, 0]),                        # short form: a variant name
    ({"name": None, "dim": 16, "in_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 4],
      "window_size": 2, "ct_size": [0, 0, 2, 0], "mlp_ratio": 2.0}, [0, 0, 2, 0]),  # full arguments
])
def test_arch_as_variant_name_or_full_arguments(tmp_path: Path, arch, ct_size) -> None:
    from fvlab.experiment import load_experiment
    from fvlab.lit.runner import build_run

    path = write_experiment(tmp_path / "exp.yaml", model={"arch": arch, "lr": 1e-3})
    experiment = load_experiment(path)
    spec = build_run(experiment.config("default"), None, experiment=experiment.name, variant="default")
    assert spec.model.model.ct_size == ct_size
    assert spec.model.model.num_classes == 4 and spec.model.model.in_chans == 3  # from the data
