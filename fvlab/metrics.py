"""The metric names, defined once: the modules, callbacks, run plan, stats, sweep and report import them.

A name is what Lightning logs (TensorBoard tags), the key in metrics.json and, for the ones a
sweep trial records, the Optuna user attribute :func:`trial_attr` names. No heavy imports here
(and ``fvlab/__init__`` loads nothing eagerly), so the report and the sweep's file checks read
the names without torch.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple

__all__ = ["TRAIN_LOSS", "TRAIN_LOSS_EPOCH", "TRAIN_LR", "TRAIN_LOSS_LARGEST", "TRAIN_LOSS_SMALLEST",
           "VAL_ACC1", "VAL_ACC5", "VAL_ACC1_BEST", "VAL_LOSS", "TEST_ACC1", "TEST_ACC5", "TEST_LOSS",
           "PARAMS_M", "PARAMS_BUILT_M", "GFLOPS", "THROUGHPUT", "THROUGHPUT_LO", "THROUGHPUT_HI", "LATENCY_MS",
           "LATENCY_MS_LO", "LATENCY_MS_HI", "SPEEDUP", "SPEEDUP_LO", "SPEEDUP_HI", "THROUGHPUT_MEASURED",
           "THROUGHPUT_MEASURED_LO", "THROUGHPUT_MEASURED_HI", "LATENCY_MS_MEASURED", "MODEL_PREFIX",
           "TRAIN_METRICS", "VAL_METRICS", "TEST_METRICS", "MODEL_METRICS", "MODEL_EXTRA_METRICS",
           "MOMENT_METRICS", "FINAL_METRICS", "PRIMARY_METRIC", "TEST_PRIMARY_METRIC", "SELECTION_METRICS",
           "SIZE_METRICS", "HELD_OUT", "held_out", "is_model_metric", "trial_attr", "TRIAL_ATTRS",
           "MODEL_TRIAL_ATTRS", "VAL_MIOU", "VAL_MIOU_BEST", "VAL_PIXEL_ACC", "TEST_MIOU", "TEST_PIXEL_ACC",
           "VAL_IMAGES", "run_metrics", "TaskMetrics", "CLASSIFICATION", "SEGMENTATION", "TASKS", "task_metrics"]

# Logged while training (train/loss per step, train/loss_epoch per epoch, the learning rate per step).
TRAIN_LOSS = "train/loss"
TRAIN_LOSS_EPOCH = "train/loss_epoch"
TRAIN_LR = "train/lr"
# A supernet's sandwich rule: the loss of the largest and of the smallest subnet of a step.
TRAIN_LOSS_LARGEST = "train/loss_largest"
TRAIN_LOSS_SMALLEST = "train/loss_smallest"

VAL_ACC1 = "val/acc1"
VAL_ACC5 = "val/acc5"
VAL_ACC1_BEST = "val/acc1_best"  # the best val/acc1 of the run so far
VAL_LOSS = "val/loss"

# Segmentation runs: mean intersection over union over classes, and pixel accuracy, in [0, 1].
VAL_MIOU = "val/miou"
VAL_MIOU_BEST = "val/miou_best"  # the best val/miou of the run so far
VAL_PIXEL_ACC = "val/pixel_acc"
# The TensorBoard image tag of a segmentation run's fixed grid: input, target, prediction.
VAL_IMAGES = "val/images"

TEST_ACC1 = "test/acc1"
TEST_ACC5 = "test/acc5"
TEST_LOSS = "test/loss"
TEST_MIOU = "test/miou"
TEST_PIXEL_ACC = "test/pixel_acc"

MODEL_PREFIX = "model/"
PARAMS_M = "model/params_m"  # parameters that take part at the data's image size, millions
PARAMS_BUILT_M = "model/params_built_m"  # every parameter of the built network, millions
GFLOPS = "model/gflops"
THROUGHPUT = "model/throughput"  # images/s
THROUGHPUT_LO = "model/throughput_lo"  # its 95% interval
THROUGHPUT_HI = "model/throughput_hi"
LATENCY_MS = "model/latency_ms"
LATENCY_MS_LO = "model/latency_ms_lo"
LATENCY_MS_HI = "model/latency_ms_hi"
SPEEDUP = "model/speedup"  # throughput over the reference's, measured side by side
SPEEDUP_LO = "model/speedup_lo"
SPEEDUP_HI = "model/speedup_hi"
# A sweep trial's throughput on the study's one scale is its speedup times the reference's stored
# figure; what the trial's own moment read is kept under these names (comparable to nothing else).
THROUGHPUT_MEASURED = "model/throughput_measured"
THROUGHPUT_MEASURED_LO = "model/throughput_measured_lo"
THROUGHPUT_MEASURED_HI = "model/throughput_measured_hi"
LATENCY_MS_MEASURED = "model/latency_ms_measured"

TRAIN_METRICS = (TRAIN_LOSS, TRAIN_LOSS_EPOCH, TRAIN_LR)
# Measured at every validation: what selects (best checkpoint, early stop, pruning, objectives).
VAL_METRICS = (VAL_ACC1, VAL_ACC5, VAL_ACC1_BEST, VAL_LOSS, VAL_MIOU, VAL_MIOU_BEST, VAL_PIXEL_ACC)
# Measured once per run, after training, on the best checkpoint: never used to select.
TEST_METRICS = (TEST_ACC1, TEST_ACC5, TEST_LOSS, TEST_MIOU, TEST_PIXEL_ACC)
# The architecture's figures, measured once per architecture before training.
MODEL_METRICS = (PARAMS_M, GFLOPS, THROUGHPUT, LATENCY_MS)
# Architecture figures that depend on a reference or on the measurement protocol.
MODEL_EXTRA_METRICS = (THROUGHPUT_LO, THROUGHPUT_HI, SPEEDUP, PARAMS_BUILT_M)
MOMENT_METRICS = (THROUGHPUT_MEASURED, THROUGHPUT_MEASURED_LO, THROUGHPUT_MEASURED_HI, LATENCY_MS_MEASURED)
# The size figures, counted without timing anything (a size constraint prunes before any timing).
SIZE_METRICS = (PARAMS_M, PARAMS_BUILT_M, GFLOPS)
# Every key metrics.json holds for a run (null when never reached).
FINAL_METRICS = (*VAL_METRICS, *TRAIN_METRICS, *TEST_METRICS, *MODEL_METRICS, *MODEL_EXTRA_METRICS)
# The accuracy that ranks variants and that deltas are taken on.
PRIMARY_METRIC = VAL_ACC1_BEST
TEST_PRIMARY_METRIC = TEST_ACC1
# What a sweep may optimise or prune on: everything but the test split (train/lr is a setting).
SELECTION_METRICS = (*VAL_METRICS, TRAIN_LOSS, TRAIN_LOSS_EPOCH, *MODEL_METRICS, SPEEDUP)

# Where a selection metric's figure is cited once the selection is made: its test-split counterpart.
HELD_OUT = {VAL_ACC1_BEST: TEST_ACC1, VAL_ACC1: TEST_ACC1, VAL_ACC5: TEST_ACC5, VAL_LOSS: TEST_LOSS,
            VAL_MIOU_BEST: TEST_MIOU, VAL_MIOU: TEST_MIOU, VAL_PIXEL_ACC: TEST_PIXEL_ACC}


class TaskMetrics(NamedTuple):
    """The metrics a kind of run is selected and compared by."""

    task: str
    primary: str  # ranks variants; Δ is taken on it (best over epochs)
    monitor: str  # picks the best checkpoint, epoch by epoch
    test: str  # the primary metric's held-out figure
    columns: tuple[str, ...]  # further per-seed columns of a table
    tests: tuple[str, ...]  # what the test split is measured by


CLASSIFICATION = TaskMetrics("classification", VAL_ACC1_BEST, VAL_ACC1, TEST_ACC1, (VAL_ACC1, VAL_LOSS),
                             (TEST_ACC1, TEST_ACC5, TEST_LOSS))
SEGMENTATION = TaskMetrics("segmentation", VAL_MIOU_BEST, VAL_MIOU, TEST_MIOU,
                           (VAL_MIOU, VAL_PIXEL_ACC, TEST_PIXEL_ACC, VAL_LOSS), (TEST_MIOU, TEST_PIXEL_ACC, TEST_LOSS))
TASKS = {t.task: t for t in (CLASSIFICATION, SEGMENTATION)}
# The metrics only one task measures; a run's metrics.json holds its own task's and the shared ones.
_TASK_ONLY = {CLASSIFICATION.task: (VAL_ACC1, VAL_ACC5, VAL_ACC1_BEST, TEST_ACC1, TEST_ACC5),
              SEGMENTATION.task: (VAL_MIOU, VAL_MIOU_BEST, VAL_PIXEL_ACC, TEST_MIOU, TEST_PIXEL_ACC)}


def run_metrics(task: TaskMetrics, names: Iterable[str] = ()) -> tuple[str, ...]:
    """``names`` (default every final metric) without the metrics that only another task measures."""
    other = {m for name, only in _TASK_ONLY.items() if name != task.task for m in only}
    return tuple(m for m in (names or FINAL_METRICS) if m not in other)


def task_metrics(records: Iterable[Mapping[str, Any]] = ()) -> TaskMetrics:
    """The task of metrics.json records (their ``task`` key): segmentation when any says so, else classification."""
    tasks = {str(r.get("task")) for r in records if isinstance(r, Mapping) and r.get("task")}
    return SEGMENTATION if SEGMENTATION.task in tasks else CLASSIFICATION


def held_out(metric: str) -> str | None:
    """The test-split metric that stands for ``metric`` in a table of selected runs, or None."""
    return HELD_OUT.get(metric)


def is_model_metric(name: str) -> bool:
    """Whether ``name`` is an architecture figure (``model/*``), known before any training."""
    return name.startswith(MODEL_PREFIX)


def trial_attr(metric: str) -> str:
    """The Optuna user attribute a sweep trial records ``metric`` under: a model figure without its
    ``model/`` prefix (``throughput``), any other with ``_`` for ``/`` (``val_acc1_best``)."""
    return metric.removeprefix(MODEL_PREFIX) if is_model_metric(metric) else metric.replace("/", "_")


# The architecture figures a trial records (metric -> user attribute).
MODEL_TRIAL_ATTRS = {metric: trial_attr(metric)
                     for metric in (*MODEL_METRICS, *MODEL_EXTRA_METRICS, *MOMENT_METRICS)}
# Every metric a trial records: its architecture figures, the accuracy it is ranked by and,
# shown but never an objective, the test accuracy of its best checkpoint.
TRIAL_ATTRS = {PRIMARY_METRIC: trial_attr(PRIMARY_METRIC), TEST_PRIMARY_METRIC: trial_attr(TEST_PRIMARY_METRIC),
               VAL_MIOU_BEST: trial_attr(VAL_MIOU_BEST), TEST_MIOU: trial_attr(TEST_MIOU), **MODEL_TRIAL_ATTRS}
