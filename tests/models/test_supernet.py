"""Weight-sharing supernet: every subnet equals its stand-alone FasterViT."""

from __future__ import annotations

import random

import pytest
import torch

from fvlab.models import FasterViT, create_model, variant_config
from fvlab.models.supernet import FasterViTSupernet, extract_subnet
from fvlab.profile import count_params
from fvlab.sweep.canonical import canonical_arch

IMAGE = 64  # fastervit_micro: stage maps 16, 8, 4, 2 (stage 2: four 2x2 windows, or one 4x4)
SPACE = {
    "depths": [[1, 1, 1, 1], [1, 1, 2, 1], [2, 1, 3, 2]],
    "window_size": [2, [2, 2, 4, 2], [2, 2, 2, 1]],
    "ct_size": [1, 2],
    "hat": [False, [False, False, True, False], [False, False, True, True]],
    "do_propagation": [False, True],
}


def perturbed_supernet(seed: int = 0, space: dict | None = None) -> FasterViTSupernet:
    """A supernet (over ``space``, default SPACE) whose weights and BN statistics are far from
    initial values, in eval mode.

    At initialisation the position MLPs are near zero, which could let a carrier-token path
    differ by less than the tolerance unnoticed.
    """
    torch.manual_seed(seed)
    net = FasterViTSupernet(space or SPACE, **variant_config("fastervit_micro", num_classes=7))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1, generator=g)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=g)
    return net.eval()


def standalone(net: FasterViTSupernet) -> FasterViT:
    """The active subnet as a plain FasterViT holding its extracted weights."""
    model = FasterViT(**net.subnet_arch()).eval()
    model.load_state_dict(extract_subnet(net), strict=True)
    return model


@pytest.fixture(scope="module")
def net() -> FasterViTSupernet:
    return perturbed_supernet()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5))


