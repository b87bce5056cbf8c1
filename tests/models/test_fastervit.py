"""FasterViT model (``fvlab.models.fastervit``): parity with the official implementation, any
resolution, per-stage settings and argument checks, timm's model interface, gradient checkpointing,
fusing, forward_intermediates, layer decay."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import timm
import timm.optim
import torch

import fvlab
from fvlab.models import FasterViT, create_model, list_variants

from helpers import n_params

official = pytest.importorskip("fastervit.models.faster_vit", reason="reference package `fastervit`")
official_any_res = pytest.importorskip("fastervit.models.faster_vit_any_res")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def perturbed_official(builder, seed: int = 0, **kwargs) -> torch.nn.Module:
    """An official model whose weights and BN statistics are far from their initial values.

    At initialisation layer-scale gammas are 1e-5 and position MLPs near zero, which would
    let whole branches (carrier tokens, propagation) differ unnoticed.
    """
    torch.manual_seed(seed)
    model = builder(**kwargs).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if "gamma" in name else 0.02))
            if "gamma" in name:
                p.abs_()
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1, generator=g)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=g)
    return model


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_official_state_dict_loads_and_gives_same_logits(index: int, tmp_path) -> None:
    ref = perturbed_official(getattr(official, f"faster_vit_{index}_224"))
    path = tmp_path / "official.pth.tar"
    # Official files wrap the weights, sometimes with a DataParallel prefix.
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()},
                "epoch": 310}, path)
    ours = create_model(f"fastervit_{index}", checkpoint_path=path).eval()
    assert n_params(ours) == n_params(ref)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert expected.std() > 0.5  # a live signal, not a near-constant output
    assert (got - expected).abs().max().item() <= 1e-4


def test_parameter_counts_equal_official_configurations() -> None:
    # Built on the meta device: FasterViT-6 has 1.36 B parameters. Both implementations
    # read drop-path rates back with .item()/.tolist(), so linspace must stay on the CPU.
    linspace = torch.linspace
    with torch.device("meta"), mock.patch(
            "torch.linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})):
        for index in range(7):
            ref = getattr(official, f"faster_vit_{index}_224")()
            ours = create_model(f"fastervit_{index}")
            assert n_params(ours) == n_params(ref), f"fastervit_{index}"
            if index == 0:
                assert round(n_params(ours) / 1e6, 2) == 31.40


@pytest.mark.parametrize("size", [256, 288, 384])
def test_larger_resolution_matches_official_model_built_for_it(size: int, tmp_path) -> None:
    # The official any-resolution model must be rebuilt per size; ours is built once.
    ref = perturbed_official(official_any_res.faster_vit_0_any_res, resolution=[size, size])
    torch.save(ref.state_dict(), tmp_path / "ref.pth")
    ours = create_model("fastervit_0", checkpoint_path=tmp_path / "ref.pth").eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4


def _stage3_hat_keys(model: FasterViT, tokenizer: bool) -> set[str]:
    return {k for k in model.state_dict() if k.startswith("levels.2.") and (
        ".hat_" in k or (tokenizer and ".global_tokenizer." in k))}


@pytest.mark.parametrize("builder", ["faster_vit_0_224", "faster_vit_0_any_res"])
def test_one_window_stage_has_no_carrier_tokens_as_in_official_model(builder: str, tmp_path) -> None:
    # 112 px: stage 3 sees one 7x7 window, so the official model (sr_ratio = 7 // 7 = 1) builds
    # no carrier tokens there; ours keeps its HAT weights (freshly initialised, not loaded) and
    # must leave them unused. The plain official model cannot run stage 4 at 112 px (a 4x4 map,
    # 7x7 windows, no padding): it is compared up to stage 3's output (after its downsample),
    # the any-resolution one (which pads) on the logits.
    any_res = builder.endswith("any_res")
    kwargs = dict(resolution=[112, 112]) if any_res else dict(resolution=112)
    ref = perturbed_official(getattr(official_any_res if any_res else official, builder), **kwargs)
    ours = create_model("fastervit_0").eval()
    with torch.no_grad():
        # Near initialisation the window attention's position bias gives window tokens about
        # +8 over carrier tokens (which get 0): carrier tokens would weigh e^-8 and go unseen.
        for block in ref.levels[2].blocks:
            block.attn.pos_emb_funct.cpb_mlp[0].bias.add_(1.0)
            block.attn.pos_emb_funct.cpb_mlp[2].weight.sub_(0.05)
        for name, p in ours.named_parameters():
            if ".hat_" in name:
                p.add_(torch.randn_like(p) * 0.5)  # a loud carrier-token path, were it used
    result = ours.load_state_dict(
        fvlab.models.checkpoint_filter_fn({"state_dict": ref.state_dict()}), strict=False)
    assert not result.unexpected_keys
    # The official 112-px model lacks exactly stage 3's HAT weights (the plain one its tokenizer
    # too; the any-resolution one builds the tokenizer whatever the size).
    assert set(result.missing_keys) == _stage3_hat_keys(ours, tokenizer=not any_res)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        if any_res:
            expected, got = ref(x), ours(x)
        else:
            expected, got = ref.patch_embed(x), ours.patch_embed(x)
            for i in range(3):
                expected, got = ref.levels[i](expected), ours.levels[i](got)
    assert expected.std() > 0.5
    assert (got - expected).abs().max().item() <= 1e-5


# ---- any resolution, per-stage settings, bad arguments ----------------------------------------


def test_one_model_runs_at_any_resolution_with_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("fastervit_0", num_classes=10).train()
    sizes = [(224, 224), (256, 256), (288, 288), (384, 384), (192, 320), (200, 300)]
    for h, w in sizes:
        model.zero_grad()
        out = model(torch.randn(1, 3, h, w))
        assert out.shape == (1, 10)
        assert torch.isfinite(out).all()
        out.sum().backward()
        hat_grad = model.levels[2].blocks[0].hat_pos_embed.cpb_mlp[0].weight.grad
        assert hat_grad is not None and hat_grad.abs().sum() > 0, (h, w)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_per_stage_settings() -> None:
    model = create_model("fastervit_tiny", window_size=[2, 2, 2, 1], ct_size=[0, 0, 2, 1],
                         hat=[False, False, True, True], num_heads=[1, 1, 4, 2])
    assert model.ct_size == [0, 0, 2, 1]
    assert model.levels[3].blocks[0].window_size == 1
    assert model.levels[2].global_tokenizer.ct_size == 2
    assert model.levels[3].global_tokenizer.ct_size == 1
    assert model.levels[3].blocks[0].attn.num_heads == 2
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("kwargs, names", [
    (dict(num_heads=[2, 4, 7, 16]), ["num_heads[2]", "256"]),
    (dict(window_size=[7, 7, 0, 7]), ["window_size[2]"]),
    (dict(window_size=[7, 7, 7]), ["window_size", "3 entries", "4 stages"]),
    (dict(ct_size=-1), ["ct_size"]),
    (dict(ct_size=[2, 2, 8, 2]), ["ct_size[2]", "window_size[2]"]),
    (dict(hat=[True, False]), ["hat"]),
    (dict(depths=[2, 0, 6, 5]), ["depths"]),
    (dict(dim=0), ["dim"]),
    (dict(num_classes=-3), ["num_classes"]),
    (dict(drop_path_rate=1.5), ["drop_path_rate"]),
    (dict(layer_scale=-1.0), ["layer_scale"]),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, names: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        create_model("fastervit_0", **kwargs)
    for name in names:
        assert name in str(err.value)


# ---- timm's interface, gradient checkpointing -------------------------------------------------


def test_registered_in_timm_with_its_model_interface() -> None:
    assert set(list_variants()) == set(timm.list_models("fastervit_*")) | set(timm.list_models("hat_swin_*"))
    model = timm.create_model("fastervit_tiny", num_classes=3)
    assert isinstance(model, FasterViT) and model.num_classes == 3
    x = torch.randn(2, 3, 64, 64)
    final, feats = model.forward_intermediates(x)
    assert [f.shape[1:] for f in feats] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    assert torch.allclose(model.forward_head(final), model(x), atol=1e-5)
    assert model.forward_head(final, pre_logits=True).shape == (2, 256)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    names = dict(model.named_parameters())
    no_wd = model.no_weight_decay()
    assert no_wd <= set(names)
    assert any(".cpb_mlp.2.weight" in n for n in no_wd)  # 2-D, excluded by name only
    assert "head.weight" not in no_wd and "levels.2.blocks.0.attn.qkv.weight" not in no_wd
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(id(names[n]) not in decayed for n in no_wd)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) >= 5
    features = timm.create_model("fastervit_tiny", features_only=True)
    assert [f.shape[1] for f in features(x)] == [32, 64, 128, 256]


def test_grad_checkpointing_recomputes_every_block_and_gives_same_gradients() -> None:
    import fvlab.models.fastervit as fastervit_module

    calls = []
    real_checkpoint = fastervit_module.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(type(function).__name__)
        return real_checkpoint(function, *args, **kwargs)

    torch.manual_seed(0)
    model = create_model("fastervit_micro", num_classes=4).train()
    x = torch.randn(2, 3, 64, 64)  # stage 3: four windows, so carrier tokens pass the checkpoints
    with mock.patch.object(fastervit_module, "checkpoint", counting_checkpoint):
        model(x).sum().backward()
        assert calls == []  # off by default
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        model.set_grad_checkpointing(True)
        model(x).sum().backward()
        assert calls == ["ConvBlock", "ConvBlock", "HATBlock", "HATBlock"]  # one per block
        with torch.no_grad():
            model(x)  # nothing to recompute without a backward pass
        assert len(calls) == 4
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-5), n


# ---- fuse, forward_intermediates, group_matcher -----------------------------------------


def test_fused_model_matches_and_refuses_training() -> None:
    torch.manual_seed(0)
    model = create_model("fastervit_tiny", num_classes=4)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))  # non-trivial BN statistics
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        fused = copy.deepcopy(model).fuse()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.levels.modules())
        assert torch.allclose(fused(x), expected, atol=1e-4)
        assert torch.allclose(fused.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-4)
    with pytest.raises(RuntimeError, match="fused"):
        fused.train()


def _model_with_live_batchnorms(num_classes: int) -> FasterViT:
    torch.manual_seed(0)
    model = create_model("fastervit_tiny", num_classes=num_classes)
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def test_fuse_twice_folds_every_batchnorm_including_the_head_one() -> None:
    model = _model_with_live_batchnorms(num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        fused = copy.deepcopy(model).fuse().fuse()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        assert (fused(x) - expected).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match="before fuse"):
        fused.reset_classifier(3)


def test_fuse_without_a_head_keeps_the_final_norm_for_features() -> None:
    model = _model_with_live_batchnorms(num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_features(x)
        fused = copy.deepcopy(model).fuse()
        assert isinstance(fused.norm, torch.nn.BatchNorm2d)
        assert (fused.forward_features(x) - expected).abs().max().item() <= 1e-5


def test_forward_intermediates_stop_early_and_final_norm() -> None:
    model = _model_with_live_batchnorms(num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, every = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
        early, first = model.forward_intermediates(x, indices=[0], norm=True, stop_early=True)
        assert len(first) == 1 and torch.equal(first[0], every[0])
        assert torch.equal(early, every[0])  # the last stage run, not normalised
        _, normed = model.forward_intermediates(x, indices=1, norm=True)
        assert torch.allclose(normed[0], model.forward_features(x), atol=1e-6)
        assert model.forward_intermediates(x, indices=[1, -1], intermediates_only=True)[1].shape \
            == every[3].shape


def test_layer_decay_puts_each_downsample_after_its_stage_blocks() -> None:
    model = create_model("fastervit_tiny", num_classes=4)
    groups = timm.optim.param_groups_layer_decay(model, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    lr_scale = {name: scale[id(p)] for name, p in model.named_parameters()}

    def of(prefix: str) -> set[float]:
        return {s for name, s in lr_scale.items() if name.startswith(prefix)}

    for i, depth in enumerate(model.depths[:-1]):
        (downsample,) = of(f"levels.{i}.downsample.")
        assert downsample > max(of(f"levels.{i}.blocks.{depth - 1}."))
        assert downsample < min(of(f"levels.{i + 1}."))  # the next stage, its tokenizer too
    assert max(of("levels.2.global_tokenizer.")) < min(of("levels.2.blocks.0."))
    assert max(lr_scale.values()) == lr_scale["head.weight"] == 1.0
