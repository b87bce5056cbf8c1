"""timm's generic model checks, as timm's own tests/test_models.py runs them on its models, for
fvlab's registered models: forward and backward, default cfgs with unpooled and pooled heads
(``reset_classifier``, ``create_model(num_classes=0, global_pool='')``), ``forward_intermediates``,
feature extraction (``features_only``), and torch.fx forward (bit-identical to eager) and backward.

Input sizes are smaller than timm's targets so that the module runs in seconds: fastervit_micro
and _tiny at their own 32 and 64 px, fastervit_0 at 64 px (stage 3's map is then one 7x7 window,
the one-window rule's other side, which micro covers at 32 px) and, shapes only, at its 224 px on
the meta device. ``hat_swin_*`` is timm's Swin at 16 px with HAT in both stages: four windows in
stage 1, one in stage 2.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import fvlab.models  # noqa: F401 - importing the models module registers them with timm
from fvlab.models import list_variants

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SWIN = "hat_swin_tiny_patch4_window7_224"
# timm's create_model arguments of each checked model, and the input size it runs at.
CASES = {
    "fastervit_micro": ({}, (3, 32, 32)),
    "fastervit_tiny": ({}, (3, 64, 64)),
    "fastervit_0": ({}, (3, 64, 64)),
    SWIN: (dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=2, img_size=16, hat=True,
                ct_size=1, do_propagation=True,
                pretrained_cfg_overlay=dict(input_size=(3, 16, 16), pool_size=(2, 2))), (3, 16, 16)),
}
NAMES = list(CASES)


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**CASES[name][0], **kwargs})


_BUILT: dict[tuple, torch.nn.Module] = {}


@pytest.fixture(scope="module", autouse=True)
def _forget_built_models():
    yield
    _BUILT.clear()


def _shared(name: str, **kwargs) -> torch.nn.Module:
    """``_create(name, **kwargs)``, built once for the tests that leave it as they found it
    (initialising fastervit_0's weights takes about a second)."""
    key = (name, *sorted(kwargs.items()))
    if key not in _BUILT:
        _BUILT[key] = _create(name, **kwargs)
    return _BUILT[key]


def _input(name: str, batch_size: int = 1) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch_size, *CASES[name][1])


def _create_fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's test helper: trace with timm's leaf modules and functions, return the output node(s)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-graph_node_names.index(name)] for name in output_node_names]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes, tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_and_grad_checkpointing(name: str) -> None:
    model = _shared(name).eval()
    x = _input(name)
    with torch.no_grad():
        outputs = model(x)
        assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()
        model.set_grad_checkpointing()
        try:
            assert torch.allclose(outputs, model(x), rtol=1e-4, atol=1e-5)
        finally:
            model.set_grad_checkpointing(False)


@pytest.mark.parametrize("name", NAMES)
def test_model_backward_reaches_every_parameter(name: str) -> None:
    model = _shared(name, num_classes=42).train()
    model.zero_grad(set_to_none=True)
    num_params = sum(p.numel() for p in model.parameters())
    outputs = model(_input(name, batch_size=2))
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert sum(p.grad.numel() for p in model.parameters()) == num_params
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()
    model.zero_grad(set_to_none=True)


def _check_default_cfg(name: str, device: str) -> None:
    """timm's test_model_default_cfgs at the cfg's own input size (on ``device``)."""
    with torch.device(device):
        model = _create(name).eval()
        cfg = model.default_cfg
        pool_size, x = cfg["pool_size"], torch.randn(1, *cfg["input_size"])
        output_fmt = getattr(model, "output_fmt", "NCHW")
        spatial_axis, feat_axis = get_spatial_dim(output_fmt), get_channel_dim(output_fmt)
        assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
        with torch.no_grad():
            outputs = model.forward_features(x)
            outputs_pre = model.forward_head(outputs, pre_logits=True)
            assert tuple(outputs.shape[i] for i in spatial_axis) == tuple(pool_size)
            assert outputs.shape[feat_axis] == model.num_features
            assert outputs_pre.shape[1] == model.head_hidden_size
            model.reset_classifier(0)  # pooled features
            assert model.num_classes == 0
            outputs = model(x)
            assert outputs.shape == outputs_pre.shape == (1, model.head_hidden_size)
            model.reset_classifier(0, "")  # no pooling either
            outputs = model(x)
            assert outputs.ndim == 4 and tuple(outputs.shape[i] for i in spatial_axis) == tuple(pool_size)
            # The same without a head, asked of the constructor.
            model = _create(name, num_classes=0, global_pool="").eval()
            outputs = model(x)
            assert outputs.ndim == 4 and tuple(outputs.shape[i] for i in spatial_axis) == tuple(pool_size)
    state_dict = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state_dict
    with torch.device("meta"):
        assert f"{cfg['classifier']}.weight" in _create(name).state_dict()


