"""Run one variant of an experiment: LightningCLI parses and builds, a Trainer fits.

The library calls, used alike by ``fvlab fit`` and ``fvlab sweep``:

- ``build_run`` hands one variant's config fragments and the command line's arguments to
  LightningCLI, which merges, checks and instantiates them into a model, a datamodule and a
  trainer: every key and type is checked and linked arguments (classes, channels, image size)
  flow from the data to the model. Nothing touches the disk until the fit, which saves the
  resolved config as Lightning's SaveConfigCallback does.
- ``profile_run`` measures the built network (params, GFLOPs, throughput, latency) before any
  training; a failed measurement is a warning and a None.
- ``plan_run`` is the skip / resume / refuse policy for an existing run directory.
- ``fit_run`` writes the run directory, fits, and measures the best checkpoint once on the test
  split (``measure_test_split``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from fvlab.experiment import changed_keys
from fvlab.lit.callbacks import ModelProfileCallback
from fvlab.lit.module import ImageClassifier
from fvlab.metrics import (CLASSIFICATION, FINAL_METRICS, MODEL_METRICS, TRAIN_LOSS_EPOCH, VAL_LOSS,
                           TaskMetrics, is_model_metric, run_metrics)
from fvlab.models.checkpoint import checkpoints_trusted
from fvlab.profile import model_metrics
from fvlab.runs import (DISPLAY_KEYS, METRICS_FILE, TEST_FILE, config_hash, is_run_dir, layout_conflict,
                        read_metrics, trained_config, write_config, write_json)

__all__ = ["BadConfig", "RunRefused", "RunPlan", "RunSpec", "Trainer", "build_run", "merge_config", "profile_run",
           "split_model_class", "nest_model_class",
           "plan_run", "changed_run_keys", "fit_run", "measure_test_split", "write_test_json", "release_memory",
           "DEFAULT_DATA", "FINAL_METRICS"]

DEFAULT_DATA = {"class_path": "fvlab.data.DigitsDataModule"}


class BadConfig(ValueError):
    """A config that cannot be built: unknown key, wrong type, impossible geometry, bad data."""


class RunRefused(ValueError):
    """A run directory whose finished work a new run would throw away: the message says what to pass."""


class Trainer(pl.Trainer):
    """Lightning's Trainer that also takes ``precision: auto``: what this machine runs fast."""

    def __init__(self, *, precision: Optional[Union[_PRECISION_INPUT, Literal["auto"]]] = None,
                 **kwargs: Any):
        from fvlab.runtime import resolve_precision

        # The request, not the machine's answer, stays in the parsed config, so config.yaml is portable.
        precision = resolve_precision(precision, accelerator=kwargs.get("accelerator") or "auto",
                                      devices=kwargs.get("devices") or "auto")
        super().__init__(precision=precision, **kwargs)


