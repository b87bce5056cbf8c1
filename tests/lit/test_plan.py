"""``fvlab.lit.plan``: what `fvlab fit` does with existing run directories (skip, resume, refuse,
--force, never delete what is not a run, seeded and unseeded runs never nest), where the runs go
(a run's own config.yaml), and the planned jobs: a variant that fails to build mid-loop, every
variant measured side by side once, new seeds trained alone."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest

from fvlab.cli import main

from helpers import FAST_TRAINER, run_fit, write_experiment

pytestmark = pytest.mark.filterwarnings("ignore")


def test_missing_experiment_file_exits_2(tmp_path: Path, capsys) -> None:
    assert run_fit(tmp_path, tmp_path / "nope.yaml") == 2
    assert "nope.yaml" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["fit", str(write_experiment(tmp_path / "exp.yaml")), "--runs-dir",
                 str(tmp_path / "afile")]) == 2
    assert "--runs-dir" in capsys.readouterr().err


# ---- reruns: skip only what is unchanged, never lose work ----------------------------------


def test_changed_config_refuses_to_reuse_or_replace_a_complete_run(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml")
    assert run_fit(tmp_path, experiment) == 0
    metrics_file = tmp_path / "runs" / "exp" / "default" / "metrics.json"
    before = metrics_file.read_text()
    assert json.loads(before)["config_hash"]
    capsys.readouterr()
    assert run_fit(tmp_path, experiment, "--trainer.max_epochs", "2") == 2
    err = capsys.readouterr().err
    assert "trainer.max_epochs" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert metrics_file.read_text() == before
    assert run_fit(tmp_path, experiment, "--trainer.max_epochs", "2", "--force") == 0
    assert json.loads(metrics_file.read_text())["epochs"] == 2


def test_resuming_a_complete_run_skips_it_or_refuses_a_changed_config(tmp_path: Path, capsys) -> None:
    # Before: a changed config resumed from the complete run's last.ckpt, Lightning's loop ended
    # at once, and metrics.json (all val/* null), config.yaml and the hash were overwritten.
    experiment = write_experiment(tmp_path / "exp.yaml")
    assert run_fit(tmp_path, experiment) == 0
    run = tmp_path / "runs" / "exp" / "default"
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_fit(tmp_path, experiment, "--ckpt_path", "last") == 0  # unchanged: skipped
    assert "default: complete, skipped" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    for change, key in ((["--model.lr", "0.01"], "model.lr"),
                        (["--trainer.max_epochs", "2"], "trainer.max_epochs")):
        assert run_fit(tmp_path, experiment, *change, "--ckpt_path", "last") == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert f"(changed: {key})" in err and "--force" in err and "--runs-dir" in err, err
        assert "continues the same config only" in err
        assert ("schedule keeps its old length" in err) == (key == "trainer.max_epochs"), err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_a_runs_config_yaml_reruns_that_run_in_place(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", ablation={"v1": {}, "v2": {"model.arch.ct_size": 0}})
    assert run_fit(tmp_path, experiment) == 0
    root = tmp_path / "runs" / "exp"
    own = root / "v2" / "config.yaml"
    assert "fvlab fit" in own.read_text().splitlines()[1]
    before = json.loads((root / "v2" / "metrics.json").read_text())
    capsys.readouterr()
    assert run_fit(tmp_path, own) == 0  # unchanged: skipped
    assert "v2: complete, skipped" in capsys.readouterr().out
    checkpoint = root / "v2" / "checkpoints" / "last.ckpt"
    v1_stamp = (root / "v1" / "metrics.json").stat().st_mtime_ns
    checkpoint.write_bytes(b"")  # the retrained run writes its own; a skipped one would keep this
    assert run_fit(tmp_path, own, "--force") == 0
    assert "fitting v2 ->" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["v1", "v2"]  # no "default"
    after = json.loads((root / "v2" / "metrics.json").read_text())
    assert after["val/loss"] == pytest.approx(before["val/loss"], abs=1e-6)  # same run, retrained
    assert checkpoint.stat().st_size > 0
    assert (root / "v1" / "metrics.json").stat().st_mtime_ns == v1_stamp  # only v2 was re-run
    summary = (root / "summary.md").read_text()
    assert "v1" in summary and "v2" in summary  # the other variant's row is kept


def test_a_runs_config_yaml_finds_its_own_runs_dir(tmp_path: Path, capsys, monkeypatch) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", seeds=[3])
    assert main(["fit", str(experiment), "--runs-dir", str(tmp_path / "elsewhere")]) == 0
    own = tmp_path / "elsewhere" / "exp" / "default" / "seed_3" / "config.yaml"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["fit", str(own)]) == 0  # no --runs-dir: the run's own, not ./runs
    assert "default/seed_3: complete, skipped" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_refuses_to_delete_a_directory_that_is_not_an_fvlab_run(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml")
    precious = tmp_path / "runs" / "exp" / "default" / "thesis.tex"
    precious.parent.mkdir(parents=True)
    precious.write_text("years of work")
    assert run_fit(tmp_path, experiment, "--force") == 2
    assert "not an fvlab run directory" in capsys.readouterr().err
    assert precious.read_text() == "years of work"


def test_ckpt_path_best_is_rejected_before_anything_is_written(tmp_path: Path, capsys) -> None:
    assert run_fit(tmp_path, write_experiment(tmp_path / "exp.yaml"), "--ckpt_path", "best") == 2
    assert "--ckpt_path last" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_seeded_and_unseeded_runs_of_a_variant_never_nest(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml")
    assert run_fit(tmp_path, experiment) == 0
    capsys.readouterr()
    assert run_fit(tmp_path, experiment, "--seeds", "0", "1") == 2
    assert "holds a run without seeds" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "exp" / "default" / "seed_0").exists()
    assert run_fit(tmp_path, experiment, "--seeds", "0", "--runs-dir", str(tmp_path / "seeded")) == 0
    assert main(["fit", str(experiment), "--runs-dir", str(tmp_path / "seeded"), "--force"]) == 2
    assert "holds runs with seeds" in capsys.readouterr().err
    assert (tmp_path / "seeded" / "exp" / "default" / "seed_0" / "metrics.json").is_file()


# ---- the planned jobs: one variant's failure, measured once, only new seeds -----------------


class RemoveFolderAtFitEnd(pl.Callback):
    """The data disappears after the first variant (an unmounted network share)."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        import shutil
        shutil.rmtree(self.folder)