@pytest.mark.parametrize("name", ["fastervit_micro", "fastervit_tiny", SWIN])
def test_model_default_cfgs(name: str) -> None:
    _check_default_cfg(name, "cpu")


def test_model_default_cfgs_of_fastervit_0_at_224_shapes_only() -> None:
    _check_default_cfg("fastervit_0", "meta")


@pytest.mark.parametrize("name", [n for n in list_variants() if n.startswith("hat_swin_")])
def test_every_hat_swin_builds_without_head_and_pooling(name: str) -> None:
    # FasterViT's variants: test_timm_interface.py builds each this way.
    with torch.device("meta"):  # shapes only
        model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()
        features = torch.empty(1, *model.default_cfg["pool_size"], model.num_features)  # NHWC
    assert model.num_classes == 0 and model.global_pool == ""
    assert model.forward_head(features).shape == features.shape


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_intermediates(name: str) -> None:
    model = _shared(name).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    channels, reductions = feature_info.channels(), feature_info.reduction()
    x = _input(name)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(intermediates) == len(channels) >= 2
        for c, r, o in zip(channels, reductions, intermediates):
            assert o.shape[1] == c and o.shape[0] == 1 and not torch.isnan(o).any()
            assert o.shape[2] <= math.ceil(x.shape[2] / r) + 1 and o.shape[3] <= math.ceil(x.shape[3] / r) + 1
        assert torch.allclose(output, model.forward_features(x))
        model.set_grad_checkpointing()
        try:
            again, _ = model.forward_intermediates(x, output_fmt="NCHW")
        finally:
            model.set_grad_checkpointing(False)
        assert torch.allclose(output, again, rtol=1e-4, atol=1e-5)


# FasterViT's feature_cfg makes the getter (forward_intermediates) its default; Swin's is timm's hooks.
@pytest.mark.parametrize("name, feature_cls", [(n, None) for n in NAMES] + [(SWIN, "getter")])
def test_model_forward_features(name: str, feature_cls: str | None) -> None:
    extra = {} if feature_cls is None else {"feature_cls": feature_cls}
    model = _create(name, features_only=True, **extra).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    x = _input(name)
    with torch.no_grad():
        outputs = model(x)
    output_fmt = getattr(model, "output_fmt", "NCHW") if feature_cls is None else "NCHW"
    feat_axis, spatial_axis = get_channel_dim(output_fmt), get_spatial_dim(output_fmt)
    assert len(outputs) == len(channels) >= 2
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[feat_axis] == c and o.shape[0] == 1 and not torch.isnan(o).any()
        for axis, size in zip(spatial_axis, x.shape[2:]):
            assert o.shape[axis] <= math.ceil(size / r) + 1


# Each case's size, and for the small FasterViTs a non-square batch padded to whole windows (at
# 48x64 micro's stage 3 spans several windows, tiny's stage 4 one).
@pytest.mark.parametrize("name, size", [(n, None) for n in NAMES]
                         + [(n, (3, 48, 64)) for n in ("fastervit_micro", "fastervit_tiny")])
def test_model_forward_fx_equals_eager_exactly(name: str, size: tuple[int, ...] | None) -> None:
    model = _shared(name).eval()
    x = _input(name) if size is None else torch.randn(2, *size)
    with torch.inference_mode():
        outputs = model(x)
        fx_outputs = torch.cat(tuple(_create_fx_model(model)(x).values()))
    assert torch.all(fx_outputs == outputs)
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", NAMES)
def test_model_backward_fx_reaches_every_parameter(name: str) -> None:
    model = _shared(name, num_classes=42).train()
    model.zero_grad(set_to_none=True)
    num_params = sum(p.numel() for p in model.parameters())
    fx_model = _create_fx_model(model, train=True)
    outputs = torch.cat(tuple(fx_model(_input(name, batch_size=2)).values()))
    outputs.mean().backward()
    for n, p in fx_model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert sum(p.grad.numel() for p in fx_model.parameters() if p.grad is not None) == num_params
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()
    model.zero_grad(set_to_none=True)
