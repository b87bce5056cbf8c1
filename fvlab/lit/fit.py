"""Fit and test one built run, leaving a run directory that says how it ended.

- ``fit_run`` writes the run directory, fits, and measures the best checkpoint once on the test
  split (``measure_test_split``); it always leaves a metrics.json (complete, failed or pruned).
- The network's ``model/*`` figures come in measured (``fvlab.lit.measure``, side by side) or
  are measured by the run's ``ModelProfileCallback`` just before the fit, on the same protocol.
"""

from __future__ import annotations

import gc
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch

from fvlab.lit.build import RunSpec
from fvlab.lit.callbacks import ModelProfileCallback, StoppingCallback
from fvlab.lit.tensorboard import RunLogger
from fvlab.metrics import CLASSIFICATION, MODEL_METRICS, TaskMetrics, is_model_metric, run_metrics
from fvlab.models.checkpoint import checkpoints_trusted
from fvlab.runs import METRICS_FILE, TEST_FILE, write_json

__all__ = ["fit_run", "measure_test_split", "write_test_json", "release_memory"]


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
    stopper = next((c for c in trainer.callbacks if isinstance(c, StoppingCallback) and c.stopped_status), None)
    if stopper is not None and result.get("status") == "complete":
        result.update(status=stopper.stopped_status, error=stopper.stopped_reason)


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
    # Before the clock starts and the trainer moves the model; a resumed run gets its figures back
    # from the checkpoint (and measures at fit start what is still missing).
    if writer and profile.missing() and ckpt_path is None:
        datamodule = spec.datamodule
        profile.measure(spec.model.model, getattr(datamodule, "image_size", None) or 224,
                        getattr(datamodule, "in_chans", None), spec.device, spec.precision)
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
