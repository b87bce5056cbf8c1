"""Experiment files: a LightningCLI config plus ``name`` and an ``ablation`` block of variants.

Each variant is the base config with dotted overrides applied, e.g.
``{model.arch.ct_size: 1}``. A file without ``ablation`` is a single run named ``default``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["Experiment", "ExperimentError", "load_experiment", "set_dotted", "get_dotted"]

DEFAULT_VARIANT = "default"
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExperimentError(ValueError):
    """A bad experiment file or override: the message names the key or file and the fix."""


def _descend(node: dict, key: str) -> dict:
    # A subclass-mode section (class_path + init_args) takes plain keys into init_args,
    # as LightningCLI's own `--data.batch_size` does.
    if "class_path" in node and key not in ("class_path", "init_args"):
        node = node.setdefault("init_args", {})
    return node


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Set ``config[a][b][c] = value`` for the dotted ``key`` "a.b.c", creating sections."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        node = _descend(node, part)
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ExperimentError(f"cannot set {key!r}: {part!r} is {child!r}, not a section")
        node = child
    _descend(node, parts[-1])[parts[-1]] = copy.deepcopy(value)


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


@dataclass
class Experiment:
    """A parsed experiment file: its name, base config and variants (name -> overrides)."""

    name: str
    path: Path
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def variant_names(self) -> list[str]:
        """Variant names in file order (``default`` when there is no ablation block)."""
        return list(self.variants) or [DEFAULT_VARIANT]

    def config(self, variant: str = DEFAULT_VARIANT) -> dict[str, Any]:
        """The base config with ``variant``'s overrides applied (a fresh copy)."""
        if variant not in self.variant_names():
            raise ExperimentError(
                f"unknown variant {variant!r} in {self.path}; known: {', '.join(self.variant_names())}")
        config = copy.deepcopy(self.base)
        model = config.get("model")
        if isinstance(model, dict) and isinstance(model.get("arch"), str):
            model["arch"] = {"name": model["arch"]}  # `arch: fastervit_0` short form
        for key, value in self.variants.get(variant, {}).items():
            set_dotted(config, key, value)
        return config


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
    ablation = raw.pop("ablation", None) or {}
    if not isinstance(ablation, dict):
        raise ExperimentError(f"{path}: 'ablation' must map variant names to dotted overrides")
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
    experiment = Experiment(name=name, path=path, base=raw, variants=variants)
    for variant in experiment.variant_names():
        experiment.config(variant)  # every override must apply
    return experiment
