"""Parameters, FLOPs, throughput, `fvlab profile` and the profile callback."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.data import DataLoader, TensorDataset

from fvlab.cli import main
from fvlab.lit import MODEL_METRICS, ModelProfileCallback
from fvlab.models import FasterViT, create_model
from fvlab.metrics import GFLOPS, LATENCY_MS, PARAMS_M, SPEEDUP, THROUGHPUT, THROUGHPUT_HI, THROUGHPUT_LO
from fvlab.profile import count_flops, count_params, flop_breakdown, model_metrics


def conv_flops(out_hw: int, c_out: int, c_in: int, k: int = 3, groups: int = 1) -> int:
    return out_hw * out_hw * c_out * (c_in // groups) * k * k


def test_flops_match_a_hand_computation() -> None:
    # 64 px: stage maps 16, 8, 4, 2. Stage 3: four 2x2 windows, one carrier token each.
    dim, heads, classes = 8, [1, 1, 2, 2], 10
    model = FasterViT(dim=dim, in_dim=4, depths=[1, 1, 1, 1], num_heads=heads, window_size=2,
                      ct_size=[0, 0, 1, 0], hat=[False, False, True, False], num_classes=classes)
    got = flop_breakdown(model, 64)

    conv = (conv_flops(32, 4, 3) + conv_flops(16, 8, 4)            # stem
            + 2 * conv_flops(16, 8, 8) + conv_flops(8, 16, 8)      # stage 1 + downsample
            + 2 * conv_flops(8, 16, 16) + conv_flops(4, 32, 16)    # stage 2 + downsample
            + conv_flops(4, 32, 32, groups=32)                     # carrier-token init (dw conv)
            + conv_flops(2, 64, 32))                               # downsample after stage 3
    assert got["conv"] == conv

    def block_linear(tokens: int, c: int) -> int:  # qkv, proj, fc1, fc2 (mlp_ratio 4)
        return tokens * (c * 3 * c + c * c + 2 * c * 4 * c)
    windows, window_tokens, carriers = 4, 4, 1
    linear = (block_linear(windows * (window_tokens + carriers), 32)  # window attention + MLP
              + block_linear(windows * carriers, 32)                 # global carrier attention + MLP
              + block_linear(4, 64)                                  # stage 4: one window
              + 64 * classes)                                        # head
    assert got["linear"] == linear

    def attention(batch: int, h: int, n: int, head_dim: int) -> int:  # q @ k^T and attn @ v
        return 2 * batch * h * n * n * head_dim
    sdpa = (attention(windows, 2, window_tokens + carriers, 16)  # each window + its carrier token
            + attention(1, 2, windows * carriers, 16)              # carrier tokens, globally
            + attention(1, 2, 4, 32))                              # stage 4
    assert got["scaled_dot_product_attention"] == sdpa


def test_sdpa_handle_counts_like_explicit_matmul_attention() -> None:
    class Explicit(torch.nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    class Fused(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    from fvlab.profile import _EXTRA_HANDLES, _fvcore
    q, k, v = torch.randn(3, 4, 50, 16), torch.randn(3, 4, 60, 16), torch.randn(3, 4, 60, 24)
    counts = []
    for module in (Explicit(), Fused()):
        analysis = _fvcore().FlopCountAnalysis(module, (q, k, v))
        for op, handle in _EXTRA_HANDLES.items():
            analysis.set_op_handle(op, handle)
        analysis.unsupported_ops_warnings(False)
        counts.append(analysis.total())
    assert counts[0] == counts[1] == 3 * 4 * 50 * 60 * (16 + 24)


def test_fastervit_0_flops_and_params_without_warnings() -> None:
    model = create_model("fastervit_0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gflops = count_flops(model, 224)
    # fvcore on the official implementation in deploy mode counts 3.373 G.
    assert abs(gflops / 3.373 - 1) < 0.005
    assert round(count_params(model) / 1e6, 2) == 31.40


def test_flops_of_other_models_sum_up_unsupported_ops_in_one_warning() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(2), torch.nn.Hardswish())
    with pytest.warns(UserWarning, match=r"aten::max_pool2d x1") as record:
        count_flops(model, 32)
    assert len(record) == 1


def test_one_network_is_timed_on_the_side_by_side_protocol_with_its_interval() -> None:
    model = create_model("fastervit_micro", num_classes=3)
    seen: list[int] = []
    model.register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    metrics = model_metrics(model, 32, batch_size=6, repeats=3)
    assert set(seen) == {6, 1}  # FLOPs and latency at batch 1, throughput at 6 (the hook came along to the copies)
    for name in (THROUGHPUT, LATENCY_MS, THROUGHPUT_LO, THROUGHPUT_HI):
        assert math.isfinite(metrics[name]) and metrics[name] > 0, name
    assert metrics[THROUGHPUT_LO] <= metrics[THROUGHPUT] <= metrics[THROUGHPUT_HI]
    assert SPEEDUP not in metrics and metrics[PARAMS_M] > 0 and metrics[GFLOPS] > 0
    assert model.training  # the caller's model is untouched (measured on a copy)


# 64 px: stage 3's 4x4 map holds four 2x2 windows, so ct1 has carrier tokens (at 32 px its 2x2
# map is one window, where carrier tokens are unused and ct1 computes what no_carrier does).
EXPERIMENT = """
name: tiny_profile
model:
  arch: {name: fastervit_micro, ct_size: 1}