class FvlabCLI(LightningCLI):
    """LightningCLI for ImageClassifier with any datamodule; the data's sizes link to the model.

    ``parse_only``: parse and check the arguments (``self.config``), instantiate nothing.
    """

    def __init__(self, *args: Any, run_dir: Path | None = None, experiment: str = "",
                 variant: str = "", extra_callbacks: Sequence[pl.Callback] = (), parse_only: bool = False,
                 **kwargs: Any):
        self.run_dir = run_dir
        self.experiment_name = experiment
        self.variant = variant
        self.extra_callbacks = list(extra_callbacks)
        self.parse_only = parse_only
        super().__init__(*args, **kwargs)

    def add_default_arguments_to_parser(self, parser: Any) -> None:
        """The experiment's ``name`` and ``variant`` first (a printed config starts with them), then LightningCLI's."""
        parser.add_argument("--name", type=Optional[str], default=None, help="the experiment's name")
        parser.add_argument("--variant", type=Optional[str], default=None, help="the variant's name")
        super().add_default_arguments_to_parser(parser)

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link the data module's classes, channels and image size into the model."""
        for key in ("num_classes", "in_chans", "image_size"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        """Model, datamodule and trainer, unless only parsing."""
        if not self.parse_only:
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The trainer, writing into this variant's run directory with fvlab's callbacks."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        if self.run_dir is not None:
            kwargs["default_root_dir"] = str(self.run_dir)
            if trainer_config.get("logger") is not False:
                kwargs["logger"] = RunLogger(
                    save_dir=str(self.run_dir.parent), name=self.run_dir.name, version="",
                    default_hp_metric=False)
        callbacks = [ModelProfileCallback(), RNGStateCallback(), *self.extra_callbacks]
        if self.run_dir is not None:
            callbacks.append(ModelCheckpoint(
                dirpath=self.run_dir / "checkpoints", filename="best", monitor=self.model.task.monitor,
                mode="max", save_last=True, save_top_k=1, auto_insert_metric_name=False))
        if trainer_config.get("enable_progress_bar", True) is not False:
            if sys.stdout.isatty():
                callbacks.append(RichProgressBar())
            else:
                kwargs["enable_progress_bar"] = False
                callbacks.append(EpochSummary(f"{self.experiment_name}/{self.variant}"))
        self.trainer_defaults["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


class SaveRunConfig(SaveConfigCallback):
    """Writes the run's resolved config into ``run_dir/config.yaml`` when the fit starts, headed by
    how to re-run it; with ``name`` and ``variant`` (and ``seeds: [s]`` in a seed's directory),
    the file is an experiment file that trains that same run in place."""

    def __init__(self, parser: Any, config: Any, run_dir: Path, class_path: str | None = None, **kwargs: Any):
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)
        self.run_dir = Path(run_dir)
        self.class_path = class_path

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Write config.yaml (global rank 0)."""
        if not trainer.is_global_zero:
            return
        resolved = nest_model_class(_dump(self.parser, self.config), self.class_path)
        name, variant = resolved.pop("name", None), resolved.pop("variant", None)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_config(self.run_dir, resolved, experiment=name, variant=variant,
                     seed=int(resolved.get("seed_everything") or 0))


class RunLogger(TensorBoardLogger):
    """The run's TensorBoard logger: stays open from fit to the test after it, so a run has one events file.

    Lightning finalizes loggers at the end of every ``fit`` and ``test``; a closed
    SummaryWriter reopens into a second events file. Here finalizing flushes, and
    ``fit_run`` closes the writer with :meth:`close` once the test has been logged.
    """

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush (and save hparams.yaml on success), keeping the writer open."""
        if self._experiment is not None:
            self.experiment.flush()
        if status == "success":
            self.save()

    def close(self) -> None:
        """Close the events file."""
        TensorBoardLogger.finalize(self, "success")


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
        task = getattr(pl_module, "task", CLASSIFICATION)
        parts = [f"{k}={float(m[k]):.4f}" for k in (TRAIN_LOSS_EPOCH, VAL_LOSS, task.monitor, task.primary)
                 if k in m]
        print(f"[{self.label}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
              f"{' '.join(parts)} ({time.perf_counter() - self.start:.1f}s)", flush=True)


@dataclass
class RunSpec:
    """Everything needed to fit one run: the built objects, the resolved config and where it writes."""

    experiment: str
    variant: str
    run_dir: Path | None
    config: dict[str, Any]
    cli: FvlabCLI = field(repr=False)
    seed: int = 0
    precision: str = "32-true"
    hparams: dict[str, Any] = field(default_factory=dict)

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

    @property
    def device(self) -> torch.device:
        """The device the run trains on."""
        return self.trainer.strategy.root_device

    @property
    def config_hash(self) -> str:
        """Hash of the resolved config: a complete run is skipped only while it is unchanged."""
        return config_hash(self.config)


def _error_line(err: BaseException) -> str:
    """jsonargparse's error, or the error raised in a class's ``__init__``, on one line."""
    text = str(err)
    if not isinstance(err, argparse.ArgumentError):
        # jsonargparse wraps errors raised in __init__; the innermost cause holds the class's message.
        cause = err.__cause__ or err.__context__
        while isinstance(cause, (ValueError, TypeError, FileNotFoundError)):
            text = str(cause)
            cause = cause.__cause__ or cause.__context__
    return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())[:2000]


