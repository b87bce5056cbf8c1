"""Model figures of built runs, measured side by side and cached per architecture identity.

``fvlab fit`` measures all of an experiment's variants together before training the first,
``fvlab profile`` always measures, and ``fvlab sweep`` measures each new architecture next to
its base architecture (DESIGN.md, "Throughput: measured side by side"). The protocol itself is
:func:`fvlab.profile.measure_side_by_side`; this module turns built runs into its inputs and
keeps the figures per architecture identity, so that adding seeds never re-measures and a
table never mixes figures of different identities.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from fvlab.lit.runner import RunSpec
from fvlab.profile import count_flops, count_params, measure_side_by_side

__all__ = ["device_kind", "arch_identity", "identity_key", "measure_specs", "MeasurementCache",
           "THROUGHPUT_METRICS"]

# The figures the side-by-side protocol gives; params and GFLOPs need no timing.
THROUGHPUT_METRICS = ("model/throughput", "model/throughput_lo", "model/throughput_hi",
                      "model/latency_ms", "model/speedup")


def device_kind(device: torch.device) -> str:
    """What throughput figures are comparable across: the processor model, not its index."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
        return f"cpu: {name}"
    return device.type


def arch_identity(spec: RunSpec, backend: str = "eager", batch_size: int | None = None) -> dict[str, Any]:
    """What a throughput figure depends on: architecture, input geometry, device, precision, threads, backend."""
    model = spec.config.get("model") or {}
    datamodule = spec.datamodule
    return {"arch": model.get("arch"), "image_size": getattr(datamodule, "image_size", None),
            "in_chans": getattr(datamodule, "in_chans", None),
            "num_classes": getattr(datamodule, "num_classes", None),
            "channels_last": model.get("channels_last"), "device": device_kind(spec.device),
            "precision": spec.precision,
            "threads": torch.get_num_threads() if spec.device.type == "cpu" else None,
            "backend": backend, "batch_size": batch_size}


def identity_key(identity: Mapping[str, Any]) -> str:
    """A short stable hash of an identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _geometry(spec: RunSpec) -> tuple[int, int | None]:
    datamodule = spec.datamodule
    return getattr(datamodule, "image_size", None) or 224, getattr(datamodule, "in_chans", None)


def measure_specs(specs: Mapping[str, RunSpec], *, reference: str | None = None, throughput: bool = True,
                  batch_size: int | None = None, rounds: int | None = None, round_s: float = 0.2,
                  backend: str = "eager") -> dict[str, dict[str, Any]]:
    """``model/*`` figures of each built run, the throughputs measured side by side in one process.

    A failed measurement is a warning and None (a measurement never fails a run). Runs on
    different devices or precisions are not comparable: they must not be passed together.
    """
    names = list(specs)
    reference = reference if reference in specs else names[0]
    devices = {str(spec.device) for spec in specs.values()}
    precisions = {spec.precision for spec in specs.values()}
    if len(devices) > 1 or len(precisions) > 1:
        raise ValueError(f"runs measured side by side must share device and precision, got "
                         f"{sorted(devices)} and {sorted(precisions)}")
    metrics: dict[str, dict[str, Any]] = {}
    for name, spec in specs.items():
        network = spec.model.model
        image_size, in_chans = _geometry(spec)
        figures: dict[str, Any] = {"model/params_m": count_params(network) / 1e6, "model/gflops": None,
                                   **dict.fromkeys(THROUGHPUT_METRICS)}
        try:
            with torch.random.fork_rng(devices=[]):
                figures["model/gflops"] = count_flops(network, image_size, in_chans=in_chans)
        except Exception as err:  # a measurement never fails a run
            warnings.warn(f"{name}: FLOP count failed, recorded as null: {type(err).__name__}: {err}",
                          stacklevel=2)
        metrics[name] = figures
    if not throughput:
        return metrics
    spec0 = specs[names[0]]
    cuda = [spec0.device.index or 0] if spec0.device.type == "cuda" else []
    try:
        # Measuring must leave every generator as it was: a run trains the same whether or not
        # its architecture was measured first.
        with torch.random.fork_rng(devices=cuda):
            results = measure_side_by_side(
                {name: spec.model.model for name, spec in specs.items()},
                {name: _geometry(spec)[0] for name, spec in specs.items()},
                in_chans={name: _geometry(spec)[1] for name, spec in specs.items()},
                reference=reference, batch_size=batch_size, device=spec0.device,
                precision=spec0.precision, rounds=rounds, round_s=round_s, backend=backend)
    except Exception as err:  # out of memory, an unsupported dtype on this device ...
        warnings.warn(f"throughput measurement failed, recorded as null: {type(err).__name__}: {err}",
                      stacklevel=2)
        return metrics
    finally:
        if spec0.device.type == "cuda":
            torch.cuda.empty_cache()
    for name, result in results.items():
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
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=2, sort_keys=True, default=str) + "\n")
        tmp.replace(self.path)
