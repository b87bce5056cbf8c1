"""The metric names, defined once: the module, callbacks, runner, stats, sweep and report import them.

A name is what Lightning logs (TensorBoard tags), the key in metrics.json and, for the ones a
sweep trial records, the Optuna user attribute :func:`trial_attr` names. No heavy imports here
(and ``fvlab/__init__`` loads nothing eagerly), so the report and the sweep's file checks read
the names without torch.
"""

from __future__ import annotations

__all__ = ["TRAIN_LOSS", "TRAIN_LOSS_EPOCH", "TRAIN_LR", "TRAIN_LOSS_LARGEST", "TRAIN_LOSS_SMALLEST",
           "VAL_ACC1", "VAL_ACC5", "VAL_ACC1_BEST", "VAL_LOSS", "TEST_ACC1", "TEST_ACC5", "TEST_LOSS",
           "PARAMS_M", "PARAMS_BUILT_M", "GFLOPS", "THROUGHPUT", "THROUGHPUT_LO", "THROUGHPUT_HI", "LATENCY_MS",
           "LATENCY_MS_LO", "LATENCY_MS_HI", "SPEEDUP", "SPEEDUP_LO", "SPEEDUP_HI", "THROUGHPUT_MEASURED",
           "THROUGHPUT_MEASURED_LO", "THROUGHPUT_MEASURED_HI", "LATENCY_MS_MEASURED", "MODEL_PREFIX",
           "TRAIN_METRICS", "VAL_METRICS", "TEST_METRICS", "MODEL_METRICS", "MODEL_EXTRA_METRICS",
           "MOMENT_METRICS", "FINAL_METRICS", "PRIMARY_METRIC", "TEST_PRIMARY_METRIC", "SELECTION_METRICS",
           "SIZE_METRICS", "HELD_OUT", "held_out", "is_model_metric", "trial_attr", "TRIAL_ATTRS",
           "MODEL_TRIAL_ATTRS"]

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

TEST_ACC1 = "test/acc1"
TEST_ACC5 = "test/acc5"
TEST_LOSS = "test/loss"

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
VAL_METRICS = (VAL_ACC1, VAL_ACC5, VAL_ACC1_BEST, VAL_LOSS)
# Measured once per run, after training, on the best checkpoint: never used to select.
TEST_METRICS = (TEST_ACC1, TEST_ACC5, TEST_LOSS)
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
HELD_OUT = {VAL_ACC1_BEST: TEST_ACC1, VAL_ACC1: TEST_ACC1, VAL_ACC5: TEST_ACC5, VAL_LOSS: TEST_LOSS}


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
               **MODEL_TRIAL_ATTRS}
