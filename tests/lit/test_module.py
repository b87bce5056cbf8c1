"""ImageClassifier: schedules (plateau, max_steps), EMA under accumulation, train/lr, names, NaN under DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from timm.optim import list_optimizers
from timm.scheduler import create_scheduler_v2

from fvlab.cli import main
from fvlab.data import SyntheticDataModule
from fvlab.data.base import InMemoryImages
from fvlab.lit.module import SCHEDULERS, ImageClassifier
from fvlab.models import ArchConfig
from helpers import FAST_TRAINER, MICRO, subprocess_env, write_experiment

pytestmark = pytest.mark.filterwarnings("ignore")

def micro(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(ArchConfig(name="fastervit_micro"), num_classes=4, image_size=32, **kwargs)


def trainer(*callbacks: pl.Callback, **kwargs) -> pl.Trainer:
    options = dict(limit_val_batches=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   accelerator="cpu")
    return pl.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


def data(**kwargs) -> SyntheticDataModule:
    return SyntheticDataModule(**{"num_classes": 4, "num_samples": 64, "batch_size": 16, **kwargs})


class LrPerBatch(pl.Callback):
    """The head's learning rate at the start of every training batch."""

    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(max(group["lr"] for group in trainer.optimizers[0].param_groups))


# ---- plateau ---------------------------------------------------------------------------


class ConstantAccuracyData(SyntheticDataModule):
    """Validation images all alike, classes balanced: every network scores exactly 1/num_classes."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.val_set = InMemoryImages(torch.zeros_like(self.val_set.images), self.val_set.labels)


@pytest.mark.parametrize("step_per_batch", [True, False])
def test_plateau_decays_the_lr_after_patience_epochs_without_improvement(step_per_batch) -> None:
    model = micro(lr=1e-2, scheduler="plateau", patience_epochs=1, decay_rate=0.5,
                  step_per_batch=step_per_batch)
    recorder = LrPerBatch()
    fit = trainer(recorder, max_epochs=4, limit_train_batches=2)
    fit.fit(model, datamodule=ConstantAccuracyData(num_classes=4, num_samples=32, val_samples=16,
                                                  batch_size=16))
    assert float(fit.callback_metrics["val/acc1"]) == pytest.approx(0.25)
    per_epoch = recorder.lrs[::2]
    assert recorder.lrs[1::2] == per_epoch  # constant within an epoch
    # Best at epoch 0; epochs 1 and 2 do not improve: more than 1 bad epoch, so epoch 3 halves.
    assert per_epoch == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3])


# ---- max_steps -------------------------------------------------------------------------


@pytest.mark.parametrize("max_steps, max_epochs, batches", [(12, None, 5), (7, 2, 5)])
def test_schedule_follows_max_steps(max_steps, max_epochs, batches) -> None:
    model = micro(lr=1e-2, min_lr=1e-4)
    recorder = LrPerBatch()
    fit = trainer(recorder, max_steps=max_steps, max_epochs=max_epochs, limit_train_batches=batches)
    fit.fit(model, datamodule=data(num_samples=96))
    lrs = recorder.lrs
    assert len(lrs) == max_steps
    assert lrs[0] == pytest.approx(1e-2)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # smooth decay, not a one-step collapse
    cosine = [1e-4 + 0.5 * (1e-2 - 1e-4) * (1 + math.cos(math.pi * step / max_steps))
              for step in range(max_steps)]
    assert lrs == pytest.approx(cosine)  # one cosine over exactly max_steps updates
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)  # min_lr at the end


# ---- EMA -------------------------------------------------------------------------------


class WeightsPerOptimizerStep(pl.Callback):
    """The network's parameters after every optimizer step."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.weights):
            self.weights.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def test_ema_updates_once_per_optimizer_step_under_gradient_accumulation() -> None:
    decay = 0.5
    model = micro(lr=1e-2, ema=True, ema_decay=decay)
    steps = WeightsPerOptimizerStep()
    fit = trainer(steps, max_epochs=1, limit_train_batches=6, accumulate_grad_batches=2)
    fit.fit(model, datamodule=data(num_samples=96))
    assert fit.global_step == len(steps.weights) == 3
    # timm's ModelEmaV3 copies the weights at step 1, then moves by (1 - decay) per update.
    expected = dict(steps.weights[0])
    for weights in steps.weights[1:]:
        expected = {n: decay * expected[n] + (1 - decay) * weights[n] for n in expected}
    for name, param in model.ema.module.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ema_warmup_follows_training_where_the_fixed_decay_stays_at_the_first_step() -> None:
    def flat(module: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    gaps = {}
    for warmup in (False, True):
        model = micro(lr=1e-2, ema=True, ema_warmup=warmup)  # ema_decay 0.9998, the default
        init = flat(model.model)
        trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=0).fit(
            model, datamodule=data(num_samples=48, batch_size=8))
        raw = flat(model.model)
        # How far the EMA lags the trained weights, as a fraction of how far training moved them.
        gaps[warmup] = float((flat(model.ema.module) - raw).norm() / (init - raw).norm())
    assert gaps[True] < 0.25 and gaps[False] > 0.5, gaps
    assert not any(p.requires_grad for p in model.ema.parameters())  # out of DDP's reach


# ---- train/lr --------------------------------------------------------------------------


