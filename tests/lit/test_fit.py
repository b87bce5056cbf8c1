"""``fvlab.lit.fit`` and whole `fvlab fit` runs: run directories, TensorBoard, failures, resume,
model figures measured before training, `fvlab validate`/`fvlab test` from a checkpoint, DDP, seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fvlab.cli import main
from fvlab.data import SyntheticDataModule
from fvlab.metrics import CLASSIFICATION, MODEL_METRICS

from helpers import FAST_TRAINER, MICRO, SYNTHETIC, run_fit, subprocess_env, write_experiment

TEST_METRICS = CLASSIFICATION.tests  # a classification run's test figures

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- fvlab fit -------------------------------------------------------------------------


def test_fit_writes_one_run_per_variant_with_tensorboard_hparams(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={
        "no_carrier": {"model.arch.hat": False}, "ct1": {"model.arch.ct_size": 1}})
    assert run_fit(tmp_path, experiment) == 0
    out = capsys.readouterr().out
    root = tmp_path / "runs" / "exp"
    assert "| no_carrier" in out and "| ct1" in out
    assert "[exp/ct1] epoch 1/1 train/loss_epoch=" in out  # one line per epoch off a terminal
    for variant in ("no_carrier", "ct1"):
        run = root / variant
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete" and metrics["epochs"] == 1
        assert metrics["image_size"] == 32 and metrics["device"] == "cpu"
        for name in ("val/acc1", "val/acc5", "val/acc1_best", "val/loss", *TEST_METRICS, *MODEL_METRICS):
            assert isinstance(metrics[name], float), name
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert (run / "checkpoints" / "best.ckpt").is_file()
        resolved = yaml.safe_load((run / "config.yaml").read_text())
        assert resolved["name"] == "exp"
        assert resolved["model"]["arch"]["name"] == "fastervit_micro"
        assert "num_classes" not in resolved["model"]  # linked from the data, not repeated
        events = EventAccumulator(str(run))
        events.Reload()
        scalars = set(events.Tags()["scalars"])
        assert {"val/acc1_best", "train/loss", "train/loss_epoch", "train/lr", *TEST_METRICS,
                *MODEL_METRICS} <= scalars
        assert "hp_metric" not in scalars
        # Measured once, after training, the figure metrics.json holds.
        assert [e.value for e in events.Scalars("test/acc1")] == [pytest.approx(metrics["test/acc1"])]
        content = events.PluginTagToContent("hparams")
        exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
        assert {m.name.tag for m in exp.experiment.metric_infos} == {"val/acc1_best", *TEST_METRICS,
                                                                        *MODEL_METRICS}
        assert len(list(run.glob("events.out.tfevents.*"))) == 1  # fit and test in one events file
        session = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"]).session_start_info
        assert session.hparams["arch.name"].string_value == "fastervit_micro"
        assert session.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    no_carrier = json.loads((root / "no_carrier" / "metrics.json").read_text())
    ct1 = json.loads((root / "ct1" / "metrics.json").read_text())
    # At 32 px the HAT stage is one window: ct1's carrier-token weights are built, never used.
    assert no_carrier["model/params_m"] == ct1["model/params_m"]
    assert no_carrier["model/params_built_m"] < ct1["model/params_built_m"]
    summary = (root / "summary.md").read_text()
    assert "no_carrier" in summary and "| test/acc1" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| ct1 "))
    assert row.split("|")[5].strip() == f"{ct1['test/acc1']:.4f} ± n/a"  # beside val/acc1_best and its Δ; one seed
    rows = (root / "summary.csv").read_text().splitlines()[1:]
    assert sum(row.startswith("run,") for row in rows) == 2  # one row per run, plus the means

    # A rerun skips complete variants; --force re-runs the named one only.
    before = (root / "ct1" / "metrics.json").stat().st_mtime_ns
    assert run_fit(tmp_path, experiment) == 0
    assert "complete, skipped" in capsys.readouterr().out
    assert (root / "ct1" / "metrics.json").stat().st_mtime_ns == before
    assert run_fit(tmp_path, experiment, "--variant", "ct1", "--force") == 0
    assert (root / "ct1" / "metrics.json").stat().st_mtime_ns != before
    assert len(list((root / "ct1").glob("events.out.tfevents.*"))) == 1  # a fresh run, not mixed


def test_single_run_without_ablation_is_named_default(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path / "one.yaml")
    assert run_fit(tmp_path, experiment, "--model.arch.ct_size", "0") == 0
    metrics = json.loads((tmp_path / "runs" / "exp" / "default" / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    resolved = yaml.safe_load((tmp_path / "runs" / "exp" / "default" / "config.yaml").read_text())
    assert resolved["model"]["arch"]["ct_size"] == 0
    # The resolved config re-runs as it is.
    rerun = tmp_path / "again"
    assert main(["fit", str(tmp_path / "runs" / "exp" / "default" / "config.yaml"),
                 "--runs-dir", str(rerun)]) == 0
    again = json.loads((rerun / "exp" / "default" / "metrics.json").read_text())
    assert again["val/acc1"] == pytest.approx(metrics["val/acc1"])


def test_fit_on_an_image_folder_in_grey_with_channels_last(tmp_path: Path, capsys) -> None:
    from PIL import Image
    for split, n in (("train", 8), ("val", 4)):
        for label, shade in (("dark", 40), ("light", 200)):
            folder = tmp_path / "tree" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (40, 36), color=shade + i).save(folder / f"{i}.png")
    experiment = write_experiment(
        tmp_path / "exp.yaml",
        model={"arch": dict(MICRO), "lr": 1e-3, "channels_last": True},
        data={"class_path": "fvlab.data.ImageFolderDataModule",
              "init_args": {"root": str(tmp_path / "tree"), "image_size": 32, "in_chans": 1,
                            "batch_size": 4, "num_workers": 0}})
    assert run_fit(tmp_path, experiment) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "runs" / "exp" / "default" / "metrics.json").read_text())
    assert metrics["status"] == "complete" and metrics["image_size"] == 32
    # No test/ folder: no test figures, and the table says why instead of showing the val figure.
    assert all(metrics[name] is None for name in TEST_METRICS) and "no test/ folder" in metrics["test_note"]
    row = next(line for line in out.splitlines() if line.startswith("| default"))
    assert row.split("|")[5].strip() == "-"
    assert "test/acc1 of default: no test split" in out
    assert main(["test", str(experiment), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "no test split" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "exp" / "default" / "test.json").exists()
    ckpt = torch.load(tmp_path / "runs" / "exp" / "default" / "checkpoints" / "last.ckpt",
                      weights_only=True)
    assert ckpt["state_dict"]["model.patch_embed.conv_down.0.weight"].shape[1] == 1  # grey input


def test_options_are_never_abbreviated(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml")
    assert run_fit(tmp_path, experiment) == 0
    before = (tmp_path / "runs" / "exp" / "default" / "metrics.json").read_text()
    capsys.readouterr()
    assert run_fit(tmp_path, experiment, "--f") == 2  # not --force
    assert "unknown option --f" in capsys.readouterr().err
    assert main(["fit", str(experiment), "--runs", str(tmp_path / "elsewhere")]) == 2
    assert not (tmp_path / "elsewhere").exists()
    assert (tmp_path / "runs" / "exp" / "default" / "metrics.json").read_text() == before


# ---- failures and resume --------------------------------------------------------------------


class NaNData(SyntheticDataModule):
    """Synthetic data whose training images turn NaN after the first batch."""

    def train_dataloader(self):
        for i, (x, y) in enumerate(super().train_dataloader()):
            yield (x * float("nan") if i > 0 else x), y


def test_nan_loss_fails_that_variant_only(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", trainer={**FAST_TRAINER, "limit_train_batches": 3},
                                  ablation={"bad": {"data.class_path": "test_fit.NaNData"},
                                            "good": {}})
    assert run_fit(tmp_path, experiment) == 1
    captured = capsys.readouterr()
    bad = json.loads((tmp_path / "runs" / "exp" / "bad" / "metrics.json").read_text())
    good = json.loads((tmp_path / "runs" / "exp" / "good" / "metrics.json").read_text())
    assert bad["status"] == "failed" and "NonFiniteLossError" in bad["error"]
    assert "lower model.lr" in bad["error"]
    assert good["status"] == "complete"
    table = (tmp_path / "runs" / "exp" / "summary.md").read_text()
    assert "failed" in table and "complete" in table
    assert "bad failed: NonFiniteLossError" in captured.err


class InterruptAtEpoch(pl.Callback):
    """Simulates Ctrl-C at the start of an epoch while FVLAB_TEST_INTERRUPT is set: the run's
    config is the same whether or not it is interrupted, so it can be resumed."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and os.environ.get("FVLAB_TEST_INTERRUPT"):
            raise KeyboardInterrupt