data:
  class_path: fvlab.data.SyntheticDataModule
  init_args: {image_size: 64, num_classes: 5, in_chans: 3}
ablation:
  no_carrier: {model.arch.hat: false}
  ct1: {model.arch.ct_size: 1}
  wide: {model.arch.dim: 24}
"""


def test_profile_json_has_one_entry_per_variant_and_batch_size(tmp_path: Path, capsys) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT)
    assert main(["profile", str(path), "--json", "--batch-sizes", "1", "4", "--rounds", "3",
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["batch_size"]) for r in rows] == [
        ("no_carrier", 1), ("ct1", 1), ("wide", 1), ("no_carrier", 4), ("ct1", 4), ("wide", 4)]
    for row in rows:
        assert row["image_size"] == 64 and row["backend"] == "eager" and row["rounds"] == 3
        for name in MODEL_METRICS:
            assert row[name] > 0
        assert row["model/throughput_lo"] <= row["model/throughput"] <= row["model/throughput_hi"]
        assert row["reference"] == "no_carrier"  # the experiment's first variant: speedups against it
    by_name = {r["name"]: r for r in rows if r["batch_size"] == 4}
    assert by_name["no_carrier"]["model/speedup"] == 1.0
    assert by_name["wide"]["model/params_m"] > by_name["ct1"]["model/params_m"]
    assert by_name["no_carrier"]["model/gflops"] < by_name["ct1"]["model/gflops"]
    # profile.json: the same rows, merged by (variant, batch size, backend) on a rerun.
    written = json.loads((tmp_path / "runs" / "tiny_profile" / "profile.json").read_text())
    assert [(r["name"], r["batch_size"]) for r in written] == [(r["name"], r["batch_size"]) for r in rows]
    assert main(["profile", str(path), "--json", "--batch-sizes", "4", "--rounds", "2",
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    written = json.loads((tmp_path / "runs" / "tiny_profile" / "profile.json").read_text())
    assert sorted((r["name"], r["batch_size"], r["rounds"]) for r in written) == sorted(
        [(n, 1, 3) for n in ("no_carrier", "ct1", "wide")] + [(n, 4, 2) for n in ("no_carrier", "ct1", "wide")])


def test_profile_table_for_an_arch(capsys) -> None:
    assert main(["profile", "--arch", "fastervit_micro", "--image-size", "32",
                 "--no-throughput"]) == 0
    out = capsys.readouterr().out
    assert "fastervit_micro" in out and "GFLOPs" in out


@pytest.mark.parametrize("argv, message", [
    (["profile", "--arch", "fastervit_99"], "known: fastervit_0"),
    (["profile", "missing.yaml"], "missing.yaml"),
    (["profile", "--arch", "fastervit_0", "--image-size", "0"], "--image-size"),
    (["profile"], "experiment file or --arch"),
    (["profile", "--arch", "fastervit_0", "--batch-sizes", "8", "0"], "batch sizes must be >= 1"),
    (["profile", "--arch", "fastervit_0", "--backend", "tensorrt"], "invalid choice: 'tensorrt'"),
])
def test_profile_bad_input_exits_2(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("body, message", [
    ("model: [1, 2", "not valid YAML"),
    ("model:\n  arch: {name: fastervit_micro, foo: 3}\n", "'arch.foo'"),
    ("model:\n  arch: {name: fastervit_micro, ct_size: 4, window_size: 2}\n", "ct_size[2]"),
    ("model:\n  arch: {name: fastervit_micro}\nablation:\n  v1: 3\n", "v1"),
])
def test_profile_bad_experiment_exits_2(tmp_path: Path, body: str, message: str, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    assert main(["profile", str(path), "--no-throughput"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_console_script_exit_code() -> None:
    done = subprocess.run([sys.executable, "-m", "fvlab.cli", "profile", "--arch", "nope"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown arch 'nope'" in done.stderr and "Traceback" not in done.stderr


class TinyClassifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-3, arch: str = "fastervit_micro"):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(arch, num_classes=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.model(x).argmax(1) == y).float().mean()
        self.log("val/acc1_best", acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_profile_callback_logs_to_tensorboard_and_hparams(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,)))
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    callback = ModelProfileCallback(image_size=32, batch_size=4, repeats=2)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=logger,
                         callbacks=[callback], enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    module = TinyClassifier()
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))

    assert callback.metrics["model/gflops"] == pytest.approx(count_flops(module.model, 32))
    assert callback.metrics["model/params_m"] == pytest.approx(count_params(module.model, 32) / 1e6)
    assert callback.metrics["model/params_built_m"] == pytest.approx(count_params(module.model) / 1e6)
    for name in MODEL_METRICS:
        assert float(trainer.callback_metrics[name]) > 0

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = events.Tags()["scalars"]
    for name in MODEL_METRICS:
        assert name in scalars
        assert events.Scalars(name)[-1].value == pytest.approx(callback.metrics[name], rel=1e-5)
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    assert metrics == {"val/acc1_best", "test/acc1", "test/acc5", "test/loss", *MODEL_METRICS}
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["lr"].number_value == pytest.approx(1e-3)
    assert session.session_start_info.hparams["arch"].string_value == "fastervit_micro"
    assert "hp_metric" not in scalars


def test_measuring_a_model_leaves_the_global_rng_alone() -> None:
    # A run trains the same whether or not its architecture was measured first (the seeds of a
    # variant share one measurement); fusing the copy used to draw from the global RNG.
    model = create_model("fastervit_micro", num_classes=4)
    torch.manual_seed(0)
    before = torch.get_rng_state().clone()
    metrics = model_metrics(model, 32, repeats=2)
    assert metrics["model/throughput"] > 0
    assert torch.equal(torch.get_rng_state(), before)
    fused = create_model("fastervit_micro", num_classes=4).eval()
    state = torch.get_rng_state().clone()
    fused.fuse()
    assert torch.equal(torch.get_rng_state(), state)


# ---- side by side ---------------------------------------------------------------------


def test_median_interval_uses_binomial_order_statistics() -> None:
    from fvlab.profile import median_interval

    # n = 15: P(Binom(15, 1/2) <= 3) = 576/32768, twice that 0.035 <= 0.05, while k = 5 gives
    # 0.118: the 95% interval is [x_(4), x_(12)].
    assert median_interval([float(v) for v in range(15, 0, -1)]) == (8.0, 4.0, 12.0)
    # Too few values for a 95% interval from order statistics: the range.
    assert median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)


class Sleeper(torch.nn.Module):
    """A model whose forward takes ``ms`` milliseconds of sleep: its speed does not depend on the load
    of a shared machine, so ratios between two of them are known in advance."""

    def __init__(self, ms: float):
        super().__init__()
        self.ms = ms
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.ms / 1000)
        return x.flatten(1)[:, :3] + self.weight


def test_side_by_side_rotates_the_order_and_measures_ratios_per_round() -> None:
    from fvlab.profile import measure_side_by_side

    models = {"base": Sleeper(3.0), "twice": Sleeper(6.0)}
    state = torch.random.get_rng_state()
    results = measure_side_by_side(models, 32, batch_size=4, rounds=5, round_s=0.03, warmup=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # measuring never moves the global RNG
    assert models["base"].training  # measured on prepared copies: the callers' models are untouched
    base, twice = results["base"], results["twice"]
    assert base.speedup == 1.0 and twice.reference == "base" and twice.rounds == 5
    assert 0.35 < twice.speedup < 0.65, twice
    assert twice.speedup_lo <= twice.speedup <= twice.speedup_hi
    assert 3.0 < base.latency_ms < 6.0 < twice.latency_ms < 12.0
    for r in results.values():
        assert r.images_per_s_lo <= r.images_per_s <= r.images_per_s_hi
        assert r.latency_ms_lo <= r.latency_ms <= r.latency_ms_hi
        assert r.threads == torch.get_num_threads() and r.backend == "eager"
        assert set(r.metrics()) == {"model/throughput", "model/throughput_lo", "model/throughput_hi",
                                    "model/latency_ms", "model/speedup"}
    assert base.images_per_s > twice.images_per_s


_FAKE_NOW = [0.0]  # the clock fvlab.profile reads in the test below (module level: copies share it)


class Ticker(torch.nn.Module):
    """A model whose forward takes exactly ``ms`` milliseconds of the fake clock (no real time)."""

    def __init__(self, ms: float):
        super().__init__()
        self.ms = ms
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _FAKE_NOW[0] += self.ms / 1000
        return x.flatten(1)[:, :2] + self.weight


def test_a_round_lasts_round_s_shared_by_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rounds must be short next to the bursts of a shared machine (0.2-1.5 s), or a burst slows
    # one side of a ratio only: round_s is a whole round, each model's slot an equal share of it.
    # A fake clock makes the counts exact whatever the machine's load.
    import types

    import fvlab.profile as profile

    calls: list[str] = []
    models = {"base": Ticker(3.0), "twice": Ticker(6.0)}
    real = profile._prepare_for_inference

    def counted(model: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        prepared = real(model, *args, **kwargs)
        name = next(n for n, m in models.items() if m is model)
        prepared.register_forward_hook(lambda m, a, o: calls.append(name))
        return prepared

    monkeypatch.setattr(profile, "_prepare_for_inference", counted)
    monkeypatch.setattr(profile, "time", types.SimpleNamespace(perf_counter=lambda: _FAKE_NOW[0]))
    results = profile.measure_side_by_side(models, 32, batch_size=4, rounds=2, round_s=0.06, warmup=0,
                                           latency=False)
    timed = calls[4:]  # after each model's warm-up call and its calibration call
    # Slots of 0.03 s: ten calls of 3 ms and five of 6 ms per round (twice that if a slot were round_s).
    assert (timed.count("base"), timed.count("twice")) == (2 * 10, 2 * 5), timed
    assert results["twice"].speedup == pytest.approx(0.5)


def test_side_by_side_interleaves_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    import fvlab.profile as profile

    calls: list[str] = []
    models = {name: create_model("fastervit_micro", num_classes=3) for name in "abc"}
    real = profile._prepare_for_inference

    def tagged(model: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        prepared = real(model, *args, **kwargs)
        name = next(n for n, m in models.items() if m is model)
        prepared.register_forward_hook(lambda m, a, o: calls.append(name) if a[0].shape[0] == 2 else None)
        return prepared

    monkeypatch.setattr(profile, "_prepare_for_inference", tagged)
    profile.measure_side_by_side(models, 32, batch_size=2, rounds=3, round_s=1e-9, warmup=0,
                                 latency=False)
    timed = calls[6:]  # after each model's warm-up call and its calibration call
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_profile_backends_onnxruntime_and_compile(tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT.replace("  wide: {model.arch.dim: 24}\n", ""))
    runs = str(tmp_path / "runs")
    # One batch size: the compiled graph and the exported one are built for one shape each.
    assert main(["profile", str(path), "--json", "--batch-sizes", "2", "--rounds", "2", "--runs-dir", runs,
                 "--backend", "onnxruntime"]) == 0
    ort_rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["backend"], r["precision"]) for r in ort_rows] == [
        ("no_carrier", "onnxruntime", "fp32"), ("ct1", "onnxruntime", "fp32")]
    assert all(r["model/throughput"] > 0 and r["model/latency_ms"] > 0 for r in ort_rows)
    assert main(["profile", "--arch", "fastervit_micro", "--image-size", "32", "--json", "--batch-sizes", "1",
                 "--rounds", "2", "--backend", "compile"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["backend"] == "compile" and row["compile_s"] > 0 and row["model/throughput"] > 0
    # profile.json keeps one row per variant, batch size and backend: the table never mixes them.
    written = json.loads((tmp_path / "runs" / "tiny_profile" / "profile.json").read_text())
    assert {r["backend"] for r in written} == {"onnxruntime"}


def test_params_count_the_weights_used_at_the_image_size() -> None:
    from fvlab import create_model
    from fvlab.lit.measure import Target, measure_specs

    on = create_model("fastervit_micro", num_classes=4, window_size=[2, 2, 4, 2], hat=[False, False, True, False])
    off = create_model("fastervit_micro", num_classes=4, window_size=[2, 2, 4, 2], hat=False)
    carrier = sum(p.numel() for p in on.levels[2].carrier_parameters())
    assert carrier > 0
    # At 64 px stage 3 is one 4x4 window: its carrier-token weights are built but never used, so
    # HAT on counts what HAT off counts; at 128 px the stage spans four windows and uses them.
    assert count_params(on, 64) == count_params(off, 64) == count_params(on) - carrier
    assert count_params(on, 128) == count_params(on)
    figures = measure_specs({"on": Target(on, 64), "off": Target(off, 64)}, throughput=False)
    assert figures["on"]["model/params_m"] == figures["off"]["model/params_m"] == count_params(off) / 1e6
    assert figures["on"]["model/params_built_m"] == count_params(on) / 1e6
