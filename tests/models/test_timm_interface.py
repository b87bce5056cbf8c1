"""timm's generic model properties, for every registered variant: default config, unpooled
heads, torch.fx tracing. The big variants are built on the meta device (shapes only) or only
traced; the small ones also run, at 32-64 px."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import fvlab.models  # noqa: F401 - importing the models module registers them with timm
from fvlab.models import ArchConfig, create_model, list_variants

SMALL = ["fastervit_tiny", "fastervit_micro"]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """timm's FX path: graph node names, then a feature extractor returning the logits node."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes[-1] == eval_nodes[-1] == "head"
    return create_feature_extractor(model, return_nodes=["head"])


def _fx_graph(model: torch.nn.Module) -> torch.fx.Graph:
    """One symbolic trace with timm's leaf modules and functions (what its FX tools use)."""
    from timm.layers._fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer(leaf_modules=get_notrace_modules(),
                            autowrap_functions=get_notrace_functions())
    return tracer.trace(model)


# FasterViT's variants; the hat_swin_* ones are timm's Swin, checked against timm in test_swin.py.
FASTERVIT = [name for name in list_variants() if name.startswith("fastervit_")]


@pytest.mark.parametrize("name", FASTERVIT)
def test_default_cfg_unpooled_head_and_fx_trace(name: str) -> None:
    # Built on the meta device: tensors carry shapes only, so even FasterViT-6 at its input
    # size costs no arithmetic, and symbolic tracing runs no kernels at all.
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=0, global_pool="").eval()  # timm: no head, no pooling
        cfg = model.pretrained_cfg
        assert model.num_classes == 0 and model.global_pool == "" and isinstance(model.head, torch.nn.Identity)
        unpooled = torch.empty(2, model.num_features, *cfg["pool_size"])
        assert model.forward_head(unpooled).shape == unpooled.shape
        model.reset_classifier(cfg["num_classes"], global_pool="avg")
    assert cfg["architecture"] == name
    assert cfg["num_classes"] == model.num_classes == 1000
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, torch.nn.Conv2d) and first.in_channels == cfg["input_size"][0]
    head = model.get_submodule(cfg["classifier"])
    assert isinstance(head, torch.nn.Linear) and head.out_features == cfg["num_classes"]
    assert head is model.get_classifier()
    assert tuple(model.feature_sizes(cfg["input_size"][1:])[-1]) == tuple(cfg["pool_size"])
    graph = _fx_graph(model)  # symbolic tracing runs no kernels
    assert any(node.op == "call_module" and node.target.endswith("hat_attn.qkv") for node in graph.nodes)
    shape = (2, model.num_features, *cfg["pool_size"])
    if name in ("fastervit_0", *SMALL):
        features = model.forward_features(torch.empty(2, *cfg["input_size"], device="meta"))
        assert features.shape == shape
    else:  # the big variants are not run: their code paths are FasterViT-0's
        features = torch.empty(shape, device="meta")
    assert model.forward_head(features).shape == (2, 1000)

    model.reset_classifier(0, global_pool="")  # timm: no head, no pooling
    assert model.global_pool == "" and model.num_classes == 0
    assert model.forward_head(features).shape == features.shape
    assert model.forward_head(features, pre_logits=True).shape == features.shape
    model.reset_classifier(0, global_pool="avg")
    assert model.forward_head(features).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="num_classes=0"):
        model.reset_classifier(5, global_pool="")
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(0, global_pool="max")


@pytest.mark.parametrize("name", SMALL)
def test_fvlab_timm_and_an_experiment_build_the_same_model(name: str) -> None:
    # One factory behind fvlab.models.create_model, timm.create_model and an experiment's model.arch.
    built = []
    for build in (lambda: create_model(name), lambda: timm.create_model(name),
                  lambda: ArchConfig(name=name).build()):
        torch.manual_seed(0)
        built.append(build())
    ours = built[0]
    for other in built[1:]:
        assert type(other) is type(ours) and other.pretrained_cfg == ours.pretrained_cfg
        state = other.state_dict()
        assert state.keys() == ours.state_dict().keys()
        assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("name", SMALL)
def test_unpooled_head_gives_the_values_pooling_averages(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=4).eval()
    x = torch.randn(2, 3, 48, 64)  # non-square, padded to whole windows
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0, global_pool="")
        unpooled = model(x)
    assert unpooled.ndim == 4 and torch.allclose(unpooled.mean((2, 3)), pooled, atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_fx_traced_model_matches_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    traced = _fx_model(copy.deepcopy(model))
    x = torch.randn(2, 3, 48, 64)  # non-square, padded to whole windows
    model.eval(), traced.eval()
    with torch.no_grad():
        assert torch.equal(traced(x)["head"], model(x))
        x_small = torch.randn(3, 3, 32, 32)
        assert torch.equal(traced(x_small)["head"], model(x_small))
    model.train(), traced.train()
    for net in (model, traced):
        out = net(x)
        (out["head"] if isinstance(out, dict) else out).square().sum().backward()
    grads = {n: p.grad for n, p in traced.named_parameters()}
    assert grads  # the traced module shares the parameter names
    for n, p in model.named_parameters():
        assert grads[n] is not None and torch.allclose(grads[n], p.grad, atol=1e-5), n


@pytest.mark.parametrize("name", SMALL)
def test_fx_feature_extractor_returns_stage_maps(name: str) -> None:
    model = create_model(name).eval()
    extractor = create_feature_extractor(model, return_nodes={f"levels.{i}": f"stage{i}" for i in range(4)})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = extractor(x)
        _, expected = model.forward_intermediates(x)
    # levels.i is the stage with its downsample: stage i's map, halved, with twice the channels.
    for i in range(3):
        assert maps[f"stage{i}"].shape[1:] == expected[i + 1].shape[1:]
    assert torch.allclose(maps["stage3"], expected[3], atol=1e-6)