Layers = Union[Mapping[str, Any], Sequence[Union[str, Mapping[str, Any]]]]


def _args(*layers: Layers) -> list[str]:
    """LightningCLI arguments merging ``layers`` in order: a mapping is a config fragment (nested or
    dotted keys, as in a --config file); a sequence holds command-line arguments and fragments."""
    args: list[str] = []
    for layer in layers:
        for item in [layer] if isinstance(layer, Mapping) else layer:
            if isinstance(item, Mapping):
                if item:
                    args += ["--config", yaml.safe_dump(dict(item), sort_keys=False)]
            else:
                args.append(str(item))
    return args


def _dump(parser: Any, config: Any) -> dict[str, Any]:
    """A parsed config as a plain dict, without the ``config`` files it came from."""
    resolved = yaml.safe_load(parser.dump(config, skip_none=False, skip_validation=True))
    resolved.pop("config", None)
    return resolved


def _cli(args: list[str], model_class: type[ImageClassifier], **kwargs: Any) -> FvlabCLI:
    """FvlabCLI on ``args``; BadConfig with a one-line reason when they do not parse or build."""
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_logger.level
    seed_logger.setLevel(logging.WARNING)  # "Seed set to 0" must not precede a bad-input message
    try:
        return FvlabCLI(model_class, pl.LightningDataModule, subclass_mode_data=True, run=False,
                        trainer_class=Trainer, seed_everything_default=0,
                        auto_configure_optimizers=False,  # the module's timm optimizer rules
                        trainer_defaults={"enable_model_summary": False, "log_every_n_steps": 10},
                        parser_kwargs={"exit_on_error": False, "dump_header": None}, args=args, **kwargs)
    except SystemExit:
        raise  # --help, --print_config
    except Exception as err:  # jsonargparse's ArgumentError, our ValueErrors from __init__
        raise BadConfig(_error_line(err)) from None
    finally:
        seed_logger.setLevel(level)


@functools.lru_cache(maxsize=4)
def _parser(model_class: type[ImageClassifier]) -> Any:
    return _cli(_args({"data": DEFAULT_DATA}), model_class, parse_only=True, save_config_callback=None).parser


def merge_config(config: Mapping[str, Any], *fragments: Mapping[str, Any],
                 model_class: type[ImageClassifier] = ImageClassifier) -> dict[str, Any]:
    """``config`` with ``fragments`` merged over it as LightningCLI merges --config files (only the
    keys they give, no defaults); BadConfig when a key or value is not accepted. A ``model.class_path``
    in them picks the LightningModule (see :func:`split_model_class`)."""
    model_class, class_path, (config, *fragments) = split_model_class([config, *fragments], model_class)
    parser = _parser(model_class)
    try:
        parsed = parser.parse_args(_args(config, *fragments), defaults=False)
    except Exception as err:  # jsonargparse's ArgumentError
        raise BadConfig(_error_line(err)) from None
    return nest_model_class(_dump(parser, parsed), class_path)


def _lift_model_class(layer: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """A fragment's ``model.class_path`` (nested or dotted) and the fragment with it removed and
    ``init_args`` lifted into ``model``."""
    layer = dict(layer)
    path = layer.pop("model.class_path", None)
    for key in [k for k in layer if k.startswith("model.init_args.")]:
        layer["model." + key.removeprefix("model.init_args.")] = layer.pop(key)
    model = layer.get("model")
    if isinstance(model, Mapping) and ("class_path" in model or "init_args" in model):
        model = dict(model)
        path = model.pop("class_path", path)
        init_args = dict(model.pop("init_args", None) or {})
        layer["model"] = {**model, **init_args}
    return path, layer


def _import_model_class(path: str) -> type[ImageClassifier]:
    import importlib

    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "fvlab.lit"), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ImageClassifier)):
        raise BadConfig(f"model.class_path {path!r} is not an fvlab LightningModule; use "
                        f"fvlab.lit.ImageClassifier, fvlab.lit.SemanticSegmenter or a subclass of them")
    return cls