HAT2 = [False, False, True, False]
HAT23 = [False, False, True, True]
CASES = {
    "hat_on_ct1": dict(depths=[2, 1, 3, 2], window_size=2, ct_size=1, hat=HAT2, do_propagation=False),
    "hat_on_ct2": dict(depths=[2, 1, 3, 2], window_size=2, ct_size=2, hat=HAT2, do_propagation=False),
    "hat_off": dict(depths=[2, 1, 3, 2], window_size=2, ct_size=2, hat=False, do_propagation=True),
    # stage 2's 4x4 map is one 4x4 window: no carrier tokens there, whatever ct_size says
    "one_window_stage": dict(depths=[2, 1, 3, 2], window_size=[2, 2, 4, 2], ct_size=2, hat=HAT2,
                             do_propagation=True),
    "depth_prefix_propagation": dict(depths=[1, 1, 2, 1], window_size=[2, 2, 2, 1], ct_size=1, hat=HAT23,
                                     do_propagation=True),
    "depth_prefix_no_propagation": dict(depths=[1, 1, 2, 1], window_size=[2, 2, 2, 1], ct_size=1, hat=HAT23,
                                        do_propagation=False),
    "smallest": dict(depths=[1, 1, 1, 1], window_size=2, ct_size=1, hat=False, do_propagation=False),
    "largest_ct2_propagation": dict(depths=[2, 1, 3, 2], window_size=[2, 2, 2, 1], ct_size=[1, 1, 2, 1],
                                    hat=HAT23, do_propagation=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_subnet_equals_its_standalone_model(case: str, net: FasterViTSupernet, x: torch.Tensor) -> None:
    net.set_subnet(CASES[case])
    with torch.no_grad():
        ours = net(x)
        theirs = standalone(net)(x)
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_settings_change_the_output_so_parity_is_not_vacuous(net: FasterViTSupernet, x: torch.Tensor) -> None:
    """Each setting the parity tests cover changes the logits well beyond the tolerance."""
    def logits(name: str, **change) -> torch.Tensor:
        with net.subnet({**CASES[name], **change}), torch.no_grad():
            return net(x)

    pairs = [
        (logits("hat_on_ct1"), logits("hat_on_ct2")),                          # ct_size 1 vs 2
        (logits("hat_on_ct1"), logits("hat_off")),                             # hat on vs off
        (logits("depth_prefix_propagation"), logits("depth_prefix_no_propagation")),  # propagation
        (logits("depth_prefix_propagation"), logits("depth_prefix_propagation", depths=[1, 1, 3, 1])),
        (logits("hat_on_ct2"), logits("hat_on_ct2", window_size=[2, 2, 4, 2])),  # 4 windows vs 1
    ]
    for a, b in pairs:
        assert (a - b).abs().max().item() > 1e-3
    # One window: ct_size and propagation do nothing there, as the stand-alone rule says.
    one = logits("one_window_stage")
    assert torch.equal(one, logits("one_window_stage", ct_size=1, do_propagation=False))


def test_last_active_block_propagates(net: FasterViTSupernet) -> None:
    net.set_subnet(CASES["depth_prefix_propagation"])
    propagating = [(i, j) for i, stage in enumerate(net.levels) for j, block in enumerate(stage.blocks)
                   if getattr(block, "propagate", False)]
    assert propagating == [(2, 1), (3, 0)]  # last active block of each HAT stage, not the deepest
    net.set_subnet(CASES["depth_prefix_no_propagation"])
    assert not any(getattr(b, "propagate", False) for s in net.levels for b in s.blocks)


def test_context_manager_restores_and_switching_back_reproduces(net: FasterViTSupernet,
                                                                 x: torch.Tensor) -> None:
    net.set_subnet(CASES["hat_on_ct2"])
    with torch.no_grad():
        before = net(x)
        with net.subnet(CASES["depth_prefix_propagation"]) as inner:
            assert inner.active_subnet == CASES["depth_prefix_propagation"]
            assert not torch.equal(net(x), before)
        assert net.active_subnet == CASES["hat_on_ct2"]
        assert torch.equal(net(x), before)


def test_extracted_checkpoint_builds_like_any_model(net: FasterViTSupernet, x: torch.Tensor, tmp_path) -> None:
    config = CASES["depth_prefix_propagation"]
    path = tmp_path / "subnet" / "model.pt"
    extract_subnet(net, config, path=path)
    saved = torch.load(path, weights_only=True)
    # What `checkpoint_path` of an experiment's model.arch reads (fvlab fit, create_model).
    model = create_model(None, checkpoint_path=str(path), **saved["arch"]).eval()
    with torch.no_grad(), net.subnet(config):
        assert (model(x) - net(x)).abs().max().item() <= 1e-6
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in net.parameters())


def test_accounting_describes_the_active_subnet(net: FasterViTSupernet) -> None:
    for config in CASES.values():
        net.set_subnet(config)
        model = FasterViT(**net.subnet_arch())
        assert canonical_arch(net, IMAGE) == canonical_arch(model, IMAGE)
        assert canonical_arch(net) == canonical_arch(model)
        assert count_params(net, IMAGE) == count_params(model, IMAGE)


def test_unused_weights_get_zero_gradients_when_training() -> None:
    """DistributedDataParallel without find_unused_parameters needs a gradient for every weight."""
    torch.manual_seed(0)
    net = FasterViTSupernet(SPACE, **variant_config("fastervit_micro", num_classes=7)).train()
    net.set_subnet(CASES["depth_prefix_propagation"])
    net(torch.randn(2, 3, IMAGE, IMAGE)).sum().backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["levels.2.blocks.2.attn.qkv.weight"].abs().sum() == 0  # beyond the prefix
    assert grads["levels.2.blocks.1.attn.qkv.weight"].abs().sum() > 0
    assert grads["levels.2.blocks.1.hat_attn.qkv.weight"].abs().sum() > 0


def test_largest_and_smallest_and_random_subnets(net: FasterViTSupernet) -> None:
    assert net.max_depths == [2, 1, 3, 2] and net.hat_weights == [False, False, True, True]
    largest = net.largest_subnet(IMAGE)
    assert largest["depths"] == [2, 1, 3, 2] and largest["hat"] == HAT23 and largest["do_propagation"]
    # At 64 px a 4x4 window makes stage 2 one window: fewer weights used, so not the largest.
    assert largest["window_size"] != [2, 2, 4, 2]
    # A width the space does not search stays out of every subnet.
    assert net.smallest_subnet() == {"depths": [1, 1, 1, 1], "window_size": [2, 2, 2, 1], "ct_size": 1,
                                     "hat": False, "do_propagation": False}
    rng = random.Random(0)
    for _ in range(8):
        config = net.sample_subnet(rng)
        assert all(config[k] in SPACE[k] for k in SPACE)
        net.set_subnet(config)  # every sample is a valid subnet


@pytest.mark.parametrize("config, words", [
    ({"depths": [1, 1, 4, 1]}, ["depths[2]=4", "3 block"]),
    ({"mlp_ratio": 4.0}, ["wider than the supernet's", "mlp_ratio"]),
    ({"in_dim": 4}, ["'in_dim'", "depths, window_size"]),
    ({"ct_size": 2, "window_size": 1, "hat": HAT2}, ["ct_size[2]=2", "window_size[2]=1"]),
])
def test_bad_subnets_raise_naming_the_setting(net: FasterViTSupernet, config: dict, words: list[str]) -> None:
    active = net.active_subnet
    with pytest.raises(ValueError) as err:
        net.set_subnet(config)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert net.active_subnet == active  # a refused subnet changes nothing


def test_hat_where_no_subnet_of_the_space_has_it_is_refused() -> None:
    net = FasterViTSupernet({"hat": [HAT2, False]}, **variant_config("fastervit_micro"))
    assert net.hat_weights == [False, False, True, False]
    with pytest.raises(ValueError, match="stage 3.*no carrier-token weights"):
        net.set_subnet({"hat": HAT23, "ct_size": 1})
    net.set_subnet({"hat": True, "ct_size": 1, "window_size": [2, 2, 2, 1]} | {"hat": HAT2})


def test_space_keys_that_cannot_share_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="'in_dim'"):
        FasterViTSupernet({"in_dim": [8, 16]}, **variant_config("fastervit_micro"))