def test_resume_from_last_checkpoint_matches_uninterrupted_run(tmp_path: Path, capsys, monkeypatch) -> None:
    trainer = {"max_epochs": 3, "limit_train_batches": 3, "limit_val_batches": 2,
               "callbacks": [{"class_path": "test_fit.InterruptAtEpoch", "init_args": {"epoch": 1}}]}
    model = {"arch": dict(MICRO), "lr": 3e-3, "warmup_epochs": 1, "ema": True, "ema_decay": 0.9}
    digits = {"class_path": "fvlab.data.DigitsDataModule",
              "init_args": {"image_size": 32, "batch_size": 16}}
    plain = write_experiment(tmp_path / "plain.yaml", model=model, trainer=trainer, data=digits)
    assert main(["fit", str(plain), "--runs-dir", str(tmp_path / "a")]) == 0

    monkeypatch.setenv("FVLAB_TEST_INTERRUPT", "1")
    assert main(["fit", str(plain), "--runs-dir", str(tmp_path / "b")]) == 1
    monkeypatch.delenv("FVLAB_TEST_INTERRUPT")
    run = tmp_path / "b" / "exp" / "default"
    interrupted = json.loads((run / "metrics.json").read_text())
    assert interrupted["status"] == "failed" and "interrupted" in interrupted["error"]
    # Without --ckpt_path, the unfinished run is not thrown away.
    assert main(["fit", str(plain), "--runs-dir", str(tmp_path / "b")]) == 2
    assert "--ckpt_path last" in capsys.readouterr().err
    # A resume continues the same config only: another lr is refused before anything is written.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main(["fit", str(plain), "--runs-dir", str(tmp_path / "b"), "--ckpt_path", "last",
                 "--model.lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "model.lr" in err and "--force" in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == stamps
    assert main(["fit", str(plain), "--runs-dir", str(tmp_path / "b"), "--ckpt_path", "last"]) == 0

    uninterrupted = json.loads((tmp_path / "a" / "exp" / "default" / "metrics.json").read_text())
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["status"] == "complete" and resumed["epochs"] == uninterrupted["epochs"] == 3
    for name in ("val/acc1", "val/loss", "val/acc1_best", "train/loss_epoch", "test/acc1", "test/loss"):
        assert resumed[name] == pytest.approx(uninterrupted[name], abs=1e-5), name