class LoggedLr(pl.Callback):
    def __init__(self):
        self.logged: list[float] = []
        self.groups: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(float(trainer.callback_metrics["train/lr"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.groups.append([group["lr"] for group in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize("scheduler", ["cosine", "none"])
def test_train_lr_is_the_heads_rate_under_layer_decay(scheduler) -> None:
    model = micro(lr=1e-2, layer_decay=0.5, scheduler=scheduler)
    recorder = LoggedLr()
    fit = trainer(recorder, max_epochs=1, limit_train_batches=2)
    fit.fit(model, datamodule=data())
    assert recorder.logged[0] == pytest.approx(1e-2)  # the configured lr, no warm-up
    assert min(recorder.groups[0]) < 1e-2 * 0.5**3  # the stem's group really is decayed
    assert recorder.logged == pytest.approx([max(groups) for groups in recorder.groups])


# ---- names -----------------------------------------------------------------------------


def test_every_listed_scheduler_is_one_timm_builds() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name in SCHEDULERS:
        scheduler, _ = create_scheduler_v2(optimizer, sched=name, num_epochs=10, decay_epochs=0.5,
                                           warmup_epochs=1)
        assert (scheduler is None) == (name == "none"), name


@pytest.mark.parametrize("key, value, hint", [("model.optimizer", "adamww", "'adamw'"),
                                               ("model.scheduler", "cosinee", "'cosine'")])
def test_unknown_optimizer_or_scheduler_exits_2_and_writes_nothing(tmp_path: Path, capsys, key, value,
                                                                   hint) -> None:
    model = {"arch": dict(MICRO), key.split(".")[1]: value}
    experiment = write_experiment(tmp_path / "exp.yaml", model=model)
    assert main(["fit", str(experiment), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{key}: unknown" in err and f"'{value}'" in err and f"did you mean {hint}" in err, err
    assert "known: " in err
    assert not (tmp_path / "runs").exists()


def test_unknown_names_list_every_known_name() -> None:
    with pytest.raises(ValueError) as optimizer_error:
        ImageClassifier(ArchConfig(name="fastervit_micro"), num_classes=4, optimizer="adamww")
    assert all(name in str(optimizer_error.value) for name in [*list_optimizers(), "lookahead_<name>"])
    with pytest.raises(ValueError) as scheduler_error:
        ImageClassifier(ArchConfig(name="fastervit_micro"), num_classes=4, scheduler="cosinee")
    assert str(scheduler_error.value).endswith("known: " + ", ".join(SCHEDULERS))
    with pytest.raises(ValueError, match="rsqrt needs model.warmup_epochs"):
        ImageClassifier(ArchConfig(name="fastervit_micro"), num_classes=4, scheduler="rsqrt")


def test_optimizer_names_timm_accepts_are_accepted() -> None:
    for name in ("AdamW", "lamb", "lookahead_sgd"):
        ImageClassifier(ArchConfig(name="fastervit_micro"), num_classes=4, optimizer=name)
    for name in ("adamww", "foo_adamw", "lookahead_"):
        with pytest.raises(ValueError, match="model.optimizer"):
            ImageClassifier(ArchConfig(name="fastervit_micro"), num_classes=4, optimizer=name)


# ---- a NaN on one DDP rank ---------------------------------------------------------------


class NaNInputOnRank(pl.Callback):
    """Turns one rank's training batch NaN at one batch index (the other ranks stay finite)."""

    def __init__(self, rank: int = 1, batch: int = 1):
        self.rank = rank
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            batch[0].mul_(float("nan"))


def run_ddp_nan(tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    """`fvlab fit` on 2 CPU processes; variant 'bad' goes NaN on rank 1 only, at batch 1; 'good' follows."""
    nan = {"class_path": "test_module.NaNInputOnRank", "init_args": {"rank": 1, "batch": 1}}
    experiment = write_experiment(tmp_path / "exp.yaml", trainer={**FAST_TRAINER, "limit_train_batches": 3},
                                  ablation={"bad": {"trainer.callbacks": [nan]}, "good": {}})
    env = subprocess_env(__file__)
    command = [sys.executable, "-m", "fvlab.cli", "fit", str(experiment), "--runs-dir",
               str(tmp_path / "runs"), "--trainer.strategy", "ddp", "--trainer.devices", "2",
               "--trainer.accelerator", "cpu"]
    # Its own process group: on a hang, rank 1 (launched by rank 0) is killed with it.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=tmp_path, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_nan_on_one_ddp_rank_fails_the_run_on_every_rank(tmp_path: Path) -> None:
    # Before the fix rank 1 raised alone and went on to 'good' while rank 0 waited for it in the
    # gradient all-reduce of 'bad': a hang.
    done = run_ddp_nan(tmp_path, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "exp" / "bad" / "metrics.json").read_text())
    assert metrics["status"] == "failed", metrics
    # Written by rank 0, whose own loss was finite: it stopped on the ranks' common decision.
    assert metrics["error"].startswith("NonFiniteLossError: training loss is not finite on another "
                                       "process at epoch 0, step 1; lower model.lr"), metrics["error"]
    assert "NonFiniteLossError: training loss is nan on process 1 at epoch 0, step 1" in done.stderr


# ---- under a plain Lightning Trainer: schedules stepped per batch or epoch, EMA with mixup ----


class LrRecorder(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.filterwarnings("ignore")
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


@pytest.mark.filterwarnings("ignore")
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


@pytest.mark.filterwarnings("ignore")
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