def split_model_class(layers: Sequence[Any], model_class: type[ImageClassifier] = ImageClassifier
                      ) -> tuple[type[ImageClassifier], str | None, list[Any]]:
    """(LightningModule class, its class_path or None, the layers without it) for config ``layers``.

    LightningCLI parses ``model`` for one class; the class an experiment file names in
    ``model.class_path`` (LightningCLI's subclass form, ``init_args`` beside it, or the
    arguments right beside ``class_path``) is read here first. A config without one keeps
    ``model_class``; two layers naming different classes are refused.
    """
    paths, out = set(), []
    for layer in layers:
        if isinstance(layer, Mapping):
            path, layer = _lift_model_class(layer)
            if path:
                paths.add(str(path))
        elif isinstance(layer, str) and layer.startswith("--model.class_path"):
            raise BadConfig("--model.class_path: the LightningModule is chosen in the experiment file "
                            "(model: {class_path: ..., init_args: ...}), not on the command line")
        elif isinstance(layer, str) and layer.startswith("--model.init_args."):
            layer = "--model." + layer.removeprefix("--model.init_args.")  # the subclass form's spelling
        out.append(layer)
    if not paths:
        return model_class, None, out
    if len(paths) > 1:
        raise BadConfig(f"model.class_path names {len(paths)} classes ({', '.join(sorted(paths))}); a run has "
                        f"one LightningModule, so set it in the base config only")
    cls = _import_model_class(paths.pop())
    if model_class is not ImageClassifier and cls is not model_class:
        raise BadConfig(f"model.class_path {cls.__name__}: this command trains a {model_class.__name__}")
    name = f"{cls.__module__}.{cls.__qualname__}"
    return cls, (None if cls is ImageClassifier else name), out


def nest_model_class(config: dict[str, Any], class_path: str | None) -> dict[str, Any]:
    """``config`` with its ``model`` in LightningCLI's subclass form when ``class_path`` names a class
    other than the default (so a saved config.yaml trains the same module again)."""
    if class_path and isinstance(config.get("model"), Mapping):
        config["model"] = {"class_path": class_path, "init_args": dict(config["model"])}
    return config


def build_run(config: Layers, run_dir: Path | None, overrides: Layers = (),
              *, experiment: str = "", variant: str = "", seed: int | None = None,
              callbacks: Sequence[pl.Callback] = (), hparams: Mapping[str, Any] | None = None,
              model_metrics: Mapping[str, float | None] | None = None,
              model_class: type[ImageClassifier] = ImageClassifier) -> RunSpec:
    """Parse, check and instantiate one run (nothing written); raises BadConfig with a one-line reason.

    LightningCLI parses ``config`` (a config, or its fragments in order, e.g. ``Experiment.layers``)
    and then ``overrides``: config fragments ({"model.lr": 0.01}) and command-line arguments
    (["--config", "more.yaml", "--model.lr", "0.01", "--trainer.callbacks+=CLASS"]), as its own
    command line does (``--print_config`` prints and exits); ``seed`` replaces ``seed_everything``;
    ``callbacks`` join the trainer's; ``hparams`` join the HParams table; ``model_metrics`` are
    already measured ``model/*`` values (measured at fit start otherwise); ``model_class`` is the
    LightningModule whose arguments ``model`` holds (an ``ImageClassifier`` subclass, e.g.
    ``SupernetClassifier``). With a ``run_dir``, the fit writes the resolved config to its config.yaml.
    """
    first, *rest = [config] if isinstance(config, Mapping) else list(config) or [{}]
    overrides = [overrides] if isinstance(overrides, Mapping) else list(overrides)
    model_class, class_path, (first, *rest) = split_model_class([first, *rest, *overrides], model_class)
    rest, overrides = rest[:len(rest) - len(overrides)], rest[len(rest) - len(overrides):]
    first = dict(first)
    first.setdefault("data", dict(DEFAULT_DATA))  # before the overrides: --data.batch_size 32
    head = {"name": experiment or None, "variant": variant or None}
    # An argument, not a fragment: a --config after --print_config would be all that it prints.
    tail = [f"--seed_everything={seed}"] if seed is not None else []
    with warnings.catch_warnings():
        # LightningCLI warns when given args while sys.argv holds fvlab's own arguments.
        warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
        cli = _cli(_args(head, first, *rest, overrides, tail), model_class, run_dir=run_dir,
                   experiment=experiment, variant=variant, extra_callbacks=callbacks,
                   save_config_callback=SaveRunConfig if run_dir is not None else None,
                   save_config_kwargs={"run_dir": run_dir, "overwrite": True, "class_path": class_path})
    resolved = nest_model_class(_dump(cli.parser, cli.config), class_path)
    resolved.pop("name", None)
    resolved.pop("variant", None)
    precision = str(cli.trainer.precision)
    run_seed = int(resolved.get("seed_everything") or 0)
    if hasattr(cli.datamodule, "seed_data"):  # data order and augmentation follow the run's seed only
        cli.datamodule.seed_data(run_seed)
    profile = next(c for c in cli.trainer.callbacks if isinstance(c, ModelProfileCallback))
    run_hparams = {"seed": run_seed, "precision": precision, **dict(hparams or {})}
    profile.hparams.update(run_hparams)
    if model_metrics:
        profile.metrics.update(model_metrics)
    return RunSpec(experiment, variant, run_dir, resolved, cli, seed=run_seed, precision=precision,
                   hparams=run_hparams)


