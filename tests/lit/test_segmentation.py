"""Segmentation runs (fvlab.lit.segmentation, fvlab.models.segmenter, fvlab.data.dense) on real code paths:
`fvlab fit`, `fvlab profile`, `fvlab export`, a sweep, TensorBoard events read back."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import journal_study, run_sweep
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fvlab.cli import main
from fvlab.data import DataError, DensePointerDataModule
from fvlab.cli import _load_weights
from fvlab.export import check_onnx, export_onnx
from fvlab.lit import SemanticSegmenter
from fvlab.metrics import (GFLOPS, TEST_MIOU, TEST_PIXEL_ACC, VAL_IMAGES, VAL_MIOU, VAL_MIOU_BEST, VAL_PIXEL_ACC)
from fvlab.models import ArchConfig
from fvlab.models.segmenter import Segmenter, receptive_field
from fvlab.profile import count_flops

ROOT = Path(__file__).resolve().parents[2]
# 64 px, 16 px bands, 8 px digits: the dense task at its smallest.
DENSE = {"class_path": "fvlab.data.DensePointerDataModule",
         "init_args": {"image_size": 64, "band": 16, "digit_size": 8, "tiles": 1, "batch_size": 16}}
SEGMENTER = {"class_path": "fvlab.lit.SemanticSegmenter",
             "init_args": {"arch": {"name": "fastervit_micro", "hat": [False, False, True, True]},
                           "decoder": "mlp", "decoder_channels": 16, "lr": 1e-3}}
TRAINER = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1,
           "log_every_n_steps": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False}


def _experiment(path: Path) -> Path:
    config = {"name": "seg", "seed_everything": 0, "model": SEGMENTER, "data": DENSE, "trainer": TRAINER,
              "ablation": {"mlp": {}, "fpn": {"model.decoder": "fpn", "model.decoder_channels": 32}}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Both decoders fitted once by `fvlab fit`: (experiment file, runs directory)."""
    root = tmp_path_factory.mktemp("seg")
    experiment = _experiment(root / "seg.yaml")
    assert main(["fit", str(experiment), "--runs-dir", str(root / "runs")]) == 0
    return experiment, root / "runs"


