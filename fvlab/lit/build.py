"""One run's config, parsed, merged and built by LightningCLI (nothing written).

- ``merge_config``/``apply_overrides`` merge config fragments as LightningCLI merges --config
  files, every key and type checked; ``split_model_class`` picks the LightningModule a
  ``model.class_path`` names.
- ``build_run`` hands one variant's config fragments and the command line's arguments to
  LightningCLI, which merges, checks and instantiates them into a model, a datamodule and a
  trainer: linked arguments (classes, channels, image size) flow from the data to the model.
  Nothing touches the disk until the fit, which saves the resolved config as Lightning's
  SaveConfigCallback does (``SaveRunConfig``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from fvlab.adapters import ConfigOverCheckpointHparams
from fvlab.experiment import Experiment, ExperimentError
from fvlab.lit.callbacks import EpochSummary, ModelProfileCallback, RNGStateCallback
from fvlab.lit.module import ImageClassifier
from fvlab.lit.tensorboard import RunLogger
from fvlab.runs import BEST_CHECKPOINT, checkpoint_dir, config_hash, write_config

__all__ = ["BadConfig", "RunSpec", "Trainer", "FvlabCLI", "SaveRunConfig", "build_run", "merge_config",
           "apply_overrides", "variant_config", "run_stage", "STAGES", "split_model_class", "nest_model_class", "DEFAULT_DATA", "Layers"]

# The subcommands LightningCLI runs for fvlab (``fvlab validate``, ``fvlab test``).
STAGES = ("validate", "test")
# The precisions Lightning's Trainer accepts, read from its public signature.
TRAINER_PRECISION = typing.get_type_hints(pl.Trainer.__init__)["precision"]

DEFAULT_DATA = {"class_path": "fvlab.data.DigitsDataModule"}


class BadConfig(ValueError):
    """A config that cannot be built: unknown key, wrong type, impossible geometry, bad data."""


class Trainer(pl.Trainer):
    """Lightning's Trainer that also takes ``precision: auto``: what this machine runs fast."""

    def __init__(self, *, precision: Optional[Union[TRAINER_PRECISION, Literal["auto"]]] = None,
                 **kwargs: Any):
        from fvlab.runtime import resolve_precision

        # The request, not the machine's answer, stays in the parsed config, so config.yaml is portable.
        precision = resolve_precision(precision, accelerator=kwargs.get("accelerator") or "auto",
                                      devices=kwargs.get("devices") or "auto")
        super().__init__(precision=precision, **kwargs)


class FvlabCLI(ConfigOverCheckpointHparams, LightningCLI):
    """LightningCLI for ImageClassifier with any datamodule; the data's sizes link to the model.

    ``parse_only``: parse and check the arguments (``self.config``), instantiate nothing. With
    ``run=True`` LightningCLI runs its ``validate`` or ``test`` subcommand, ``--ckpt_path`` its own
    (the weights only: the config stays the run's, see ``ConfigOverCheckpointHparams``).
    """

    def __init__(self, *args: Any, run_dir: Path | None = None, experiment: str = "",
                 variant: str = "", extra_callbacks: Sequence[pl.Callback] = (), parse_only: bool = False,
                 **kwargs: Any):
        self.stage_started = False
        self.measured: dict[str, float] = {}
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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's ``validate`` and ``test``, run on a trained run's checkpoint (:func:`run_stage`).

        ``fit`` is not among them: a run is built first (checked, measured, planned) and fitted
        by :func:`fvlab.lit.fit.fit_run`, which sweeps and ``fvlab fit`` share.
        """
        return {stage: skip for stage, skip in LightningCLI.subcommands().items() if stage in STAGES}

    def instantiate_classes(self) -> None:
        """Model, datamodule and trainer, unless only parsing."""
        if not self.parse_only:
            super().instantiate_classes()

    def before_validate(self) -> None:
        """From here on an error is the stage's, not the config's."""
        self.stage_started = True

    def before_test(self) -> None:
        """Refuse a datamodule without a test split (its validation figures never stand in)."""
        reason = getattr(self.datamodule, "no_test_split", "")
        if reason:
            raise BadConfig(f"{self.variant or 'the run'}: no test split to test on: {reason}")
        self.stage_started = True

    def after_validate(self) -> None:
        """Keep the stage's logged figures (LightningCLI drops what the trainer returns)."""
        self.measured = {k: float(v) for k, v in self.trainer.callback_metrics.items()}

    after_test = after_validate

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
                dirpath=checkpoint_dir(self.run_dir), filename=Path(BEST_CHECKPOINT).stem, monitor=self.model.task.monitor,
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