# ---- width: the first k channels, hidden units and heads ------------------------------------

WIDTH_SPACE = {**SPACE, "dim": [8, 16], "mlp_ratio": [1.0, 2.0], "num_heads": [[1, 1, 1, 2], [1, 1, 2, 4]]}
WIDTH_CASES = {
    "dim_depth_hat_ct2": dict(CASES["hat_on_ct2"], dim=8),
    "dim_hat_off": dict(CASES["hat_off"], dim=8),
    "dim_prefix_propagation": dict(CASES["depth_prefix_propagation"], dim=8, num_heads=[1, 1, 1, 2]),
    "mlp_ratio_ct1": dict(CASES["hat_on_ct1"], mlp_ratio=1.0),
    "mlp_ratio_hat_off": dict(CASES["smallest"], mlp_ratio=1.0),
    "heads_ct2_propagation": dict(CASES["largest_ct2_propagation"], num_heads=[1, 1, 1, 2]),
    "heads_one_window": dict(CASES["one_window_stage"], num_heads=[1, 1, 1, 2]),
    "all_three_narrow": dict(CASES["depth_prefix_no_propagation"], dim=8, mlp_ratio=1.0, num_heads=[1, 1, 1, 2]),
    "widest": dict(CASES["largest_ct2_propagation"], dim=16, mlp_ratio=2.0, num_heads=[1, 1, 2, 4]),
}


@pytest.fixture(scope="module")
def wide() -> FasterViTSupernet:
    return perturbed_supernet(space=WIDTH_SPACE)


@pytest.mark.parametrize("case", list(WIDTH_CASES))
def test_a_narrow_subnet_equals_its_standalone_model(case: str, wide: FasterViTSupernet, x: torch.Tensor) -> None:
    wide.set_subnet(WIDTH_CASES[case])
    model = standalone(wide)
    with torch.no_grad():
        assert (wide(x) - model(x)).abs().max().item() <= 1e-6
    arch = wide.subnet_arch()
    assert model.num_features == arch["dim"] * 8 and canonical_arch(wide, IMAGE) == canonical_arch(model, IMAGE)
    assert count_params(wide, IMAGE) == count_params(model, IMAGE)


def test_widths_change_the_output_and_narrow_weights_are_leading_blocks(wide: FasterViTSupernet,
                                                                          x: torch.Tensor) -> None:
    def logits(**change) -> torch.Tensor:
        with wide.subnet({**WIDTH_CASES["widest"], **change}), torch.no_grad():
            return wide(x)

    widest = logits()
    for change in ({"dim": 8, "num_heads": [1, 1, 1, 2]}, {"mlp_ratio": 1.0}, {"num_heads": [1, 1, 1, 2]}):
        assert (logits(**change) - widest).abs().max().item() > 1e-3, change
    weights = extract_subnet(wide, WIDTH_CASES["all_three_narrow"])
    full = wide.state_dict()
    # dim 8: stage 3 has 64 channels of 128; q, k and v are each their first 64 rows.
    qkv = full["levels.3.blocks.0.attn.qkv.weight"].view(3, 128, 128)[:, :64, :64].reshape(192, 64)
    assert torch.equal(weights["levels.3.blocks.0.attn.qkv.weight"], qkv)
    assert torch.equal(weights["levels.0.blocks.0.conv1.weight"], full["levels.0.blocks.0.conv1.weight"][:8, :8])
    hidden = weights["levels.2.blocks.0.mlp.fc1.weight"]  # mlp_ratio 1: 32 hidden units of 64
    assert hidden.shape == (32, 32) and torch.equal(hidden, full["levels.2.blocks.0.mlp.fc1.weight"][:32, :32])


