"""``fvlab.models.hat``: carrier tokens (Hierarchical Attention) in a FasterViT: hat=False and
ct_size=0 are plain window attention, carrier tokens carry information across windows, a map of
one window has none (eagerly and in an export graph) but keeps the weights and their gradients."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from fvlab.models import FasterViT, create_model

from helpers import n_params

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _stage3_sensitivity(model: FasterViT, size: int = 64) -> torch.Tensor:
    """Which windows of stage 3's output change when one window of its input changes."""
    stage = model.levels[2]
    torch.manual_seed(0)
    x = torch.randn(1, stage.blocks[0].norm1.normalized_shape[0], size // 16, size // 16)
    y = x.clone()
    y[:, :, :stage.window_size, :stage.window_size] += 1.0  # perturb window (0, 0) only
    with torch.no_grad():
        diff = (stage.forward_blocks(x) - stage.forward_blocks(y)).abs()
    ws = stage.window_size
    return diff.sum(1)[0].unfold(0, ws, ws).unfold(1, ws, ws).sum((-1, -2))


def test_hat_false_is_plain_window_attention() -> None:
    local = create_model("fastervit_tiny", hat=False).eval()
    changed = _stage3_sensitivity(local) > 1e-6
    assert changed[0, 0] and changed.sum() == 1  # only the perturbed window moves
    assert not any("hat_" in k or "global_tokenizer" in k for k in local.state_dict())


def test_carrier_tokens_carry_information_across_windows() -> None:
    hat = create_model("fastervit_tiny").eval()
    changed = _stage3_sensitivity(hat) > 1e-6
    assert changed.all()  # every window hears about the perturbed one, via carrier tokens


def test_ct_size_zero_leaves_no_carrier_tokens_anywhere() -> None:
    model = create_model("fastervit_tiny", ct_size=0, hat=True)
    assert model.ct_size == [0, 0, 0, 0]
    assert not any("hat_" in k or "global_tokenizer" in k for k in model.state_dict())
    changed = _stage3_sensitivity(model.eval()) > 1e-6
    assert changed.sum() == 1


def _loud_carrier_tokens(model: FasterViT) -> FasterViT:
    """Weaken the window attention's position bias, which near initialisation gives window tokens
    about +8 over carrier tokens (e^-8 of the weight): carrier tokens then visibly count."""
    with torch.no_grad():
        for stage in model.levels:
            for block in stage.blocks if not stage.conv else ():
                block.attn.pos_emb_funct.cpb_mlp[0].bias.add_(1.0)
                block.attn.pos_emb_funct.cpb_mlp[2].weight.sub_(0.05)
    return model


def test_a_map_of_one_window_has_no_carrier_tokens_but_keeps_the_weights() -> None:
    # Stage 3 of fastervit_micro (window 2) sees 2x2 tokens at 32 px (one window), a 1x1 map
    # padded to one window at 16 px, 4x4 tokens (four windows) at 64 px.
    torch.manual_seed(0)
    hat = _loud_carrier_tokens(create_model("fastervit_micro", ct_size=2, do_propagation=True, num_classes=4))
    local = create_model("fastervit_micro", hat=False, num_classes=4)
    result = local.load_state_dict(hat.state_dict(), strict=False)
    assert result.unexpected_keys and all(".hat_" in k or "global_tokenizer" in k or "gamma" in k
                                          for k in result.unexpected_keys)
    assert n_params(hat) > n_params(local)  # the HAT weights are built whatever the input size
    assert [hat.carrier_tokens_live(2, s) for s in (16, 32, 48, 64)] == [False, False, True, True]
    hat.eval(), local.eval()
    with torch.no_grad():
        for size in (16, 32):
            x = torch.randn(2, 3, size, size)
            assert torch.equal(hat(x), local(x)), size
        x = torch.randn(2, 3, 64, 64)
        assert not torch.allclose(hat(x), local(x), atol=1e-3)
    # Training: unused carrier-token weights get zero gradients (not none: DDP needs one for
    # every parameter), used ones real gradients.
    carrier = hat.levels[2].carrier_parameters()
    assert carrier and all(any(p is q for q in carrier) for n, p in hat.named_parameters()
                           if n.startswith("levels.2.") and (".hat_" in n or "global_tokenizer" in n))
    hat.train()
    for size, used in ((32, False), (64, True)):
        hat.zero_grad(set_to_none=True)
        hat(torch.randn(2, 3, size, size)).sum().backward()
        assert all(p.grad is not None for p in hat.parameters())
        assert (sum(p.grad.abs().sum() for p in carrier) > 0) == used, size


def test_export_graph_hides_carrier_tokens_of_a_one_window_map() -> None:
    # With a symbolic image size (ONNX export) no guard is checked at run time, so the graph itself
    # decides: carrier tokens computed, then hidden from the window attention and not propagated
    # when the map is one window. That path, run eagerly, against the eager one.
    import fvlab.models.hat as hat_module
    import fvlab.models.layers as layers_module

    torch.manual_seed(0)
    model = _loud_carrier_tokens(create_model("fastervit_tiny", do_propagation=True)).eval()
    stage = model.levels[2]
    not_known = lambda *sizes: False  # noqa: E731
    symbolic = (mock.patch.object(hat_module, "decided_in_python", not_known),
                mock.patch.object(hat_module, "sizes_known", not_known),
                mock.patch.object(layers_module, "sizes_known", not_known),
                mock.patch("torch.compiler.is_exporting", lambda: True))
    for side in (2, 1, 4, 3):  # one window (2, or 1 padded to 2), then several (3 padded to 4)
        x = torch.randn(2, 128, side, side)
        with torch.no_grad():
            expected = stage.forward_blocks(x)
            with symbolic[0], symbolic[1], symbolic[2], symbolic[3]:
                got = stage.forward_blocks(x)
                with mock.patch.object(hat_module, "graph_condition",
                                       lambda n, like: torch.ones(1, dtype=torch.bool, device=like.device)):
                    ungated = stage.forward_blocks(x)
        assert (got - expected).abs().max().item() <= 1e-5, side
        # The gate is what makes the difference on one window.
        assert (side > 2) == torch.allclose(ungated, expected, atol=1e-5), side
