"""The metric names, defined once: callbacks, runner, stats, sweep and report import them.

No heavy imports here, so the report and the sweep's file checks read the names without torch.
"""

from __future__ import annotations

__all__ = ["TRAIN_METRICS", "VAL_METRICS", "TEST_METRICS", "MODEL_METRICS", "MODEL_EXTRA_METRICS",
           "MOMENT_METRICS", "FINAL_METRICS", "PRIMARY_METRIC", "TEST_PRIMARY_METRIC", "SELECTION_METRICS"]

TRAIN_METRICS = ("train/loss", "train/loss_epoch", "train/lr")
# Measured at every validation: what selects (best checkpoint, early stop, pruning, objectives).
VAL_METRICS = ("val/acc1", "val/acc5", "val/acc1_best", "val/loss")
# Measured once per run, after training, on the best checkpoint: never used to select.
TEST_METRICS = ("test/acc1", "test/acc5", "test/loss")
# The architecture's figures, measured once per architecture before training.
MODEL_METRICS = ("model/params_m", "model/gflops", "model/throughput", "model/latency_ms")
# Architecture figures that depend on a reference or on the measurement protocol.
MODEL_EXTRA_METRICS = ("model/throughput_lo", "model/throughput_hi", "model/speedup", "model/params_built_m")
# A sweep trial's throughput on the study's one scale is its speedup times the reference's stored
# figure; what the trial's own moment read is kept under these names (comparable to nothing else).
MOMENT_METRICS = ("model/throughput_measured", "model/throughput_measured_lo", "model/throughput_measured_hi",
                  "model/latency_ms_measured")
# Every key metrics.json holds for a run (null when never reached).
FINAL_METRICS = (*VAL_METRICS, *TRAIN_METRICS, *TEST_METRICS, *MODEL_METRICS, *MODEL_EXTRA_METRICS)
# The accuracy that ranks variants and that deltas are taken on.
PRIMARY_METRIC = "val/acc1_best"
TEST_PRIMARY_METRIC = "test/acc1"
# What a sweep may optimise or prune on: everything but the test split (train/lr is a setting).
SELECTION_METRICS = (*VAL_METRICS, "train/loss", "train/loss_epoch", *MODEL_METRICS, "model/speedup")