def test_a_narrow_subnet_trains_the_leading_blocks_and_recalibrates_its_statistics() -> None:
    from fvlab.models.supernet import recalibrate_batchnorm

    torch.manual_seed(0)
    net = FasterViTSupernet(WIDTH_SPACE, **variant_config("fastervit_micro", num_classes=7)).train()
    net.set_subnet(WIDTH_CASES["all_three_narrow"])
    net(torch.randn(2, 3, IMAGE, IMAGE)).sum().backward()
    head = net.head.weight.grad  # 7 x 128: the subnet's 64 features get gradients, the rest zero
    assert head[:, :64].abs().sum() > 0 and head[:, 64:].abs().sum() == 0
    assert all(p.grad is not None for p in net.parameters())  # unused weights: zero, not None (DDP)
    batches = [torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    recalibrate_batchnorm(net, batches)
    model = FasterViT(**net.subnet_arch()).train()
    model.load_state_dict(extract_subnet(net), strict=True)
    recalibrate_batchnorm(model, batches)
    ours, theirs = extract_subnet(net), model.state_dict()
    for name in ("norm.running_var", "levels.0.blocks.0.norm1.running_mean", "patch_embed.conv_down.4.running_var"):
        assert torch.allclose(ours[name], theirs[name], atol=1e-6), name
    assert net.norm.running_var[64:].eq(1).all()  # the channels beyond the subnet were reset, not touched


def test_every_narrow_weight_is_the_leading_block_of_the_widest(wide: FasterViTSupernet) -> None:
    full = wide.state_dict()
    weights = extract_subnet(wide, WIDTH_CASES["all_three_narrow"])
    assert {k for k, v in weights.items() if v.shape != full[k].shape} >= {
        "levels.2.blocks.0.attn.proj.weight", "levels.2.blocks.0.pos_embed.cpb_mlp.2.weight", "norm.running_var",
        "head.weight", "levels.2.global_tokenizer.pos_embed.weight", "patch_embed.conv_down.3.weight",
        "levels.2.blocks.0.attn.pos_emb_funct.cpb_mlp.2.weight", "levels.2.blocks.0.hat_attn.qkv.weight"}
    for name, value in weights.items():
        if name.endswith(("qkv.weight", "qkv.bias")):
            rows = value.shape[0] // 3
            parts = full[name].view(3, full[name].shape[0] // 3, *full[name].shape[1:])
            expected = parts[(slice(None), slice(0, rows), *(slice(0, n) for n in value.shape[1:]))]
            assert torch.equal(value, expected.reshape(value.shape)), name
        else:
            assert torch.equal(value, full[name][tuple(slice(0, n) for n in value.shape)]), name


def test_a_narrow_subnet_trains_like_its_standalone_model_with_and_without_checkpointing(x: torch.Tensor) -> None:
    net = perturbed_supernet(space=WIDTH_SPACE).train()
    net.set_subnet(WIDTH_CASES["dim_prefix_propagation"])
    model = standalone(net).train()
    model(x).square().sum().backward()
    grads = {}
    for checkpointed in (False, True):
        net.zero_grad()
        net.set_grad_checkpointing(checkpointed)
        net(x).square().sum().backward()
        grads[checkpointed] = net.head.weight.grad.clone()
    net.set_grad_checkpointing(False)
    rows, cols = model.head.weight.shape
    assert torch.allclose(grads[False][:rows, :cols], model.head.weight.grad, atol=1e-5)
    assert torch.allclose(grads[True], grads[False], atol=1e-6)


def test_a_narrow_subnet_gives_its_own_feature_maps(wide: FasterViTSupernet, x: torch.Tensor) -> None:
    wide.set_subnet(WIDTH_CASES["dim_depth_hat_ct2"])
    model = standalone(wide)
    with torch.no_grad():
        ours, theirs = wide.forward_intermediates(x, intermediates_only=True), \
            model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[1] for f in ours] == [8, 16, 32, 64]
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(ours, theirs))


def test_extracting_with_batches_leaves_the_supernets_statistics_alone() -> None:
    net = perturbed_supernet(space=WIDTH_SPACE)
    before = {k: v.clone() for k, v in net.named_buffers()}
    batches = [torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    plain = extract_subnet(net, WIDTH_CASES["mlp_ratio_ct1"])
    recalibrated = extract_subnet(net, WIDTH_CASES["mlp_ratio_ct1"], batches=batches)
    assert not torch.equal(plain["norm.running_mean"], recalibrated["norm.running_mean"])
    assert all(torch.equal(v, before[k]) for k, v in net.named_buffers())