@pytest.mark.xdist_group("segmentation")
def test_segmentation_fit_logs_miou_and_an_image_grid_for_both_decoders(fitted, capsys) -> None:
    experiment, runs = fitted
    for decoder in ("mlp", "fpn"):
        run = runs / "seg" / decoder
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["task"] == "segmentation"
        for key in (VAL_MIOU, VAL_MIOU_BEST, VAL_PIXEL_ACC, TEST_MIOU, TEST_PIXEL_ACC):
            assert 0.0 <= metrics[key] <= 1.0, key
        events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
        assert {VAL_MIOU, VAL_MIOU_BEST, VAL_PIXEL_ACC, TEST_MIOU} <= set(events.Tags()["scalars"])
        (grid,) = events.Images(VAL_IMAGES)  # one epoch: one grid of input, target and prediction rows
        assert grid.height > 3 * 64 and grid.width > 64
        # The saved config names the module, so the run re-runs as itself.
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["class_path"] == "fvlab.lit.segmentation.SemanticSegmenter"
        assert config["model"]["init_args"]["decoder"] == decoder
    summary = (runs / "seg" / "summary.md").read_text()
    assert f"| {VAL_MIOU_BEST} " in summary and f"difference of {VAL_MIOU_BEST}" in summary
    assert "val/acc1" not in summary
    capsys.readouterr()
    # Unchanged: skipped, not trained again.
    assert main(["fit", str(experiment), "--runs-dir", str(runs)]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 2


@pytest.mark.xdist_group("segmentation")
def test_report_of_segmentation_runs_ranks_by_miou(fitted, tmp_path: Path) -> None:
    _, runs = fitted
    assert main(["report", str(runs / "seg"), "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert f"| {VAL_MIOU_BEST} " in report and f"| {TEST_MIOU} " in report
    for decoder in ("mlp", "fpn"):  # each row shows its own run's best mIoU (one seed: no std)
        best = json.loads((runs / "seg" / decoder / "metrics.json").read_text())[VAL_MIOU_BEST]
        assert f"{best:.4f} ± n/a" in report
    assert (tmp_path / "accuracy_vs_throughput.png").is_file() and (tmp_path / "val_acc1_per_epoch.png").is_file()


@pytest.mark.xdist_group("segmentation")
def test_profile_of_a_segmenter_counts_its_decoder(fitted, tmp_path: Path, capsys) -> None:
    experiment, _ = fitted
    assert main(["profile", str(experiment), "--batch-sizes", "2", "--rounds", "2", "--runs-dir", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "seg" / "profile.json").read_text())}
    encoder = ArchConfig(name="fastervit_micro", hat=[False, False, True, True]).build(num_classes=0, in_chans=1)
    backbone = count_flops(encoder, 64, in_chans=1)
    assert rows["mlp"][GFLOPS] > backbone and rows["fpn"][GFLOPS] > rows["mlp"][GFLOPS]


@pytest.mark.xdist_group("segmentation")
def test_onnx_export_of_a_trained_segmenter_matches_pytorch(fitted, tmp_path: Path) -> None:
    _, runs = fitted
    # The checkpoint `fvlab fit` wrote, loaded as `fvlab export` loads it; exported at the run's
    # geometry (batch dynamic): the dynamic-size export is test_export.py's, and costs a minute here.
    model = SemanticSegmenter(arch={"name": "fastervit_micro", "hat": [False, False, True, True]},
                              decoder="fpn", decoder_channels=32, in_chans=1, image_size=64,
                              num_classes=DensePointerDataModule(**DENSE["init_args"]).num_classes)
    _load_weights(model.model, runs / "seg" / "fpn" / "checkpoints" / "best.ckpt", trust_checkpoint=False)
    out = export_onnx(model.model, tmp_path / "seg.onnx", image_size=(64, 64))
    rows = check_onnx(out, model.model, [(64, 64)], batch_sizes=[3])
    assert rows[0]["max_abs_diff"] <= 1e-4


def test_hat_swin_encoder_trains_a_step_with_a_real_trainer() -> None:
    data = DensePointerDataModule(**{**DENSE["init_args"], "in_chans": 3})
    arch = {"name": "hat_swin_tiny_patch4_window7_224", "embed_dim": 16, "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 1, 1], "window_size": 2, "hat": True, "ct_size": 1}
    model = SemanticSegmenter(arch=arch, decoder="fpn", decoder_channels=32, num_classes=data.num_classes,
                              in_chans=3, image_size=64)
    before = [p.detach().clone() for p in model.model.encoder.parameters()]
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.model.encoder.parameters()))


def test_sweep_with_miou_as_objective_runs_two_trials(tmp_path: Path) -> None:
    base = {"name": "seg_base", "seed_everything": 0, "model": SEGMENTER, "data": DENSE,
            "trainer": {**TRAINER, "max_epochs": 2}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    sweep = {"study": "seg", "experiment": "base.yaml", "space": {"model.arch.ct_size": {"choices": [1, 2]}},
             "objectives": {VAL_MIOU_BEST: "maximize"}, "sampler": {"name": "random", "seed": 0},
             "pruner": {"name": "rungs", "min_epochs": 1}, "n_trials": 2}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    assert run_sweep(tmp_path, path) == 0
    study = journal_study(tmp_path / "runs" / "seg" / "study.journal", "seg")
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 2
    for trial in trials:
        assert 0.0 <= trial.values[0] <= 1.0
        assert trial.user_attrs["val_miou_best"] == trial.values[0]
        assert trial.user_attrs["test_miou"] is not None


def test_carrier_tokens_reach_past_the_receptive_field_of_the_dense_task() -> None:
    """The argument of docs/dense.md, measured on experiments/dense_carrier.yaml's networks."""
    config = yaml.safe_load((ROOT / "experiments" / "dense_carrier.yaml").read_text())
    args, data = config["model"]["init_args"], config["data"]["init_args"]
    size, band = data["image_size"], DensePointerDataModule().hparams.band
    fields = {}
    for name, hat in (("no_carrier", False), ("carrier", args["arch"]["hat"])):
        encoder = ArchConfig(**{**args["arch"], "hat": hat}).build(num_classes=0, in_chans=1)
        network = Segmenter(encoder, 1 + data["classes"], decoder=args["decoder"],
                            decoder_channels=args["decoder_channels"])
        # A left-band tile pixel at its far corner, and a right-band one.
        fields[name] = receptive_field(network, size, [(size // 2, band - 1), (size // 2, size - band)])
    no_ct, ct = fields["no_carrier"], fields["carrier"]
    assert not no_ct[0][:, size - band:].any() and not no_ct[1][:, :band].any()  # the other band: unseen
    assert no_ct[0][:, :band].any() and no_ct[1][:, size - band:].any()
    assert ct[0][:, size - band:].all() and ct[1][:, :band].all()  # through carrier tokens: all of it


def test_dense_pointer_labels_follow_the_rule_and_bad_settings_are_refused() -> None:
    far = DensePointerDataModule(**DENSE["init_args"], rule="far")
    near = DensePointerDataModule(**DENSE["init_args"], rule="near")
    far.setup(), near.setup()
    for data in (far, near):
        images, masks = data.val_set.__getitems__(list(range(8)))
        assert images.shape == (8, 1, 64, 64) and masks.dtype == torch.int64
        for mask in masks:
            classes = mask.unique().tolist()
            assert classes[0] == 0 and len(classes) == 2  # background and the one digit's class
            columns = mask.nonzero()[:, 1]
            assert columns.max() < 16 or columns.min() >= 64 - 16  # the tiles stay in one band
    with pytest.raises(DataError, match="band must be"):
        DensePointerDataModule(image_size=64, band=40)
    with pytest.raises(DataError, match="rule must be one of far, near"):
        DensePointerDataModule(rule="middle")


def test_a_class_path_that_is_not_an_fvlab_module_is_refused_before_anything_is_written(tmp_path: Path,
                                                                                       capsys) -> None:
    config = {"name": "bad", "model": {"class_path": "collections.OrderedDict", "init_args": {}}, "data": DENSE}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "model.class_path 'collections.OrderedDict' is not an fvlab LightningModule" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_classifier_checkpoint_starts_the_encoder_and_layer_decay_groups_it(tmp_path: Path) -> None:
    from timm.optim import create_optimizer_v2

    from fvlab.models import create_model

    classifier = create_model("fastervit_micro", num_classes=10, in_chans=1)
    path = tmp_path / "classifier.pth"
    torch.save({"state_dict": classifier.state_dict()}, path)
    model = SemanticSegmenter(arch={"name": "fastervit_micro", "checkpoint_path": str(path)}, num_classes=3,
                              in_chans=1, image_size=64, layer_decay=0.5)
    assert torch.equal(model.model.encoder.patch_embed.conv_down[0].weight,
                       classifier.patch_embed.conv_down[0].weight)
    groups = create_optimizer_v2(model.model, opt="adamw", lr=1.0, layer_decay=0.5).param_groups
    scales = {g["lr_scale"] for g in groups}
    assert len(scales) > 2 and max(scales) == 1.0  # the encoder's depths, the decoder and head last
    head = {id(p) for p in model.model.segmentation_head.parameters()}
    assert all(g["lr_scale"] == 1.0 for g in groups if head & {id(p) for p in g["params"]})
