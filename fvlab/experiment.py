"""Experiment files: a LightningCLI config plus ``name``, an ``ablation`` block of variants and ``seeds``.

Each variant is a config fragment that LightningCLI merges over the base config, as it merges
a second ``--config`` file, e.g. ``{model.arch.ct_size: 1}`` (dotted or nested keys). A file without ``ablation`` is a single run named ``default``, or
named by its ``variant`` key: the config.yaml that ``fvlab fit`` writes into a run directory
carries ``name``, ``variant`` (and ``seeds: [s]`` for a seeded run), so re-running it trains
that same run in place.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["Experiment", "ExperimentError", "load_experiment", "get_dotted", "model_arguments"]

DEFAULT_VARIANT = "default"
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExperimentError(ValueError):
    """A bad experiment file or override: the message names the key or file and the fix."""


def get_dotted(config: Mapping, key: str, default: Any = None) -> Any:
    """Read a dotted key, looking into ``init_args`` of subclass-mode sections."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping):
            return default
        if part not in node and "init_args" in node:
            node = node["init_args"]
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def model_arguments(config: Mapping[str, Any]) -> dict[str, Any]:
    """The LightningModule's arguments in a config: ``model``, or its ``init_args`` in the subclass form
    (``model: {class_path: fvlab.lit.SemanticSegmenter, init_args: {...}}``); the mapping itself, not a copy."""
    model = config.get("model")
    if not isinstance(model, dict):
        return {}
    return model["init_args"] if isinstance(model.get("init_args"), dict) else model


@dataclass
class Experiment:
    """A parsed experiment file: name, base config, variants (name -> overrides), seeds, reference."""

    name: str
    path: Path
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] | None = None
    reference: str | None = None
    single_name: str = DEFAULT_VARIANT

    def variant_names(self) -> list[str]:
        """Variant names in file order (``default``, or the file's ``variant``, without ablation)."""
        return list(self.variants) or [self.single_name]

    def base_config(self) -> dict[str, Any]:
        """The base config with the ablation block and seeds ignored (a fresh copy)."""
        config = copy.deepcopy(self.base)
        model = model_arguments(config)
        if isinstance(model.get("arch"), str):
            model["arch"] = {"name": model["arch"]}  # `arch: fastervit_0` short form
        return config

    def layers(self, variant: str | None = None) -> list[dict[str, Any]]:
        """The config fragments of ``variant``, merged in order: the base config, then the variant's own."""
        variant = variant or self.variant_names()[0]
        if variant not in self.variant_names():
            raise ExperimentError(
                f"unknown variant {variant!r} in {self.path}; known: {', '.join(self.variant_names())}")
        own = self.variants.get(variant)
        return [self.base_config(), *([copy.deepcopy(own)] if own else [])]


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ExperimentError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path} must hold a mapping of config sections (model, data, trainer, ...)")
    raw = dict(raw)
    name = raw.pop("name", None) or path.stem
    if not isinstance(name, str) or not _VARIANT_NAME.match(name):
        raise ExperimentError(f"{path}: name {name!r} must be a plain directory name "
                              f"(letters, digits, '_', '-', '.')")
    named_single = raw.pop("variant", None)
    single = named_single or DEFAULT_VARIANT
    if not isinstance(single, str) or not _VARIANT_NAME.match(single):
        raise ExperimentError(f"{path}: variant {single!r} must be a plain directory name")
    seeds = raw.pop("seeds", None)
    if seeds is not None:
        if (not isinstance(seeds, list) or not seeds
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)):
            raise ExperimentError(f"{path}: seeds must be a non-empty list of integers in [0, 2**32), "
                                  f"e.g. seeds: [0, 1, 2]; got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ExperimentError(f"{path}: seeds {seeds} repeat a seed; list each seed once")
    reference = raw.pop("reference", None)
    ablation = raw.pop("ablation", None) or {}
    if not isinstance(ablation, dict):
        raise ExperimentError(f"{path}: 'ablation' must map variant names to config fragments")
    variants: dict[str, dict[str, Any]] = {}
    for variant, overrides in ablation.items():
        if not isinstance(variant, str) or not _VARIANT_NAME.match(variant):
            raise ExperimentError(f"{path}: variant name {variant!r} must be a plain directory name")
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise ExperimentError(f"{path}: variant {variant!r} must map dotted keys to values, "
                                  f"e.g. {{model.arch.ct_size: 1}}")
        variants[variant] = {str(k): v for k, v in overrides.items()}
    if variants and named_single:
        raise ExperimentError(f"{path}: 'variant' names the single run of a file without 'ablation'; "
                              f"remove it or the ablation block")
    experiment = Experiment(name=name, path=path, base=raw, variants=variants, seeds=seeds,
                            single_name=single)
    if reference is not None and reference not in experiment.variant_names():
        raise ExperimentError(f"{path}: reference {reference!r} is not a variant; known: "
                              f"{', '.join(experiment.variant_names())}")
    experiment.reference = reference or experiment.variant_names()[0]
    return experiment