def _cli(args: list[str], model_class: type[ImageClassifier], run: bool = False, **kwargs: Any) -> FvlabCLI:
    """FvlabCLI on ``args``; BadConfig with a one-line reason when they do not parse or build.

    With ``run``, ``args[0]`` is a subcommand (``validate``, ``test``) that LightningCLI runs; an
    error once the stage has started is the stage's own and propagates as it is.
    """
    seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_logger.level
    seed_logger.setLevel(logging.WARNING)  # "Seed set to 0" must not precede a bad-input message
    parser_kwargs: dict[str, Any] = {"exit_on_error": False, "dump_header": None}
    if run:
        parser_kwargs = {"exit_on_error": False, args[0]: parser_kwargs}
    cli = FvlabCLI.__new__(FvlabCLI)  # held before __init__ runs: it says whether the stage started
    try:
        cli.__init__(model_class, pl.LightningDataModule, subclass_mode_data=True, run=run,
                     trainer_class=Trainer, seed_everything_default=0,
                     auto_configure_optimizers=False,  # the module's timm optimizer rules
                     trainer_defaults={"enable_model_summary": False, "log_every_n_steps": 10},
                     parser_kwargs=parser_kwargs, args=args, **kwargs)
        return cli
    except SystemExit:
        raise  # --help, --print_config
    except Exception as err:  # jsonargparse's ArgumentError, our ValueErrors from __init__
        if getattr(cli, "stage_started", False):
            raise
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


def _run_args(config: Layers, overrides: Layers, experiment: str, variant: str, seed: int | None,
              model_class: type[ImageClassifier]) -> tuple[type[ImageClassifier], str | None, list[str]]:
    """(LightningModule class, its class_path, LightningCLI's arguments) of one run's layers and overrides."""
    first, *rest = [config] if isinstance(config, Mapping) else list(config) or [{}]
    overrides = [overrides] if isinstance(overrides, Mapping) else list(overrides)
    model_class, class_path, (first, *rest) = split_model_class([first, *rest, *overrides], model_class)
    rest, overrides = rest[:len(rest) - len(overrides)], rest[len(rest) - len(overrides):]
    first = dict(first)
    first.setdefault("data", dict(DEFAULT_DATA))  # before the overrides: --data.batch_size 32
    head = {"name": experiment or None, "variant": variant or None}
    # An argument, not a fragment: a --config after --print_config would be all that it prints.
    tail = [f"--seed_everything={seed}"] if seed is not None else []
    return model_class, class_path, _args(head, first, *rest, overrides, tail)


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
    already measured ``model/*`` values (``fit_run`` measures the missing ones); ``model_class`` is the
    LightningModule whose arguments ``model`` holds (an ``ImageClassifier`` subclass, e.g.
    ``SupernetClassifier``). With a ``run_dir``, the fit writes the resolved config to its config.yaml.
    """
    model_class, class_path, args = _run_args(config, overrides, experiment, variant, seed, model_class)
    with warnings.catch_warnings():
        # LightningCLI warns when given args while sys.argv holds fvlab's own arguments.
        warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
        cli = _cli(args, model_class, run_dir=run_dir,
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


def run_stage(stage: str, config: Layers, ckpt_path: str, overrides: Layers = (), *, experiment: str = "",
              variant: str = "", seed: int | None = None, weights_only: bool = True,
              model_class: type[ImageClassifier] = ImageClassifier) -> FvlabCLI:
    """LightningCLI's own ``validate`` or ``test`` subcommand on one run's checkpoint; the CLI, its figures in ``measured``.

    The run's layers and ``overrides`` are parsed as :func:`build_run` parses them; ``ckpt_path``
    (a file) and ``weights_only`` are the subcommand's own arguments. BadConfig when the config
    does not build or a test has no test split; an error of the stage itself propagates.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    model_class, _, args = _run_args(config, overrides, experiment, variant, seed, model_class)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
        return _cli([stage, *args, f"--ckpt_path={ckpt_path}", f"--weights_only={str(weights_only).lower()}"],
                    model_class, run=True, experiment=experiment, variant=variant, save_config_callback=None)


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with ``overrides`` (a config fragment, e.g. {"model.arch.ct_size": 2}) merged as
    LightningCLI merges them; ExperimentError when a key or value is not accepted."""
    try:
        return merge_config(config, overrides)
    except BadConfig as err:
        raise ExperimentError(str(err)) from None


def variant_config(experiment: Experiment, variant: str | None = None) -> dict[str, Any]:
    """The experiment's base config with ``variant``'s fragment merged (a fresh copy)."""
    base, *own = experiment.layers(variant)
    return apply_overrides(base, own[0]) if own else base