def test_a_variant_that_fails_to_build_mid_loop_is_that_variants_failure(tmp_path: Path, capsys) -> None:
    from PIL import Image
    for split in ("train", "val"):
        for label, shade in (("dark", 30), ("light", 220)):
            folder = tmp_path / "tree" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (36, 36), color=(shade, shade - i, shade)).save(folder / f"{i}.png")
    callbacks = [{"class_path": "test_plan.RemoveFolderAtFitEnd", "init_args": {"folder": str(tmp_path / "tree")}}]
    experiment = write_experiment(
        tmp_path / "exp.yaml", trainer={**FAST_TRAINER, "callbacks": callbacks},
        data={"class_path": "fvlab.data.ImageFolderDataModule",
              "init_args": {"root": str(tmp_path / "tree"), "image_size": 32, "batch_size": 4,
                            "num_workers": 0}},
        ablation={"first": {}, "second": {"model.arch.ct_size": 0}})
    assert run_fit(tmp_path, experiment) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    first = json.loads((tmp_path / "runs" / "exp" / "first" / "metrics.json").read_text())
    second = json.loads((tmp_path / "runs" / "exp" / "second" / "metrics.json").read_text())
    assert first["status"] == "complete"
    assert second["status"] == "failed" and "tree" in second["error"]


def test_fit_measures_every_variant_side_by_side_once(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", reference="b",
                                  ablation={"a": {}, "b": {"model.arch.hat": False}})
    root = tmp_path / "runs" / "exp"
    assert run_fit(tmp_path, experiment, "--variant", "a") == 0
    cache = json.loads((root / "measurements.json").read_text())
    assert len(cache) == 2 and not (root / "b").exists()  # b measured beside a, though only a trained
    a = json.loads((root / "a" / "metrics.json").read_text())
    assert a["model/throughput_lo"] <= a["model/throughput"] <= a["model/throughput_hi"]
    assert a["model/speedup"] > 0 and a["model/latency_ms"] > 0
    assert run_fit(tmp_path, experiment, "--variant", "b") == 0
    b = json.loads((root / "b" / "metrics.json").read_text())
    assert b["model/speedup"] == 1.0  # the file's reference variant
    assert json.loads((root / "measurements.json").read_text()) == cache  # read back, not measured again
    out = capsys.readouterr().out
    assert "throughput (img/s) [95%]" in out and f"{a['model/throughput']:.0f} [" in out
    assert run_fit(tmp_path, experiment, "--force") == 0
    again = json.loads((root / "measurements.json").read_text())
    assert again.keys() == cache.keys() and again != cache  # --force measures again


def test_growing_seeds_trains_only_the_new_ones(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", seeds=[0, 1], ablation={"a": {}, "b": {}})
    assert run_fit(tmp_path, experiment) == 0
    root = tmp_path / "runs" / "exp"
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("*/seed_*/metrics.json")}
    assert len(stamps) == 4
    measured = (root / "measurements.json").read_text()
    capsys.readouterr()
    assert run_fit(tmp_path, experiment, "--seeds", "0", "1", "2") == 0
    out = capsys.readouterr().out
    assert out.count("fitting ") == 2 and "a/seed_2" in out and "b/seed_2" in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (root / "measurements.json").read_text() == measured  # new seeds never re-measure
    seeds = [json.loads((root / "a" / f"seed_{s}" / "metrics.json").read_text()) for s in (0, 2)]
    assert seeds[0]["model/throughput"] == seeds[1]["model/throughput"]
    assert len(list(root.glob("*/seed_*/metrics.json"))) == 6