def profile_run(spec: RunSpec, throughput: bool = True, batch_size: int | None = None,
                repeats: int | None = None) -> dict[str, float | None]:
    """The four ``model/*`` metrics of the built network, at the run's image size, device and precision."""
    datamodule = spec.datamodule
    image_size = getattr(datamodule, "image_size", None) or 224
    return model_metrics(spec.model.model, image_size, in_chans=getattr(datamodule, "in_chans", None),
                         device=spec.device, precision=spec.precision, throughput=throughput,
                         batch_size=batch_size, repeats=repeats)


# ---- run directories -------------------------------------------------------------------


@dataclass
class RunPlan:
    """What to do with a run directory: ``skip`` it, start it ``fresh`` or ``resume`` it."""

    action: str
    ckpt_path: str | None = None
    note: str = ""


def _stored_hash(run_dir: Path, previous: Mapping[str, Any]) -> str | None:
    # A run killed before it wrote metrics.json still has its config.yaml.
    if previous.get("config_hash"):
        return previous["config_hash"]
    stored = trained_config(run_dir)
    return config_hash(stored) if stored is not None else None


def _changes(run_dir: Path, config: Mapping[str, Any] | None) -> tuple[str, list[str]]:
    """`` (changed: a, b)`` naming the keys that differ from the stored config, and the keys."""
    stored = trained_config(run_dir) if config is not None else None
    if stored is None:
        return "", []
    keys = changed_keys(stored, dict(config), DISPLAY_KEYS)
    if not keys:
        return "", []
    return f" (changed: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''})", keys


def changed_run_keys(run_dir: Path, config: Mapping[str, Any]) -> list[str]:
    """Dotted keys in which ``config`` differs from the config a run directory was trained with."""
    return _changes(Path(run_dir), config)[1]


