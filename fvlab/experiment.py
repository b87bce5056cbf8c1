"""Experiment files: a LightningCLI config plus ``name``, an ``ablation`` block of variants and ``seeds``.

Each variant is the base config with dotted overrides applied, e.g.
``{model.arch.ct_size: 1}``. A file without ``ablation`` is a single run named ``default``, or
named by its ``variant`` key: the config.yaml that ``fvlab fit`` writes into a run directory
carries ``name``, ``variant`` (and ``seeds: [s]`` for a seeded run), so re-running it trains
that same run in place.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ["Experiment", "ExperimentError", "load_experiment", "set_dotted", "get_dotted",
           "apply_overrides", "parse_cli_overrides"]

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


def _keep_accepted_init_args(section: dict) -> None:
    # As LightningCLI does on `--data.class_path OTHER`: keep the init_args the new class accepts.
    module_name, _, class_name = str(section.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        parameters = inspect.signature(cls).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return  # an unknown class: LightningCLI reports it
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    init_args = section.get("init_args")
    if isinstance(init_args, dict):
        section["init_args"] = {k: v for k, v in init_args.items() if k in parameters}


def apply_overrides(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``config`` with dotted ``overrides`` ({"model.arch.ct_size": 2}) applied."""
    out = copy.deepcopy(dict(config))
    for key, value in overrides.items():
        before = get_dotted(out, key)
        set_dotted(out, key, value)
        if key.endswith(".class_path") and value != before:
            section = get_dotted(out, key.rpartition(".")[0])
            if isinstance(section, dict):
                _keep_accepted_init_args(section)
    return out


def parse_cli_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``["--model.lr", "0.01", "--trainer.max_epochs=2"]`` to ``{"model.lr": 0.01, ...}`` (YAML values)."""
    overrides: dict[str, Any] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) == 2:
            raise ExperimentError(f"unexpected argument {item!r}; overrides look like "
                                  f"--model.arch.ct_size 4 or --trainer.max_epochs=2")
        key, sep, text = item[2:].partition("=")
        if not sep:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ExperimentError(f"--{key} needs a value, e.g. --{key} VALUE")
            text = items[i + 1]
            i += 1
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        overrides[key] = value
        i += 1
    return overrides


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
        model = config.get("model")
        if isinstance(model, dict) and isinstance(model.get("arch"), str):
            model["arch"] = {"name": model["arch"]}  # `arch: fastervit_0` short form
        return config

    def config(self, variant: str | None = None) -> dict[str, Any]:
        """The base config with ``variant``'s overrides applied (a fresh copy)."""
        variant = variant or self.variant_names()[0]
        if variant not in self.variant_names():
            raise ExperimentError(
                f"unknown variant {variant!r} in {self.path}; known: {', '.join(self.variant_names())}")
        return apply_overrides(self.base_config(), self.variants.get(variant, {}))


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
    if variants and named_single:
        raise ExperimentError(f"{path}: 'variant' names the single run of a file without 'ablation'; "
                              f"remove it or the ablation block")
    experiment = Experiment(name=name, path=path, base=raw, variants=variants, seeds=seeds,
                            single_name=single)
    if reference is not None and reference not in experiment.variant_names():
        raise ExperimentError(f"{path}: reference {reference!r} is not a variant; known: "
                              f"{', '.join(experiment.variant_names())}")
    experiment.reference = reference or experiment.variant_names()[0]
    for variant in experiment.variant_names():
        experiment.config(variant)  # every override must apply
    return experiment


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Sequence[str] = (),
                 prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested configs (``ignore``: dotted keys to skip)."""
    keys = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += changed_keys(a, b, ignore, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" not in ignore:
            keys.append(f"{prefix}{key}")
    return keys
