"""The run layout, defined once: where runs live, how they are found, read and written.

- An experiment's runs: ``runs/<experiment>/<variant>/``, or ``<variant>/seed_<s>/`` when the
  experiment lists seeds (:func:`run_dir_for`).
- A study's runs: ``runs/<study>/study.journal`` and one ``trial_NNNN/`` per trial; the front
  re-trained with fresh seeds in ``confirm/trial_NNNN/seed_<s>/`` (:func:`confirm_dir`); the front's
  runnable configs in ``best/trial_NNNN.yaml``.
- A run directory holds ``config.yaml`` (written first, starting with :data:`CONFIG_HEADER`),
  ``metrics.json`` (written last, atomically) and the TensorBoard events.
- A configuration is known by :func:`config_hash`: a run directory whose stored hash equals the
  new config's is the same run (skipped or resumed, never trained again).

No torch here: the report and the sweep's file checks use it without loading a model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

__all__ = ["CONFIG_FILE", "METRICS_FILE", "TEST_FILE", "STUDY_FILE", "SUMMARY_MD", "SUMMARY_CSV", "PROFILE_FILE",
           "MEASUREMENTS_FILE", "PARETO_MD", "PARETO_CSV", "REPORT_MD", "REPORT_CSV", "SUPERNET_DIR", "BEST_CHECKPOINT",
           "LAST_CHECKPOINT", "checkpoint_dir", "checkpoint_path", "best_study_name", "CONFIG_HEADER", "RUN_LABELS",
           "DISPLAY_KEYS", "seed_dir_name", "seed_of", "trial_dir_name", "trial_number_of", "run_dir_for",
           "variant_dir_of", "confirm_dir", "confirm_seeds", "is_confirm_run", "best_dir", "best_config_path",
           "stale_best_configs", "has_trial_dirs", "is_run_config", "is_run_dir", "find_runs", "find_studies",
           "layout_conflict", "read_config", "trained_config", "write_config", "read_metrics", "write_json", "stable_hash",
           "without_display_keys", "config_hash", "changed_keys"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TEST_FILE = "test.json"  # written by `fvlab test` into the run directory
STUDY_FILE = "study.journal"
# What an experiment, study or report directory holds besides its runs.
SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"  # fvlab fit's table, in runs/<experiment>/
PROFILE_FILE = "profile.json"  # fvlab profile's rows, in runs/<experiment>/
MEASUREMENTS_FILE = "measurements.json"  # side-by-side figures per architecture, in runs/<experiment>/
PARETO_MD, PARETO_CSV = "pareto.md", "pareto.csv"  # a study's front, in runs/<study>/
REPORT_MD, REPORT_CSV = "report.md", "report.csv"  # fvlab report's output directory
SUPERNET_DIR = "supernet"  # a one-shot study's weight-sharing run, runs/<study>/supernet/
BEST_CHECKPOINT, LAST_CHECKPOINT = "best.ckpt", "last.ckpt"  # in a run's checkpoints/
CONFIG_HEADER = "# fvlab: resolved config"  # the first line of the config.yaml a run starts by writing
# The labels config.yaml carries above the resolved config, so that `fvlab fit config.yaml` re-runs
# that run in place; they name the run, they are not part of what it trains.
RUN_LABELS = ("name", "variant", "seeds")
# Settings that change what is shown, not what is trained: left out of the config hash.
DISPLAY_KEYS = ("trainer.enable_progress_bar", "trainer.enable_model_summary")

_SEED_PREFIX = "seed_"
_TRIAL_PREFIX = "trial_"
_SEED_DIR = re.compile(rf"^{_SEED_PREFIX}(\d+)$")
_TRIAL_DIR = re.compile(rf"^{_TRIAL_PREFIX}(\d+)$")
_CONFIRM = "confirm"
_BEST = "best"
_CHECKPOINTS = "checkpoints"


# ---- names -----------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints go: ``<run_dir>/checkpoints``."""
    return Path(run_dir) / _CHECKPOINTS


