"""Run one variant of an experiment: LightningCLI parses and builds, a Trainer fits.

``build_run`` turns a plain config dict (one variant of an experiment, plus command-line
overrides) into a model, a datamodule and a trainer, via LightningCLI/jsonargparse, so
that every key and type is checked and linked arguments (classes, channels, image size)
flow from the data to the model. Nothing touches the disk until ``fit_run``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from fvlab.lit.callbacks import MODEL_METRICS, ModelProfileCallback
from fvlab.lit.module import ImageClassifier

__all__ = ["BadConfig", "RunSpec", "build_run", "fit_run", "read_metrics", "DEFAULT_DATA",
           "FINAL_METRICS"]

DEFAULT_DATA = {"class_path": "fvlab.data.DigitsDataModule"}
FINAL_METRICS = ("val/acc1", "val/acc5", "val/acc1_best", "val/loss", "train/loss_epoch",
                 *MODEL_METRICS)


class BadConfig(ValueError):
    """A config that cannot be built: unknown key, wrong type, impossible geometry, bad data."""


class FvlabCLI(LightningCLI):
    """LightningCLI for ImageClassifier with any datamodule; the data's sizes link to the model."""

    def __init__(self, *args: Any, run_dir: Path | None = None, experiment: str = "",
                 variant: str = "", **kwargs: Any):
        self.run_dir = run_dir
        self.experiment_name = experiment
        self.variant = variant
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link the data module's classes, channels and image size into the model."""
        for key in ("num_classes", "in_chans", "image_size"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The trainer, writing into this variant's run directory with fvlab's callbacks."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        if self.run_dir is not None:
            kwargs["default_root_dir"] = str(self.run_dir)
            if trainer_config.get("logger") is not False:
                kwargs["logger"] = TensorBoardLogger(
                    save_dir=str(self.run_dir.parent), name=self.run_dir.name, version="",
                    default_hp_metric=False)
        callbacks = [ModelProfileCallback(), RNGStateCallback()]
        if self.run_dir is not None:
            callbacks.append(ModelCheckpoint(
                dirpath=self.run_dir / "checkpoints", filename="best", monitor="val/acc1",
                mode="max", save_last=True, save_top_k=1, auto_insert_metric_name=False))
        if trainer_config.get("enable_progress_bar", True) is not False:
            if sys.stdout.isatty():
                callbacks.append(RichProgressBar())
            else:
                kwargs["enable_progress_bar"] = False
                callbacks.append(EpochSummary(f"{self.experiment_name}/{self.variant}"))
        self.trainer_defaults["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


class RNGStateCallback(pl.Callback):
    """Saves and restores Python, NumPy and torch RNG states, so a resumed run matches an unbroken one."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Store the generators' states."""
        # Plain lists and tensors only: checkpoints load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["fvlab_rng"] = {
            "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Restore the generators' states."""
        state = checkpoint.get("fvlab_rng")
        if not state:
            return
        random.setstate(state["python"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class EpochSummary(pl.Callback):
    """One line per epoch for non-terminal output (CI logs), instead of a progress bar."""

    def __init__(self, label: str):
        self.label = label
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the epoch's losses and accuracies (validation has run by now)."""
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [f"{k}={float(m[k]):.4f}" for k in ("train/loss_epoch", "val/loss", "val/acc1",
                                                     "val/acc1_best") if k in m]
        print(f"[{self.label}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
              f"{' '.join(parts)} ({time.perf_counter() - self.start:.1f}s)", flush=True)


@dataclass
class RunSpec:
    """Everything needed to fit one variant: the built objects and where it writes."""

    experiment: str
    variant: str
    run_dir: Path | None
    config: dict[str, Any]
    cli: FvlabCLI = field(repr=False)

    @property
    def trainer(self) -> pl.Trainer:
        """The configured trainer."""
        return self.cli.trainer

    @property
    def model(self) -> ImageClassifier:
        """The LightningModule."""
        return self.cli.model

    @property
    def datamodule(self) -> pl.LightningDataModule:
        """The datamodule."""
        return self.cli.datamodule


def _one_line(err: BaseException) -> str:
    text = str(err)
    if not isinstance(err, argparse.ArgumentError):
        # jsonargparse wraps errors raised in __init__; the innermost cause holds our message.
        cause = err.__cause__ or err.__context__
        while isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
            text = str(cause)
            cause = cause.__cause__ or cause.__context__
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Parser key"):
        given = [line for line in lines if line.startswith("Given value:")]
        expected = [line.removeprefix("- ") for line in lines if line.startswith("- Expected")]
        subtypes = [line for line in lines if line.startswith("Subtypes:")]
        hint = subtypes[0] if subtypes else (expected[0] if expected else "")
        lines = [lines[0].rstrip(":"), *(given[:1]), hint] if given else lines[:3]
    return re.sub(r"\s+", " ", "; ".join(part for part in lines if part))[:600]


def build_run(config: dict[str, Any], run_dir: Path | None, overrides: Sequence[str] = (),
              experiment: str = "", variant: str = "") -> RunSpec:
    """Parse, check and instantiate one run; raises BadConfig with a one-line reason."""
    config = dict(config)
    config.setdefault("data", dict(DEFAULT_DATA))
    try:
        cli = FvlabCLI(ImageClassifier, pl.LightningDataModule, subclass_mode_data=True, run=False,
                       save_config_callback=None, seed_everything_default=0,
                       auto_configure_optimizers=False,  # the module's timm optimizer rules
                       trainer_defaults={"enable_model_summary": False, "log_every_n_steps": 10},
                       parser_kwargs={"exit_on_error": False},
                       args=["--config", yaml.safe_dump(config), *overrides],
                       run_dir=run_dir, experiment=experiment, variant=variant)
    except SystemExit:
        raise  # --print_config and --help
    except Exception as err:  # jsonargparse's ArgumentError, our ValueErrors from __init__
        raise BadConfig(_one_line(err)) from None
    resolved = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, skip_validation=True))
    resolved.pop("config", None)
    return RunSpec(experiment, variant, run_dir, resolved, cli)


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's metrics.json, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def _is_global_zero() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def fit_run(spec: RunSpec, ckpt_path: str | None = None) -> dict[str, Any]:
    """Fit one run; always leaves a metrics.json saying complete or failed (with the reason)."""
    run_dir = spec.run_dir
    writer = _is_global_zero()
    if writer:
        if ckpt_path is None and run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh start; callers check that nothing is lost
        run_dir.mkdir(parents=True, exist_ok=True)
        header = (f"# fvlab: resolved config of variant '{spec.variant}' of experiment "
                  f"'{spec.experiment}'.\n# Re-run it as it is: fvlab fit {run_dir / 'config.yaml'}\n")
        (run_dir / "config.yaml").write_text(
            header + yaml.safe_dump({"name": spec.experiment, **spec.config}, sort_keys=False))
    trainer, model = spec.trainer, spec.model
    image_size = getattr(spec.datamodule, "image_size", None)
    result: dict[str, Any] = {"experiment": spec.experiment, "variant": spec.variant,
                              "image_size": image_size, "device": str(trainer.strategy.root_device)}
    start = time.perf_counter()
    interrupted = False
    try:
        trainer.fit(model, datamodule=spec.datamodule, ckpt_path=ckpt_path)
        interrupted = trainer.interrupted
        result["status"] = "complete"
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into sys.exit(1)
        interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignored it
    except Exception as err:  # a failed variant never takes the others with it
        result.update(status="failed", error=f"{type(err).__name__}: {err}")
    result["wall_s"] = round(time.perf_counter() - start, 2)
    result["epochs"] = trainer.current_epoch
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in FINAL_METRICS}
    profile = next((c for c in trainer.callbacks if isinstance(c, ModelProfileCallback)), None)
    if profile is not None:
        metrics.update({k: v for k, v in profile.metrics.items()})
    result.update(metrics)
    if interrupted:
        result.update(status="failed", error="interrupted; resume with --ckpt_path last")
    if writer:
        _write_json(run_dir / "metrics.json", result)
    if interrupted:
        raise KeyboardInterrupt
    return result
