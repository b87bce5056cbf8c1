"""Metric names (fvlab.metrics): read without torch, and the user attributes a sweep trial records."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fvlab import metrics


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports the fvlab under test."""
    paths = [str(Path(__file__).parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_metric_names_and_the_run_layout_load_without_torch() -> None:
    done = _python("import fvlab.metrics, fvlab.runs, sys; assert 'torch' not in sys.modules, 'torch imported'")
    assert done.returncode == 0, done.stderr


def test_importing_the_models_module_registers_them_with_timm() -> None:
    # timm's convention for out-of-tree models: the module that defines them registers them on import;
    # `import fvlab` alone loads no torch, and its lazy names load (and register) on first use.
    done = _python("import fvlab, sys; assert 'torch' not in sys.modules, 'torch imported'\n"
                   "import timm\n"
                   "assert 'fastervit_micro' not in timm.list_models(), 'registered before fvlab.models'\n"
                   "import fvlab.models\n"
                   "assert {'fastervit_0', 'fastervit_micro', 'hat_swin_tiny_patch4_window7_224'} <= set(timm.list_models()), 'unregistered'\n"
                   "print(type(timm.create_model('fastervit_micro', pretrained=False)).__name__)\n"
                   "print(fvlab.create_model is fvlab.models.create_model, fvlab.ImageClassifier.__name__)\n"
                   "assert not any(type(f).__module__.startswith('fvlab') for f in sys.meta_path), 'import hook'")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["FasterViT", "True", "ImageClassifier"]


@pytest.mark.parametrize("metric, attr", [("val/acc1_best", "val_acc1_best"), ("test/acc1", "test_acc1"),
                                          ("model/throughput", "throughput"), ("model/gflops", "gflops"),
                                          ("model/throughput_measured_lo", "throughput_measured_lo")])
def test_trial_attributes_are_the_names_studies_hold(metric: str, attr: str) -> None:
    # Studies on disk hold these user attribute names: the report and a resumed sweep read them back.
    assert metrics.trial_attr(metric) == metrics.TRIAL_ATTRS[metric] == attr


def test_every_architecture_figure_maps_to_one_trial_attribute() -> None:
    figures = (*metrics.MODEL_METRICS, *metrics.MODEL_EXTRA_METRICS, *metrics.MOMENT_METRICS)
    assert set(metrics.MODEL_TRIAL_ATTRS) == set(figures) and all(map(metrics.is_model_metric, figures))
    assert len(set(metrics.TRIAL_ATTRS.values())) == len(metrics.TRIAL_ATTRS)
    assert metrics.PRIMARY_METRIC in metrics.SELECTION_METRICS and metrics.TEST_PRIMARY_METRIC not in \
        metrics.SELECTION_METRICS