def checkpoint_path(run_dir: Path, which: str = "best") -> Path:
    """A run's ``best`` or ``last`` checkpoint file."""
    if which not in ("best", "last"):
        raise ValueError(f"a run keeps a 'best' and a 'last' checkpoint, not {which!r}")
    return checkpoint_dir(run_dir) / (BEST_CHECKPOINT if which == "best" else LAST_CHECKPOINT)


def best_study_name(study: str) -> str:
    """The experiment name of a study's exported best configs: ``<study>_best``."""
    return f"{study}_best"


def seed_dir_name(seed: int) -> str:
    """``seed_<s>``: the directory of one seed of a variant."""
    return f"{_SEED_PREFIX}{int(seed)}"


def seed_of(path: str | Path) -> int | None:
    """The seed of a ``seed_<s>`` directory, or None for any other name."""
    match = _SEED_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def trial_dir_name(number: int) -> str:
    """``trial_NNNN``: the run directory (and run name) of an Optuna trial."""
    return f"{_TRIAL_PREFIX}{int(number):04d}"


def trial_number_of(path: str | Path) -> int | None:
    """The trial number of a ``trial_NNNN`` directory, or None for any other name."""
    match = _TRIAL_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def run_dir_for(root: Path, variant: str, seed: int | None) -> Path:
    """``root/<variant>``, or ``root/<variant>/seed_<s>`` when the experiment lists seeds."""
    return Path(root) / variant if seed is None else Path(root) / variant / seed_dir_name(seed)


def variant_dir_of(run_dir: Path) -> Path:
    """The variant directory of a run: its parent for a ``seed_<s>`` run, else the run itself."""
    run_dir = Path(run_dir)
    return run_dir.parent if seed_of(run_dir) is not None else run_dir


def confirm_dir(study_dir: Path, trial_number: int, seed: int) -> Path:
    """``runs/<study>/confirm/trial_NNNN/seed_<s>``: a front member trained again with a fresh seed."""
    return Path(study_dir) / _CONFIRM / trial_dir_name(trial_number) / seed_dir_name(seed)


def confirm_seeds(study_dir: Path) -> list[int]:
    """The seeds of the confirm runs under ``runs/<study>/confirm`` (whatever their state)."""
    root = Path(study_dir) / _CONFIRM
    found = {seed_of(p) for p in root.glob(f"{_TRIAL_PREFIX}*/{_SEED_PREFIX}*")
             if trial_number_of(p.parent) is not None}
    return sorted(s for s in found if s is not None)


def is_confirm_run(run_dir: Path, study_dir: Path) -> bool:
    """Whether ``run_dir`` is one of the study's confirm runs."""
    return (Path(study_dir) / _CONFIRM).resolve() in Path(run_dir).resolve().parents


def best_dir(study_dir: Path) -> Path:
    """``runs/<study>/best``: the front's configs, runnable with ``fvlab fit``."""
    return Path(study_dir) / _BEST


def best_config_path(study_dir: Path, run_name: str) -> Path:
    """``runs/<study>/best/<run name>.yaml``: one front member's config."""
    return best_dir(study_dir) / f"{run_name}.yaml"


def stale_best_configs(study_dir: Path, keep: set[str] | frozenset[str]) -> list[Path]:
    """The exported front configs under ``best/`` whose file names are not in ``keep``."""
    return [p for p in sorted(best_dir(study_dir).glob(f"{_TRIAL_PREFIX}*.yaml")) if p.name not in keep]


def has_trial_dirs(study_dir: Path) -> bool:
    """Whether a directory holds trial run directories (``trial_*``)."""
    return Path(study_dir).is_dir() and any(Path(study_dir).glob(f"{_TRIAL_PREFIX}*"))


# ---- finding runs ----------------------------------------------------------------------


def is_run_config(path: Path) -> bool:
    """A config.yaml that an fvlab run wrote (it starts with :data:`CONFIG_HEADER`)."""
    try:
        with Path(path).open() as handle:
            return handle.read(len(CONFIG_HEADER)) == CONFIG_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def is_run_dir(path: Path) -> bool:
    """An fvlab run directory: it holds metrics.json, or the config.yaml a run writes before anything else."""
    path = Path(path)
    return (path / METRICS_FILE).is_file() or is_run_config(path / CONFIG_FILE)


