"""Model figures of built runs, measured side by side and cached per architecture identity.

``fvlab fit`` measures all of an experiment's variants together before training the first,
``fvlab profile`` always measures, and ``fvlab sweep`` measures each new architecture next to
its base architecture: throughput moves 10-30% from one moment to the next on a shared machine,
so only figures taken in the same interleaved rounds compare. The protocol itself is
:func:`fvlab.profile.measure_side_by_side`; this module turns built runs into its inputs and
keeps the figures per architecture identity, so that adding seeds never re-measures and a
table never mixes figures of different identities.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fvlab.lit.build import RunSpec
from fvlab.metrics import (GFLOPS, LATENCY_MS_HI, LATENCY_MS_LO, MODEL_EXTRA_METRICS, MODEL_METRICS,
                           PARAMS_BUILT_M, PARAMS_M, SIZE_METRICS, SPEEDUP_HI, SPEEDUP_LO, THROUGHPUT,
                           is_model_metric)
from fvlab.profile import count_flops, count_params, measure_side_by_side
from fvlab.runs import MEASUREMENTS_FILE, stable_hash, write_json
from fvlab.runtime import cpu_description

__all__ = ["Target", "device_kind", "arch_identity", "identity_key", "measure_specs", "MeasurementCache",
           "THROUGHPUT_METRICS", "profile_rows", "write_profile_json", "measure_experiment"]

# The figures the side-by-side protocol gives; params and GFLOPs need no timing.
THROUGHPUT_METRICS = tuple(m for m in (*MODEL_METRICS, *MODEL_EXTRA_METRICS)
                           if m not in SIZE_METRICS)


def device_kind(device: torch.device) -> str:
    """What throughput figures are comparable across: the processor model, not its index."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {cpu_description()[0]}"
    return device.type


def arch_identity(spec: RunSpec, backend: str = "eager", batch_size: int | None = None) -> dict[str, Any]:
    """What a throughput figure depends on: architecture, input geometry, device, precision, threads, backend."""
    from fvlab.experiment import model_arguments

    model = model_arguments(spec.config)
    datamodule = spec.datamodule
    # A segmenter's network is its encoder and its decoder.
    head = {k: model[k] for k in ("decoder", "decoder_channels") if k in model}
    return {"arch": model.get("arch"), **head, "image_size": getattr(datamodule, "image_size", None),
            "in_chans": getattr(datamodule, "in_chans", None),
            "num_classes": getattr(datamodule, "num_classes", None),
            "channels_last": model.get("channels_last"), "device": device_kind(spec.device),
            "precision": spec.precision,
            "threads": torch.get_num_threads() if spec.device.type == "cpu" else None,
            "backend": backend, "batch_size": batch_size}


def identity_key(identity: Mapping[str, Any]) -> str:
    """A short stable hash of an identity."""
    return stable_hash(identity)


@dataclass
class Target:
    """One network to measure, with its input geometry, device and precision."""

    network: torch.nn.Module
    image_size: int | tuple[int, int] = 224
    in_chans: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "32-true"

    @classmethod
    def of(cls, spec: RunSpec) -> "Target":
        """The built run's network at its data's geometry, device and precision."""
        datamodule = spec.datamodule
        return cls(spec.model.model, getattr(datamodule, "image_size", None) or 224,
                   getattr(datamodule, "in_chans", None), spec.device, spec.precision)


def _targets(models: Mapping[str, RunSpec | Target]) -> dict[str, Target]:
    return {name: m if isinstance(m, Target) else Target.of(m) for name, m in models.items()}


def _check_comparable(targets: Mapping[str, Target], device: torch.device | None, precision: str | None) -> None:
    """ValueError unless the targets share a device and a precision (or ``device``/``precision`` replace theirs)."""
    devices = {str(t.device) for t in targets.values()}
    precisions = {t.precision for t in targets.values()}
    if device is None and len(devices) > 1 or precision is None and len(precisions) > 1:
        raise ValueError(f"runs measured side by side must share device and precision, got "
                         f"{sorted(devices)} and {sorted(precisions)}")


