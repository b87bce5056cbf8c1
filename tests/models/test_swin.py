"""HAT in timm's Swin (``hat_swin_*``): timm's model when off, timm's weights when on, the one-window
rule, regular-window blocks only, FLOPs, ONNX export, and a real `fvlab fit`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
import yaml

import fvlab.models  # noqa: F401 - importing the models module registers them with timm
from fvlab.cli import main
from fvlab.models import create_model, load_swin_weights
from fvlab.models.hat import CarrierTokenAttention
from fvlab.models.swin import HatSwinStage
from fvlab.sweep.canonical import canonical_arch

NAME = "hat_swin_tiny_patch4_window7_224"
# 16 px, patch 4: stage 1 is a 4x4 map (four 2x2 windows), stage 2 a 2x2 map (one window).
TINY = dict(embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=2, img_size=16, num_classes=5)


def timm_swin(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", **TINY).eval()


def test_hat_off_is_timm_swin() -> None:
    ref = timm_swin()
    off = timm.create_model(NAME, **TINY).eval()
    assert list(off.state_dict()) == list(ref.state_dict())
    off.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (off(x) - ref(x)).abs().max().item() <= 1e-6


def test_timm_weights_load_into_hat_model_with_new_keys_reported(tmp_path: Path) -> None:
    ref = timm_swin()
    path = tmp_path / "swin.pth"
    torch.save(ref.state_dict(), path)
    with pytest.warns(UserWarning, match=r"HAT weights are new.*layers\.0\.global_tokenizer"):
        model = create_model(NAME, checkpoint_path=path, hat=True, ct_size=1, **TINY)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        new = load_swin_weights(model, path)
    assert new == model.hat_keys() and new and all(".global_tokenizer." in k or ".carriers." in k for k in new)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items())
    # timm's own route for pretrained weights from a file.
    with pytest.warns(UserWarning, match="HAT weights are new"):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), hat=True, **TINY)


def test_carrier_tokens_live_only_where_a_stage_spans_several_windows() -> None:
    torch.manual_seed(0)
    model = create_model(NAME, hat=True, ct_size=1, do_propagation=True, **TINY).eval()
    assert [model.carrier_tokens_live(i) for i in range(2)] == [True, False]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        # The one-window stage's HAT weights are built but unused: changing them changes nothing.
        for p in model.layers[1].carrier_parameters():
            p.add_(1.0)
        assert torch.equal(model(x), before)
        for p in model.layers[0].carrier_parameters():
            p.add_(1.0)
        assert (model(x) - before).abs().max().item() > 1e-3
    model.train()
    model(x).sum().backward()  # unused weights get zero gradients, not none (DDP)
    assert all(p.grad is not None and not p.grad.any() for p in model.layers[1].carrier_parameters())
    assert any(p.grad.any() for p in model.layers[0].carrier_parameters())


def test_carrier_tokens_join_regular_windows_only() -> None:
    model = create_model(NAME, hat=[True, False], ct_size=1, do_propagation=True, **TINY)
    stage = model.layers[0]
    assert isinstance(stage, HatSwinStage) and not isinstance(model.layers[1], HatSwinStage)
    assert all(isinstance(c, CarrierTokenAttention) for c in stage.carriers.values())
    shifted = [i for i, b in enumerate(stage.blocks) if any(b.target_shift_size)]
    assert shifted == [1] and list(stage.carriers) == ["0"]
    # The shifted block is timm's own, called as it is.
    calls = []
    stage.blocks[1].register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    model(torch.randn(1, 3, 16, 16))
    assert calls == [torch.Size([1, 4, 4, 16])]


def test_flops_with_hat_exceed_flops_without_by_the_carrier_attention() -> None:
    from fvlab.profile import flop_breakdown

    off = flop_breakdown(create_model(NAME, **TINY), 16, quiet_unsupported=True)
    on = flop_breakdown(create_model(NAME, hat=True, ct_size=2, **TINY), 16, quiet_unsupported=True)
    def attention(flops: dict) -> int:  # timm's attention traces as matmuls, the carrier path as SDPA
        return flops.get("scaled_dot_product_attention", 0) + flops.get("matmul", 0)

    assert attention(on) > attention(off)
    # Only the carrier tokens' work is added: no eval-mode position MLP is counted.
    assert 0 < on["linear"] - off["linear"] < off["linear"]
    assert sum(on.values()) > sum(off.values())


ARCH = {"name": NAME, "embed_dim": 16, "depths": [2, 2], "num_heads": [1, 2], "window_size": 2,
        "hat": True, "ct_size": 1, "do_propagation": True}  # stage 2 is one window: its HAT weights idle


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(experiment file, runs dir) of a real `fvlab fit` of a two-variant tiny ablation (HAT off, ct1)."""
    root = tmp_path_factory.mktemp("hat_swin")
    config = {"name": "swin", "seed_everything": 0, "model": {"arch": ARCH, "lr": 1e-3},
              "data": {"class_path": "fvlab.data.SyntheticDataModule",
                       "init_args": {"image_size": 16, "num_classes": 4, "in_chans": 3, "num_samples": 32,
                                     "val_samples": 16, "batch_size": 16}},
              "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                          "num_sanity_val_steps": 0},
              "ablation": {"no_hat": {"model.arch.hat": False}, "ct1": {}}, "reference": "no_hat"}
    experiment = root / "exp.yaml"
    experiment.write_text(yaml.safe_dump(config, sort_keys=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["fit", str(experiment), "--runs-dir", str(root / "runs")]) == 0
    return experiment, root / "runs"


@pytest.mark.xdist_group("hat_swin_trained")  # one worker computes the module fixture once
@pytest.mark.filterwarnings("ignore")
def test_onnx_export_parity(trained, capsys) -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from fvlab.export import check_onnx
    from fvlab.models import load_checkpoint

    experiment, runs = trained
    # The CLI path: the run's own model (classes from its data, img_size from its image size), best.ckpt.
    assert main(["export", str(experiment), "--variant", "ct1", "--runs-dir", str(runs)]) == 0
    printed = capsys.readouterr().out
    assert "batch 1  16x16" in printed and "batch 3  16x16" in printed
    assert "dynamic batch; 16x16 images only" in printed and "BatchNorm" not in printed
    out = runs / "swin" / "ct1" / "model.onnx"
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 16, 16]
    # The file against the trained weights loaded on their own, at a batch the check did not use.
    model = create_model(NAME, **{**{k: v for k, v in ARCH.items() if k != "name"}, "img_size": 16,
                                  "num_classes": 4})
    load_checkpoint(model, runs / "swin" / "ct1" / "checkpoints" / "best.ckpt")
    assert check_onnx(out, model.eval(), [(16, 16)], batch_sizes=[2])[0]["max_abs_diff"] <= 1e-4