def plan_run(run_dir: Path, config_hash: str, *, force: bool = False, resume: bool = False,
             config: Mapping[str, Any] | None = None) -> RunPlan:
    """Skip a complete unchanged run, resume an unfinished one on request (same config only),
    restart on --force; refuse anything that would lose work silently (RunRefused)."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    layout = layout_conflict(run_dir)
    if layout:
        raise RunRefused(layout)
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return RunPlan("fresh", note="resume requested, but nothing to resume" if resume else "")
    if not run_dir.is_dir() or not is_run_dir(run_dir):
        raise RunRefused(f"{run_dir} exists and is not an fvlab run directory (no metrics.json or "
                         f"fvlab config.yaml); move it away or choose another --runs-dir")
    if force:
        return RunPlan("fresh", note="--force: started again")
    previous = read_metrics(run_dir) or {}
    complete = previous.get("status") == "complete"
    same = _stored_hash(run_dir, previous) == config_hash
    if complete and same:
        return RunPlan("skip", note="complete, skipped (--force re-runs it)")
    if not complete and not last.is_file():
        return RunPlan("fresh", note="an earlier attempt failed before its first checkpoint; started again"
                       if previous else "")
    if same:  # unfinished, with a last.ckpt
        if resume:
            return RunPlan("resume", str(last), note=f"resuming {last}")
        raise RunRefused(f"{run_dir} holds an unfinished run with checkpoints/last.ckpt; resume it "
                         f"with --ckpt_path last, or start over with --force")
    changed, keys = _changes(run_dir, config)
    state = "a complete" if complete else "an unfinished"
    # Lightning restores the optimizer and the timm schedule from last.ckpt: a resume under another
    # config would mix two trainings (a longer run would spend its extra epochs at min_lr).
    why = " --ckpt_path last continues the same config only;" if resume else ""
    longer = (" (a resumed schedule keeps its old length, so training longer means training again)"
              if resume and any(k in ("trainer.max_epochs", "trainer.max_steps") for k in keys) else "")
    raise RunRefused(f"{run_dir} holds {state} run trained with a different config{changed};{why} "
                     f"re-train it with --force{longer}, or keep it and use another --runs-dir")


def _end_process_group(trainer: pl.Trainer) -> None:
    # Peers blocked in a collective would wait forever for a rank that left: tearing the process
    # group down turns their wait into an error, so every rank ends the job together.
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # already broken by the peer
            pass


def measure_test_split(spec: RunSpec, ckpt_path: str | None = "best") -> dict[str, Any]:
    """``test/*`` of a checkpoint (default the best) on the test split, with the module's eval weights.

    Lightning's own test path loads the checkpoint, so whatever the module keeps as its
    evaluation weights (the EMA copy when EMA ran) is measured. Without a test split the
    metrics are null and ``test_note`` says why; the validation figures never stand in.
    """
    names = spec.model.task.tests
    result: dict[str, Any] = dict.fromkeys(names)
    reason = getattr(spec.datamodule, "no_test_split", "")
    if reason:
        return {**result, "test_note": f"no test split: {reason}"}
    trainer = spec.trainer
    if ckpt_path == "best" and not getattr(trainer.checkpoint_callback, "best_model_path", ""):
        ckpt_path = None  # no checkpoint written (no run directory): the weights as trained
    measured = trainer.test(spec.model, datamodule=spec.datamodule, ckpt_path=ckpt_path, verbose=False)
    result.update({k: float(v) for k, v in (measured[0] if measured else {}).items() if k in names})
    return result


def write_test_json(run_dir: Path, checkpoint: str, metrics: Mapping[str, Any],
                    datamodule: pl.LightningDataModule, task: TaskMetrics = CLASSIFICATION) -> Path:
    """``test.json`` of ``fvlab test``: checkpoint, split and ``task``'s test metrics (metrics.json stays as trained)."""
    test_set = getattr(datamodule, "test_set", None)
    data = {"checkpoint": str(checkpoint), "split": "test", "data": type(datamodule).__name__,
            "images": len(test_set) if test_set is not None else None,
            "metrics": {k: float(metrics[k]) if k in metrics else None for k in task.tests},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = Path(run_dir) / TEST_FILE
    write_json(path, data)
    return path


def _fresh_run_dir(run_dir: Path, resuming: bool) -> None:
    """Create the run directory, emptied first unless the fit resumes from a checkpoint."""
    if not resuming and run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh start: plan_run checked that nothing is lost
    run_dir.mkdir(parents=True, exist_ok=True)  # config.yaml: SaveRunConfig, when the fit starts


def _run_identity(spec: RunSpec) -> dict[str, Any]:
    """The first keys of a run's metrics.json: which run this is, and where and how it ran."""
    image_size = getattr(spec.datamodule, "image_size", None)
    return {"experiment": spec.experiment, "variant": spec.variant, "seed": spec.seed,
            "task": spec.model.task.task, "image_size": image_size, "device": str(spec.device),
            "precision": spec.precision, "config_hash": spec.config_hash}


def _timed_fit(spec: RunSpec, ckpt_path: str | None, result: dict[str, Any]) -> bool:
    """Trainer.fit, its status and wall time into ``result``; whether it was interrupted."""
    trainer = spec.trainer
    start = time.perf_counter()
    interrupted = False
    try:
        # Explicit: torch's default can be flipped by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
        trainer.fit(spec.model, datamodule=spec.datamodule, ckpt_path=ckpt_path,
                    weights_only=not checkpoints_trusted())
        interrupted = trainer.interrupted
        result["status"] = "complete"
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C and SIGTERM into sys.exit(1)
        interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignored it
    except Exception as err:  # a failed run never takes the others with it
        where = f" (rank {trainer.global_rank} of {trainer.world_size})" if trainer.world_size > 1 else ""
        result.update(status="failed", error=f"{type(err).__name__}: {err}{where}")
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return interrupted


def _record_fit_metrics(result: dict[str, Any], trainer: pl.Trainer, model_figures: Mapping[str, Any]) -> None:
    """Epochs, final and ``model/*`` metrics into ``result``, and a stopping callback's status."""
    result["epochs"] = trainer.current_epoch
    names = run_metrics(getattr(trainer.lightning_module, "task", CLASSIFICATION))
    result.update(dict.fromkeys(names))  # every metric name of the task is a key, null when never reached
    result.update({k: float(v) for k, v in trainer.callback_metrics.items() if k in names})
    result.update({k: model_figures.get(k) for k in MODEL_METRICS})
    result.update({k: v for k, v in model_figures.items() if is_model_metric(k)})  # e.g. speedup
    stopper = next((c for c in trainer.callbacks if getattr(c, "stopped_status", None)), None)
    if stopper is not None and result.get("status") == "complete":
        result.update(status=stopper.stopped_status, error=getattr(stopper, "stopped_reason", None))


def _record_test_figures(spec: RunSpec, result: dict[str, Any]) -> bool:
    """The best checkpoint's test figures (or why they are missing) into ``result``; whether interrupted."""
    try:
        result.update(measure_test_split(spec))
    except (KeyboardInterrupt, SystemExit):
        return True
    except Exception as err:  # the trained run stands; its test figures are missing, with the reason
        warnings.warn(f"testing the best checkpoint failed: {type(err).__name__}: {err}")
        result["test_note"] = f"test failed: {type(err).__name__}: {err}"
    return False


def _close_run(trainer: pl.Trainer, failed: bool) -> None:
    """Close the run's loggers; after a failure, tear the process group down so no peer waits on this rank."""
    for logger in trainer.loggers:
        if isinstance(logger, RunLogger):
            logger.close()
    if failed:
        _end_process_group(trainer)


def fit_run(spec: RunSpec, ckpt_path: str | None = None,
            model_metrics: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """Fit one run; always leaves a metrics.json saying complete, failed or pruned (with the reason)."""
    run_dir = spec.run_dir
    trainer = spec.trainer
    writer = trainer.is_global_zero
    profile = next(c for c in trainer.callbacks if isinstance(c, ModelProfileCallback))
    if model_metrics:
        profile.metrics.update(model_metrics)
    if writer and run_dir is not None:
        _fresh_run_dir(run_dir, resuming=ckpt_path is not None)
    result = _run_identity(spec)
    if writer and not all(name in profile.metrics for name in MODEL_METRICS):
        profile.metrics.update(profile_run(spec, throughput=profile.throughput))
    interrupted = _timed_fit(spec, ckpt_path, result)
    _record_fit_metrics(result, trainer, profile.metrics)
    if result.get("status") == "complete" and not interrupted:  # failed or pruned runs have no test figures
        interrupted = _record_test_figures(spec, result) or trainer.interrupted
    if interrupted:
        result.update(status="failed", error="interrupted; resume with --ckpt_path last")
    if writer and run_dir is not None:
        write_json(run_dir / METRICS_FILE, result)
    _close_run(trainer, failed=result["status"] == "failed")
    if interrupted:
        raise KeyboardInterrupt
    return result


def release_memory() -> None:
    """Free what a finished run left behind (Python garbage, the CUDA cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