# ---- measurements before training, never failing a run ----------------------------------


def test_model_metrics_are_measured_before_training(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", trainer={**FAST_TRAINER, "limit_train_batches": 3},
                                  data={**SYNTHETIC, "class_path": "test_fit.NaNData"})
    assert run_fit(tmp_path, experiment) == 1  # NaN in the second batch: training fails ...
    metrics = json.loads((tmp_path / "runs" / "exp" / "default" / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    for name in MODEL_METRICS:  # ... but the architecture was measured before the first step
        assert metrics[name] > 0, name


def test_a_failed_measurement_is_null_never_a_failed_run(tmp_path: Path, monkeypatch) -> None:
    import fvlab.profile

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    import fvlab.lit.measure

    monkeypatch.setattr(fvlab.profile, "measure_side_by_side", out_of_memory)  # a run measuring alone
    monkeypatch.setattr(fvlab.lit.measure, "measure_side_by_side", out_of_memory)  # fit's variants together
    experiment = write_experiment(tmp_path / "exp.yaml")
    with pytest.warns(UserWarning, match="throughput measurement failed"):
        assert run_fit(tmp_path, experiment) == 0
    metrics = json.loads((tmp_path / "runs" / "exp" / "default" / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert metrics["model/throughput"] is None and metrics["model/latency_ms"] is None
    assert metrics["model/params_m"] > 0 and metrics["model/gflops"] > 0


# ---- fvlab validate / fvlab test ----------------------------------------------------------


def test_validate_and_test_from_checkpoint(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml")
    assert run_fit(tmp_path, experiment) == 0
    capsys.readouterr()
    assert main(["validate", str(experiment), "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "val/acc1" in capsys.readouterr().out
    ckpt = tmp_path / "runs" / "exp" / "default" / "checkpoints" / "last.ckpt"
    run = tmp_path / "runs" / "exp" / "default"
    trained = (run / "metrics.json").read_text()
    assert main(["test", str(experiment), "--ckpt_path", str(ckpt),
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "test/acc1" in capsys.readouterr().out
    tested = json.loads((run / "test.json").read_text())
    assert tested["checkpoint"] == str(ckpt) and tested["split"] == "test"
    assert set(tested["metrics"]) == set(TEST_METRICS) and 0 <= tested["metrics"]["test/acc1"] <= 1
    assert (run / "metrics.json").read_text() == trained  # the figures of training stay as they were
    assert main(["report", str(tmp_path / "runs" / "exp")]) == 0
    line = f"fvlab test: default seed 0: test/acc1 {tested['metrics']['test/acc1']:.4g}"
    assert line in capsys.readouterr().out
    assert line in (tmp_path / "runs" / "exp" / "report" / "report.md").read_text()
    assert main(["validate", str(experiment), "--runs-dir", str(tmp_path / "none")]) == 2
    # LightningCLI parses the stage's config: a bad value is bad input, in one line, before any stage runs.
    capsys.readouterr()
    assert main(["test", str(experiment), "--runs-dir", str(tmp_path / "runs"), "--trainer.max_epochs", "two"]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_epochs" in err and len(err.strip().splitlines()) == 1 and "test/acc1" not in err


def test_a_stage_takes_the_weights_from_the_checkpoint_and_the_settings_from_the_config(tmp_path: Path) -> None:
    # LightningCLI would read the checkpoint's hyper_parameters over the parsed model section
    # (fvlab.adapters.ConfigOverCheckpointHparams turns that off): --model.* must hold, and a
    # checkpoint of another architecture must fail to load instead of rebuilding that network.
    from lightning.pytorch.cli import LightningCLI

    from fvlab.experiment import load_experiment
    from fvlab.lit.build import run_stage

    assert "_parse_ckpt_path" in vars(LightningCLI)  # the hook the adapter replaces
    experiment = write_experiment(tmp_path / "exp.yaml")
    assert run_fit(tmp_path, experiment) == 0
    layers = load_experiment(experiment).layers("default")
    ckpt = str(tmp_path / "runs" / "exp" / "default" / "checkpoints" / "best.ckpt")
    quiet = {"trainer.logger": False, "trainer.enable_progress_bar": False}
    smoothed = run_stage("validate", layers, ckpt, [quiet])
    plain = run_stage("validate", layers, ckpt, [quiet, {"model.label_smoothing": 0.0}])
    assert smoothed.model.hparams.label_smoothing == 0.1 and plain.model.hparams.label_smoothing == 0.0
    assert plain.measured["val/acc1"] == smoothed.measured["val/acc1"]  # the same weights
    with pytest.raises(RuntimeError, match="state_dict"):
        run_stage("validate", layers, ckpt, [quiet, {"model.arch.dim": 24}])


def test_validate_needs_a_variant_when_there_are_several(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={"a": {}, "b": {}})
    assert main(["validate", str(experiment), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "--variant" in capsys.readouterr().err


# ---- several processes: Lightning's rank, a failure ends the job on every rank ------------


def test_cpu_ddp_with_two_processes_and_ema(tmp_path: Path) -> None:
    # v2 trains with EMA: its copy used to sit inside the DDP-wrapped module with parameters
    # that required grad, and DDP stopped at once ("parameters that were not used").
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={
        "v1": {}, "v2": {"model.arch.ct_size": 0, "model.ema": True, "model.ema_decay": 0.5}})
    env = subprocess_env(__file__)
    done = subprocess.run(
        [sys.executable, "-m", "fvlab.cli", "fit", str(experiment), "--runs-dir", str(tmp_path / "runs"),
         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for variant in ("v1", "v2"):
        run = tmp_path / "runs" / "exp" / variant
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete"
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
    best = tmp_path / "runs" / "exp" / "v2" / "checkpoints" / "best.ckpt"
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    trained = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    averaged = {k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
    assert averaged.keys() == trained.keys()
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)  # two sets of weights
    from fvlab.models import create_model
    loaded = create_model("fastervit_micro", num_classes=4, ct_size=0, checkpoint_path=best).state_dict()
    assert all(torch.equal(loaded[k], averaged[k]) for k in loaded)  # the EMA weights
    assert done.stdout.count("| v1") == 1  # the table comes from rank 0 only


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_on_two_nodes_writes_from_global_rank_zero_only(tmp_path: Path) -> None:
    # torchrun sets RANK per process and LOCAL_RANK=0 on every node (no NODE_RANK): both
    # processes looked like rank 0 to the old guess, and both rewrote the run and the table.
    experiment = write_experiment(tmp_path / "exp.yaml")
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**subprocess_env(__file__), "RANK": str(rank), "LOCAL_RANK": "0",
               "GROUP_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TORCHELASTIC_RUN_ID": "fvlab-test"}
        env.pop("NODE_RANK", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fvlab.cli", "fit", str(experiment), "--runs-dir", str(tmp_path / "runs"),
             "--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1",
             "--trainer.accelerator", "cpu"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path))
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert outputs[0][0].count("| default") == 1 and "| default" not in outputs[1][0]
    run = tmp_path / "runs" / "exp" / "default"
    assert json.loads((run / "metrics.json").read_text())["status"] == "complete"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert not list(run.glob("*.tmp"))


class FailOnRank(pl.Callback):
    """An error (not a NaN) on one rank only: e.g. a corrupt image in that rank's shard."""

    def __init__(self, rank: int = 1):
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and batch_idx == 1:
            raise RuntimeError(f"corrupt sample on rank {self.rank}")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_failure_on_one_ddp_rank_ends_the_job_on_every_rank(tmp_path: Path, rank: int) -> None:
    callbacks = [{"class_path": "test_fit.FailOnRank", "init_args": {"rank": rank}}]
    experiment = write_experiment(tmp_path / "exp.yaml", trainer={**FAST_TRAINER, "limit_train_batches": 3,
                                                                   "callbacks": callbacks},
                                  ablation={"v1": {}, "v2": {}})
    env = subprocess_env(__file__)
    done = subprocess.run(
        [sys.executable, "-m", "fvlab.cli", "fit", str(experiment), "--runs-dir", str(tmp_path / "runs"),
         "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
        capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path)  # a hang times out
    assert done.returncode == 1, done.stderr[-3000:]
    assert "ends the job on every rank" in done.stderr
    v1 = tmp_path / "runs" / "exp" / "v1" / "metrics.json"
    if rank == 0:  # rank 0 records its own reason
        metrics = json.loads(v1.read_text())
        assert metrics["status"] == "failed" and "corrupt sample on rank 0" in metrics["error"]
    else:  # rank 0 records the broken collective (exit code 1: it ended on its own, not killed)
        metrics = json.loads(v1.read_text())
        assert metrics["status"] == "failed" and "(rank 0 of 2)" in metrics["error"], metrics["error"]
        assert "corrupt sample on rank 1" in done.stderr
    assert not (tmp_path / "runs" / "exp" / "v2" / "metrics.json").exists()  # the job ended


# ---- seeds ---------------------------------------------------------------------------------


def _initial_weights(config: dict, seed: int) -> torch.Tensor:
    from fvlab.lit.build import build_run
    spec = build_run(config, None, seed=seed)
    return torch.cat([p.detach().flatten() for p in spec.model.model.parameters()])


def test_seeds_give_different_runs_and_the_same_seed_the_same_run(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", seeds=[0, 1])
    from fvlab.experiment import load_experiment
    from fvlab.lit.build import variant_config
    config = variant_config(load_experiment(experiment))
    assert not torch.equal(_initial_weights(config, 0), _initial_weights(config, 1))
    assert torch.equal(_initial_weights(config, 1), _initial_weights(config, 1))

    assert run_fit(tmp_path, experiment) == 0
    root = tmp_path / "runs" / "exp" / "default"
    seed0 = json.loads((root / "seed_0" / "metrics.json").read_text())
    seed1 = json.loads((root / "seed_1" / "metrics.json").read_text())
    assert (seed0["seed"], seed1["seed"]) == (0, 1)
    assert seed0["train/loss_epoch"] != seed1["train/loss_epoch"]
    assert seed0["precision"] == seed1["precision"]
    for name in MODEL_METRICS:  # the architecture is measured once per variant, not per seed
        assert seed0[name] == seed1[name], name
    events = EventAccumulator(str(root / "seed_1"))
    events.Reload()
    session = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["seed"].number_value == 1

    assert main(["fit", str(experiment), "--seeds", "1", "--runs-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "exp" / "default" / "seed_1" / "metrics.json").read_text())
    for name in ("train/loss_epoch", "val/loss", "val/acc1"):
        assert again[name] == pytest.approx(seed1[name], abs=1e-6), name