def _walk(root: Path, skip: Path | None) -> Iterator[tuple[Path, list[str], bool]]:
    """(directory, its file names, is it a run) top-down in name order; no descent into a run,
    ``checkpoints``, hidden directories or ``skip``."""
    skip_resolved = Path(skip).resolve() if skip is not None else None
    for here, dirs, files in os.walk(root):
        here_path = Path(here)
        run = is_run_dir(here_path)
        yield here_path, files, run
        if run:
            dirs[:] = []  # a run directory holds no other runs
            continue
        dirs[:] = sorted(d for d in dirs if d != _CHECKPOINTS and not d.startswith(".")
                         and (skip_resolved is None or (here_path / d).resolve() != skip_resolved))


def find_runs(root: Path, skip: Path | None = None) -> list[Path]:
    """Run directories in or under ``root`` (a run, an experiment, a study or a runs directory), in
    name order: ``<variant>/``, ``<variant>/seed_<s>/``, ``trial_NNNN/``, ``confirm/trial_NNNN/seed_<s>/``."""
    return [path for path, _, run in _walk(Path(root), skip) if run]


def find_studies(root: Path, skip: Path | None = None) -> list[Path]:
    """The study journals (``study.journal``) in or under ``root``, outside run directories' contents."""
    return [path / STUDY_FILE for path, files, _ in _walk(Path(root), skip) if STUDY_FILE in files]


def layout_conflict(run_dir: Path) -> str:
    """Why seeded and unseeded runs of one variant would nest inside each other, or ''."""
    run_dir = Path(run_dir)
    seeded = seed_of(run_dir) is not None
    if seeded and run_dir.parent.is_dir() and is_run_dir(run_dir.parent):
        return (f"{run_dir.parent} holds a run without seeds; runs with seeds would nest inside it. "
                f"Move it away, or use another --runs-dir")
    if not seeded and run_dir.is_dir() and any(seed_of(child) is not None and is_run_dir(child)
                                               for child in run_dir.iterdir()):
        return (f"{run_dir} holds runs with seeds ({_SEED_PREFIX}*/); train it with --seeds, or use "
                f"another --runs-dir")
    return ""


# ---- reading and writing ---------------------------------------------------------------


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """A run's config.yaml as written (labels included), or None when absent, unreadable or not a mapping."""
    try:
        config = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def trained_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config a run was trained with (config.yaml without :data:`RUN_LABELS`), or None."""
    config = read_config(run_dir)
    if config is None:
        return None
    return {k: v for k, v in config.items() if k not in RUN_LABELS}


def write_config(run_dir: Path, config: Mapping[str, Any], *, experiment: str, variant: str,
                 seed: int | None) -> Path:
    """Write a run's config.yaml: the header, the labels that re-run it in place, the resolved config."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    seeded = seed_of(run_dir) is not None
    header = (f"{CONFIG_HEADER} of variant '{variant}' of experiment '{experiment}'"
              f"{f', seed {seed}' if seeded else ''}.\n"
              f"# Re-run it in place as it is: fvlab fit {path}\n")
    head: dict[str, Any] = {"name": experiment, "variant": variant}
    if seeded:
        head["seeds"] = [seed]
    path.write_text(header + yaml.safe_dump({**head, **config}, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's metrics.json, or None when there is none (or it is unreadable)."""
    try:
        metrics = json.loads((Path(run_dir) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def write_json(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    """Write ``data`` as indented JSON atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    # A per-process temporary name: ranks or workers never write into each other's file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- configuration hashes --------------------------------------------------------------


def stable_hash(value: Any) -> str:
    """A short hash of a JSON-able value, the same in every process and on every machine."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def without_display_keys(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config without the display-only settings (progress bar, model summary)."""
    config = copy.deepcopy(dict(resolved))
    for key in DISPLAY_KEYS:
        section, _, name = key.partition(".")
        if isinstance(config.get(section), dict):
            config[section].pop(name, None)
    return config


def config_hash(resolved: Mapping[str, Any]) -> str:
    """A short stable hash of a resolved config, ignoring display-only settings."""
    return stable_hash(without_display_keys(resolved))


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
