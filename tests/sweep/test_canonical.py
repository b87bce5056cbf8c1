"""The canonical form of a network (fvlab.sweep.canonical; the sweep's key, fvlab.sweep.objective):
configs with one canonical form build one network, at the image size the data gives."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- one training per distinct model: the canonical form ------------------------------------


def test_configs_with_one_canonical_form_build_the_same_network() -> None:
    import torch

    from fvlab.models import create_model
    from fvlab.sweep.canonical import canonical_arch

    # HAT off: ct_size, propagation and the conv stages' windows change nothing; 2 equals [2, 2, 2, 2].
    a = create_model("fastervit_micro", hat=False, ct_size=1, window_size=2, num_classes=4)
    b = create_model("fastervit_micro", hat=False, ct_size=2, window_size=[4, 4, 2, 2], do_propagation=True,
                     num_classes=4)
    assert canonical_arch(a) == canonical_arch(b)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    # Forms that differ build networks that differ.
    c = create_model("fastervit_micro", ct_size=1, num_classes=4)
    d = create_model("fastervit_micro", ct_size=2, num_classes=4)
    e = create_model("fastervit_micro", ct_size=1, window_size=[2, 2, 1, 2], num_classes=4)
    forms = [canonical_arch(m) for m in (a, c, d, e)]
    assert all(forms[i] != forms[j] for i in range(4) for j in range(i))
    with pytest.raises(RuntimeError):
        a.load_state_dict(c.state_dict())  # carrier-token weights a does not have


def test_canonical_form_at_an_image_size_ignores_carrier_tokens_of_one_window_stages() -> None:
    import types

    import torch

    from fvlab.models import create_model
    from fvlab.sweep.canonical import canonical_arch
    from fvlab.sweep.objective import canonical_key

    # 32 px: stage 3's 2x2 map is one 2x2 window, so no carrier tokens there (the official rule):
    # ct_size 1 or 2, propagation on or off, are one model; HAT off is another (no HAT weights).
    c = create_model("fastervit_micro", ct_size=1, num_classes=4)
    d = create_model("fastervit_micro", ct_size=2, do_propagation=True, num_classes=4)
    off = create_model("fastervit_micro", hat=False, num_classes=4)
    assert canonical_arch(c, 32) == canonical_arch(d, 32) != canonical_arch(off, 32)
    assert {k: v.shape for k, v in c.state_dict().items()} == {k: v.shape for k, v in d.state_dict().items()}
    d.load_state_dict(c.state_dict())
    torch.manual_seed(0)
    small, large = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(c.eval()(small), d.eval()(small))
        # 64 px: 4x4 map, four windows with carrier tokens: different forms, different outputs.
        assert canonical_arch(c, 64) != canonical_arch(d, 64)
        assert not torch.allclose(c(large), d(large), atol=1e-4)
    # A window of 1 at stage 3 gives it four windows at 32 px: carrier tokens count again.
    e = create_model("fastervit_micro", ct_size=1, window_size=[2, 2, 1, 2], num_classes=4)
    f = create_model("fastervit_micro", ct_size=1, window_size=[2, 2, 1, 2], do_propagation=True, num_classes=4)
    assert canonical_arch(e, 32) != canonical_arch(f, 32)
    f.load_state_dict(e.state_dict())
    with torch.no_grad():
        assert not torch.allclose(e.eval()(small), f.eval()(small), atol=1e-4)
    # The sweep's key reads the image size from the data module.
    def spec(network, image_size):
        config = {"model": {"arch": {"name": "fastervit_micro"}}, "data": {"image_size": image_size}}
        return types.SimpleNamespace(config=config, model=types.SimpleNamespace(model=network),
                                     datamodule=types.SimpleNamespace(image_size=image_size))
    assert canonical_key(spec(c, 32)) == canonical_key(spec(d, 32)) != canonical_key(spec(off, 32))
    assert canonical_key(spec(c, 64)) != canonical_key(spec(d, 64))