def _count_figures(name: str, target: Target, counts: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """One target's params and GFLOPs (those in ``counts`` if given), its timed figures None."""
    figures: dict[str, Any] = {PARAMS_M: count_params(target.network, target.image_size) / 1e6,
                               PARAMS_BUILT_M: count_params(target.network) / 1e6,
                               GFLOPS: None, **dict.fromkeys(THROUGHPUT_METRICS)}
    if counts and name in counts:
        figures[GFLOPS] = counts[name].get(GFLOPS)
    else:
        try:
            with torch.random.fork_rng(devices=[]):
                figures[GFLOPS] = count_flops(target.network, target.image_size,
                                                      in_chans=target.in_chans)
        except Exception as err:  # a measurement never fails a run
            # stacklevel 3: the warning names measure_specs' caller.
            warnings.warn(f"{name}: FLOP count failed, recorded as null: {type(err).__name__}: {err}",
                          stacklevel=3)
    return figures


def _time_side_by_side(targets: Mapping[str, Target], reference: str, batch_size: int | None, rounds: int | None,
                       round_s: float | None, backend: str, device: torch.device | None,
                       precision: str | None) -> dict[str, Any] | None:
    """measure_side_by_side of the targets' networks, every generator left as it was; None (warned) on failure."""
    first = next(iter(targets.values()))
    device = device or first.device
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        # Measuring must leave every generator as it was: a run trains the same whether or not
        # its architecture was measured first.
        with torch.random.fork_rng(devices=cuda):
            return measure_side_by_side(
                {name: t.network for name, t in targets.items()},
                {name: t.image_size for name, t in targets.items()},
                in_chans={name: t.in_chans for name, t in targets.items()},
                reference=reference, batch_size=batch_size, device=device,
                precision=precision or first.precision, rounds=rounds, round_s=round_s, backend=backend)
    except Exception as err:  # out of memory, an unsupported dtype on this device ...
        # stacklevel 3: the warning names measure_specs' caller.
        warnings.warn(f"throughput measurement failed, recorded as null: {type(err).__name__}: {err}",
                      stacklevel=3)
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_specs(specs: Mapping[str, RunSpec | Target], *, reference: str | None = None,
                  throughput: bool = True, batch_size: int | None = None, rounds: int | None = None,
                  round_s: float | None = None, backend: str = "eager", device: torch.device | None = None,
                  precision: str | None = None, counts: Mapping[str, Mapping[str, Any]] | None = None,
                  ) -> dict[str, dict[str, Any]]:
    """``model/*`` figures of each built run (or target), the throughputs measured side by side in one process.

    A failed measurement is a warning and None (a measurement never fails a run). Runs on
    different devices or precisions are not comparable: they must not be passed together.
    ``device`` and ``precision`` replace the runs' own (``fvlab profile --device``); ``counts``
    are params and GFLOPs already counted (they do not depend on the batch size).
    """
    targets = _targets(specs)
    names = list(targets)
    reference = reference if reference in targets else names[0]
    _check_comparable(targets, device, precision)
    metrics: dict[str, dict[str, Any]] = {}
    for name, target in targets.items():  # a loop, not a comprehension: the warnings' stacklevel counts frames
        metrics[name] = _count_figures(name, target, counts)
    if not throughput:
        return metrics
    results = _time_side_by_side(targets, reference, batch_size, rounds, round_s, backend, device, precision)
    for name, result in (results or {}).items():
        metrics[name].update(result.metrics())
        metrics[name]["throughput"] = result.to_dict()
    return metrics


class MeasurementCache:
    """Figures per architecture identity in one JSON file (an experiment's ``measurements.json``).

    A speedup is stored under a key that includes the reference's identity: the same
    architecture against another reference is another figure.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def key(identity: Mapping[str, Any], reference: Mapping[str, Any] | None) -> str:
        """Cache key of an identity measured against a reference identity."""
        return identity_key({"model": dict(identity), "reference": dict(reference or {})})

    def get(self, identity: Mapping[str, Any], reference: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The figures measured for ``identity`` against ``reference``, or None."""
        return self.entries.get(self.key(identity, reference))

    def put(self, identity: Mapping[str, Any], reference: Mapping[str, Any] | None,
            figures: Mapping[str, Any]) -> None:
        """Remember the figures (written to disk by :meth:`save`)."""
        self.entries[self.key(identity, reference)] = {**dict(figures), "identity": dict(identity)}

    def save(self) -> None:
        """Write the file atomically (a reader never sees half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.entries)


def profile_rows(specs: Mapping[str, RunSpec | Target], *, batch_sizes: list[int | None],
                 reference: str | None = None, throughput: bool = True, rounds: int | None = None,
                 backend: str = "eager", device: torch.device | None = None,
                 precision: str | None = None) -> list[dict[str, Any]]:
    """One row per model and batch size: params, GFLOPs and the side-by-side figures (``fvlab profile``)."""
    targets = _targets(specs)
    rows: list[dict[str, Any]] = []
    counts = None
    for batch_size in batch_sizes:
        measured = measure_specs(targets, reference=reference, throughput=throughput, batch_size=batch_size,
                                 rounds=rounds, backend=backend, device=device, precision=precision,
                                 counts=counts)
        counts = measured  # params and GFLOPs do not depend on the batch size
        for name, figures in measured.items():
            target = targets[name]
            detail = figures.pop("throughput", None) or {}
            rows.append({"name": name, "image_size": target.image_size,
                         "batch_size": detail.get("batch_size", batch_size), "backend": backend,
                         "precision": detail.get("dtype", precision or target.precision),
                         "device": detail.get("device", str(device or target.device)),
                         "threads": detail.get("threads"), "rounds": detail.get("rounds"),
                         "reference": detail.get("reference"), "compile_s": detail.get("compile_s"),
                         LATENCY_MS_LO: detail.get("latency_ms_lo"),
                         LATENCY_MS_HI: detail.get("latency_ms_hi"),
                         SPEEDUP_LO: detail.get("speedup_lo"), SPEEDUP_HI: detail.get("speedup_hi"),
                         **figures})
    return rows


def write_profile_json(path: Path, rows: list[dict[str, Any]]) -> None:
    """Merge ``rows`` into ``profile.json``: a row replaces the one of the same model, batch and backend."""
    path = Path(path)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = []
    new_keys = {(r["name"], r["batch_size"], r["backend"]) for r in rows}
    kept = [r for r in old if isinstance(r, dict)
            and (r.get("name"), r.get("batch_size"), r.get("backend")) not in new_keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, kept + rows, sort_keys=False)


def measure_experiment(experiment: Any, overrides: Sequence[str], root: Path, *, force: bool = False,
                       throughput: bool = True,
                       built: Mapping[str, tuple[Target, dict[str, Any]]] | None = None) -> dict[str, dict[str, Any]]:
    """``model/*`` figures of every variant of an experiment, measured together (``fvlab fit``).

    All variants are built and measured side by side against the experiment's reference (or
    first) variant, even when only a few will train, so the table's figures share one moment.
    The figures are cached in ``root/measurements.json`` per architecture identity (and the
    reference's): adding seeds or variants that are already measured re-measures nothing;
    ``force`` measures again. ``built`` holds (target, identity) of variants already built with
    the same overrides (``fvlab fit``'s plan); the others are built here. Raises BadConfig when a
    variant cannot be built.
    """
    from fvlab.lit.build import build_run
    from fvlab.lit.fit import release_memory

    names = experiment.variant_names()
    reference = experiment.reference if experiment.reference in names else names[0]
    specs: dict[str, RunSpec | Target] = {}
    identities: dict[str, dict[str, Any]] = {}
    for name in names:
        if built and name in built:
            specs[name], identities[name] = built[name]
            continue
        spec = build_run(experiment.layers(name), None, [*overrides, {"trainer.logger": False}],
                         experiment=experiment.name, variant=name)
        specs[name], identities[name] = Target.of(spec), arch_identity(spec)
        del spec
    cache = MeasurementCache(Path(root) / MEASUREMENTS_FILE)
    known = {name: cache.get(identities[name], identities[reference]) for name in names}
    complete = all(figures is not None and (not throughput or figures.get(THROUGHPUT) is not None)
                   for figures in known.values())
    if force or not complete:
        # Variants that build the same architecture are one measurement (the reference's own first).
        distinct: dict[str, str] = {}
        for name in [reference, *names]:
            distinct.setdefault(cache.key(identities[name], identities[reference]), name)
        measured = measure_specs({name: specs[name] for name in distinct.values()}, reference=reference,
                                 throughput=throughput)
        for name, figures in measured.items():
            figures.pop("throughput", None)
            cache.put(identities[name], identities[reference], figures)
        cache.save()
        known = {name: cache.get(identities[name], identities[reference]) for name in names}
    del specs
    release_memory()
    return {name: {k: v for k, v in figures.items() if is_model_metric(k)}
            for name, figures in known.items()}