@pytest.mark.xdist_group("hat_swin_trained")
@pytest.mark.filterwarnings("ignore")
def test_fit_of_a_two_variant_tiny_ablation(trained) -> None:
    experiment, runs = trained
    summary = (runs / "swin" / "summary.md").read_text()
    assert "| no_hat" in summary and "| ct1" in summary
    metrics = {v: json.loads((runs / "swin" / v / "metrics.json").read_text()) for v in ("no_hat", "ct1")}
    assert all(m["status"] == "complete" for m in metrics.values())
    assert metrics["ct1"]["model/params_m"] > metrics["no_hat"]["model/params_m"]
    assert metrics["ct1"]["model/gflops"] > metrics["no_hat"]["model/gflops"]


@pytest.mark.xdist_group("hat_swin_trained")
@pytest.mark.filterwarnings("ignore")
def test_profile_of_a_hat_swin_experiment_side_by_side(trained, tmp_path: Path, capsys) -> None:
    from fvlab.models import create_model as build

    experiment, _ = trained
    capsys.readouterr()
    assert main(["profile", str(experiment), "--json", "--batch-sizes", "2", "--runs-dir", str(tmp_path)]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"no_hat", "ct1"} and json.loads((tmp_path / "swin" / "profile.json").read_text())
    off, on = rows["no_hat"], rows["ct1"]
    assert off["model/speedup"] == 1.0 and on["model/speedup"] > 0 and on["model/throughput"] > 0
    # Params: the weights used at 16 px, i.e. stage 2's carrier weights (one window) left out.
    model = build(NAME, **{**{k: v for k, v in ARCH.items() if k != "name"}, "img_size": 16, "num_classes": 4})
    idle = sum(p.numel() for p in model.idle_parameters(16))
    assert idle > 0 and on["model/params_m"] == pytest.approx((sum(p.numel() for p in model.parameters())
                                                                - idle) / 1e6)
    # GFLOPs: fvcore counts the carrier-token attention (SDPA), absent without HAT.
    assert on["model/gflops"] > off["model/gflops"] > 0


def test_canonical_form_and_idle_weights_at_the_image_size() -> None:
    from fvlab.profile import count_params

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    # HAT on stage 2 only, a one-window stage at 16 px: ct_size and propagation change nothing there.
    c = create_model(NAME, hat=[False, True], ct_size=1, **TINY).eval()
    d = create_model(NAME, hat=[False, True], ct_size=2, do_propagation=True, **TINY).eval()
    off = create_model(NAME, hat=False, ct_size=2, **TINY).eval()
    assert canonical_arch(c, 16) == canonical_arch(d, 16) != canonical_arch(off, 16)  # off lacks HAT weights
    assert canonical_arch(c) != canonical_arch(d)
    d.load_state_dict(c.state_dict())
    with torch.no_grad():
        assert torch.equal(c(x), d(x))
    # timm's arguments as built: window 2 is (2, 2); HAT off ignores ct_size.
    assert canonical_arch(create_model(NAME, **{**TINY, "window_size": (2, 2)}), 16) == \
        canonical_arch(create_model(NAME, ct_size=1, **TINY), 16) == canonical_arch(off, 16)
    # HAT on stage 1 (four windows): ct_size counts.
    e = create_model(NAME, hat=True, ct_size=1, **TINY).eval()
    f = create_model(NAME, hat=True, ct_size=2, **TINY).eval()
    assert canonical_arch(e, 16) != canonical_arch(f, 16)
    f.load_state_dict(e.state_dict())
    with torch.no_grad():
        assert (e(x) - f(x)).abs().max().item() > 1e-6  # small: the weights are at their init
    # Idle weights: the one-window stage's, left out of params_m (built ones still counted apart).
    assert {id(p) for p in e.idle_parameters(16)} == {id(p) for p in e.layers[1].carrier_parameters()}
    assert count_params(e, 16) == count_params(e) - sum(p.numel() for p in e.layers[1].carrier_parameters())
    assert not create_model(NAME, hat=[True, False], **TINY).idle_parameters(16)
    assert e.feature_sizes(16) == e.feature_sizes() == [(4, 4), (2, 2)]
