"""``fvlab.models.layers``: the eval-mode cache of position terms (continuous position MLPs) on a
FasterViT: it follows size changes, in-place and replaced weights, load_state_dict(assign=True),
train/eval switches, and a term cached under inference mode serves a later backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fvlab.models import FasterViT, create_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_eval_cache_follows_size_changes_and_weight_updates() -> None:
    torch.manual_seed(0)
    model = create_model("fastervit_micro", num_classes=5).eval()
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 48, 80)
    with torch.inference_mode():
        first = model(a)
        model(b)
        assert torch.equal(model(a), first)
    # An in-place update in eval mode (as EMA does) must not serve stale position terms.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cpb_mlp" in name:
                p.mul_(1.5)
    fresh = create_model("fastervit_micro", num_classes=5)
    fresh.load_state_dict(model.state_dict())
    with torch.inference_mode():
        assert torch.allclose(model(a), fresh.eval()(a), atol=1e-6)
        assert not torch.allclose(model(a), first, atol=1e-4)


def test_switching_train_and_eval_stays_correct() -> None:
    torch.manual_seed(0)
    model = create_model("fastervit_micro", num_classes=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, target = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        model.eval()
        fresh = create_model("fastervit_micro", num_classes=5)
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.allclose(model(x), fresh.eval()(x), atol=1e-6)
    # Eval with gradients enabled (e.g. attribution) still gets a graph through the position MLPs.
    model.eval()
    model.zero_grad()
    model(x).sum().backward()
    assert model.levels[2].blocks[0].attn.pos_emb_funct.cpb_mlp[2].weight.grad.abs().sum() > 0


def _position_mlp_params(model: FasterViT) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".cpb_mlp." in name]


def _reference_logits(model: FasterViT, x: torch.Tensor) -> torch.Tensor:
    """Logits of a freshly built copy of ``model``'s weights: no cache to go stale."""
    fresh = create_model("fastervit_micro", num_classes=model.num_classes).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        return fresh(x)


def test_eval_cache_sees_weights_replaced_through_data() -> None:
    torch.manual_seed(0)
    model = create_model("fastervit_micro", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)  # fills the cache
        for p in _position_mlp_params(model):
            p.data = p.data * 1.5  # new storage, same version counter
        after = model(x)
    assert not torch.allclose(after, before, atol=1e-4)
    assert torch.allclose(after, _reference_logits(model, x), atol=1e-6)


def test_eval_cache_sees_load_state_dict_with_assign() -> None:
    torch.manual_seed(0)
    model = create_model("fastervit_micro", num_classes=5).eval()
    other = create_model("fastervit_micro", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)  # fills the cache
        model.load_state_dict(other.state_dict(), assign=True)
        assert torch.allclose(model(x), other(x), atol=1e-6)


def test_term_cached_under_inference_mode_serves_a_later_backward() -> None:
    torch.manual_seed(0)
    model = create_model("fastervit_micro", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    # Eval mode with gradients: attribution into the weights ...
    logits = model(x)
    logits.sum().backward()
    assert torch.allclose(logits, expected, atol=1e-6)
    assert model.levels[2].blocks[0].attn.pos_emb_funct.cpb_mlp[0].weight.grad.abs().sum() > 0
    # ... and into the input of a frozen model, which reuses the cached terms.
    model.requires_grad_(False)
    with torch.inference_mode():
        model(x)
    image = x.clone().requires_grad_(True)
    model(image).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
