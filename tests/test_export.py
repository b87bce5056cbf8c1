"""`fvlab export`: ONNX with dynamic batch and image size, checked in ONNX Runtime.

The exporter is torch's dynamo-based one (``torch.onnx.export(dynamo=True)``, via onnxscript).
Models are tiny (32 px) so that the exports and their checks stay cheap.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fvlab.cli import main
from fvlab.export import check_onnx, ort_session, parity_sizes
from fvlab.models import create_model, load_checkpoint

from helpers import FAST_TRAINER, SYNTHETIC, write_experiment

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = {"name": "fastervit_tiny", "do_propagation": True}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(experiment file, runs dir) of a real `fvlab fit`: tiny with carrier tokens and without."""
    root = tmp_path_factory.mktemp("export")
    experiment = write_experiment(
        root / "exp.yaml", model={"arch": TINY, "lr": 1e-3}, seeds=[3],
        ablation={"ct": {}, "no_ct": {"model.arch.hat": False}},
        trainer={**FAST_TRAINER, "limit_val_batches": 1})
    assert main(["fit", str(experiment), "--runs-dir", str(root / "runs")]) == 0
    return experiment, root / "runs"


def _dynamic_dims(path: Path) -> list:
    import onnx

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _trained_model(runs: Path, variant: str) -> torch.nn.Module:
    model = create_model("fastervit_tiny", do_propagation=True, num_classes=4,
                         **({"hat": False} if variant == "no_ct" else {}))
    return load_checkpoint(model, runs / "exp" / variant / "seed_3" / "checkpoints" / "best.ckpt").eval()


@pytest.mark.xdist_group("trained")  # one worker computes the module fixture once
@pytest.mark.parametrize("variant", ["ct", "no_ct"])
def test_export_of_a_trained_variant_matches_pytorch_at_new_sizes(trained, variant: str, capsys) -> None:
    experiment, runs = trained
    assert main(["export", str(experiment), "--variant", variant, "--runs-dir", str(runs)]) == 0
    printed = capsys.readouterr().out
    out = runs / "exp" / variant / "seed_3" / "model.onnx"  # the first seed's run
    assert out.is_file() and str(out) in printed
    # Two batch sizes x three sizes: square, non-square, one padded to whole windows.
    assert printed.count("max |diff|") == 7
    assert "32x32" in printed and "32x48" in printed and "48x48" in printed
    dims = _dynamic_dims(out)
    assert isinstance(dims[0], str) and isinstance(dims[2], str) and isinstance(dims[3], str)
    assert dims[1] == 3
    # A batch and a size the check did not use, against the checkpoint's own weights.
    model = _trained_model(runs, variant)
    rows = check_onnx(out, model, [(40, 72)], batch_sizes=[5])
    assert rows[0]["max_abs_diff"] <= 1e-4


@pytest.mark.xdist_group("trained")  # one worker computes the module fixture once
def test_export_refuses_a_graph_that_differs_and_removes_it(trained, tmp_path: Path, capsys) -> None:
    experiment, runs = trained
    out = tmp_path / "strict.onnx"
    code = main(["export", str(experiment), "--variant", "no_ct", "--runs-dir", str(runs),
                 "--out", str(out), "--atol", "1e-12"])
    captured = capsys.readouterr()
    assert code == 1
    assert "refused" in captured.err and "max |diff|" in captured.out
    assert not out.exists()


def test_export_of_official_layout_weights(tmp_path: Path, capsys) -> None:
    official = pytest.importorskip("fastervit.models.faster_vit")
    torch.manual_seed(0)
    reference = official.faster_vit_0_224().eval()
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    out = tmp_path / "fvit0.onnx"
    # 112 px: one 7x7 window in stage 3; 128 px pads stage 3 to two windows per side.
    assert main(["export", "--arch", "fastervit_0", "--ckpt_path", str(path), "--image-size", "112",
                 "--out", str(out)]) == 0
    assert "112x128" in capsys.readouterr().out
    session = ort_session(out)
    # The official model runs at 224 only: the graph reproduces its logits there ...
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
    (got,) = session.run(["logits"], {"image": x.numpy()})
    assert (torch.from_numpy(got) - expected).abs().max().item() <= 1e-4
    # ... and ours, from the same file, at a batch and a size the check did not use.
    ours = create_model("fastervit_0", checkpoint_path=path).eval()
    assert check_onnx(out, ours, [(144, 112)], batch_sizes=[2])[0]["max_abs_diff"] <= 1e-4


def test_parity_sizes_include_non_square_and_padded() -> None:
    model = create_model("fastervit_0")
    sizes = parity_sizes(model, 224)
    assert sizes[0] == (224, 224) and sizes[1][0] != sizes[1][1]
    assert any(size[1] % 32 for size in sizes) or any(
        h % 7 for h, _ in model.feature_sizes(sizes[2])[2:])


@pytest.mark.parametrize("args, message", [
    (["--variant", "nope"], "unknown variant 'nope'"),
    (["--variant", "ct", "--seed", "9"], "--seed 9"),
    (["--variant", "ct", "--image-size", "4"], "--image-size 4"),
    (["--variant", "ct", "--ckpt_path", "missing.ckpt"], "checkpoint file not found"),
    ([], "name one with --variant"),
])
@pytest.mark.xdist_group("trained")  # one worker computes the module fixture once
def test_bad_input_exits_2_and_writes_nothing(trained, args, message, capsys) -> None:
    experiment, runs = trained
    before = sorted(p for p in runs.rglob("*"))
    assert main(["export", str(experiment), "--runs-dir", str(runs), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p for p in runs.rglob("*")) == before


def test_run_without_checkpoint_and_unknown_arch_exit_2(tmp_path: Path, capsys) -> None:
    experiment = write_experiment(tmp_path / "exp.yaml", data=SYNTHETIC)
    assert main(["export", str(experiment), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["export", "--arch", "fastervit_99", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "unknown arch" in capsys.readouterr().err
    assert main(["export", "--arch", "fastervit_0", "--image-size", "64",
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert "window_size" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [experiment]


def test_missing_onnx_packages_say_how_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now fails
    assert main(["export", "--arch", "fastervit_micro", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "onnxscript" in err and "pip install 'fvlab[export]'" in err
    assert not list(tmp_path.iterdir())
