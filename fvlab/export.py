"""ONNX export of a model (FasterViT, ``hat_swin_*``) with dynamic batch, height and width (a model
built for one image size: dynamic batch), and its ONNX Runtime check.

The graph comes from torch's dynamo-based exporter (``torch.onnx.export(dynamo=True)``, which
needs ``onnxscript``): the model pads to whole windows and pools carrier tokens with sizes
read from the input, so one graph takes every size the PyTorch model takes. The export runs
on a fused (BatchNorm folded), fp32 copy; the caller's model is left as it was.

Library first: :func:`export_onnx`, :func:`check_onnx` and :func:`ort_session` are what
``fvlab export`` calls, and what a measurement of the ONNX Runtime backend can call.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["DEFAULT_OPSET", "EXPORT_PACKAGES", "INSTALL_HINT", "MissingExportPackages",
           "check_onnx", "export_onnx", "missing_export_packages", "ort_session", "parity_sizes",
           "fixed_image_size"]

DEFAULT_OPSET = 18
EXPORT_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
INSTALL_HINT = "pip install 'fvlab[export]'"
EXPORTER = "torch.onnx.export(dynamo=True)"
# A single .onnx file holds at most 2 GB (protobuf); bigger models keep weights beside it.
_SINGLE_FILE_BYTES = 1_800_000_000


class MissingExportPackages(ImportError):
    """onnx, onnxruntime or onnxscript is not installed."""


def missing_export_packages() -> list[str]:
    """The packages of the ``export`` extra that cannot be imported."""
    missing = []
    for name in EXPORT_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _require_export_packages() -> None:
    missing = missing_export_packages()
    if missing:
        raise MissingExportPackages(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


def _needs_padding(model: torch.nn.Module, size: tuple[int, int]) -> bool:
    """Whether some window-attention stage pads its feature map to whole windows at ``size``."""
    return any(stage.map_size[0] % stage.window[0] or stage.map_size[1] % stage.window[1]
               for stage in model.window_geometry(size))


def fixed_image_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The one (height, width) a model takes, or None (any).

    timm's convention for models built for one input size (Swin, ViT): ``dynamic_img_size`` off and
    the size in ``patch_embed.img_size``; a model without that attribute takes any size its
    ``check_image_size`` accepts.
    """
    if getattr(model, "dynamic_img_size", True):
        return None
    return tuple(model.patch_embed.img_size)


def parity_sizes(model: torch.nn.Module, image_size: int) -> list[tuple[int, int]]:
    """Three (height, width) sizes to check an export at: ``image_size`` square, a non-square
    one, and one whose feature maps need padding to whole windows (a multiple of 16 above);
    a model of one fixed size is checked at that size only."""
    model.check_image_size(image_size)
    if fixed_image_size(model) is not None:
        return [fixed_image_size(model)]
    padded = next(s for s in range(16 * (image_size // 16 + 1), 16 * image_size + 17, 16)
                  if _needs_padding(model, (s, s)))
    return [(image_size, image_size), (image_size, padded), (padded, padded)]


def _example_size(model: torch.nn.Module) -> tuple[int, int]:
    """A non-square example size whose feature maps are whole windows, at least two per side, in
    every window-attention stage: the two smallest multiples of every stage's window span (stride
    x window) at or above twice the largest span.

    The exporter specialises any size that is 0 or 1 in the example (and equal sizes to each
    other), which would tie the graph to that geometry.
    """
    # Strides and windows do not depend on the input size; 64 only names one.
    spans = [stage.stride * side for stage in model.window_geometry(64) for side in stage.window]
    if not spans:
        return 64, 96
    step = math.lcm(*spans)
    height = step * -(-2 * max(spans) // step)
    return height, height + step


def _prepared(model: torch.nn.Module) -> torch.nn.Module:
    """A fused fp32 eval copy of ``model`` on the CPU (BatchNorm folded into convs and head)."""
    prepared = copy.deepcopy(model).float().cpu().eval()
    return prepared if getattr(prepared, "fused", True) else prepared.fuse()


def export_onnx(model: torch.nn.Module, path: str | Path, opset: int = DEFAULT_OPSET,
                image_size: tuple[int, int] | None = None) -> Path:
    """Export ``model`` (fused, fp32) to ONNX at ``path`` with dynamic batch, height and width.

    Input ``image`` (batch, in_chans, height, width) float32; output ``logits``. The file is
    written as it comes from the exporter; check it with :func:`check_onnx` before trusting it.
    With ``image_size`` the graph takes that size only (batch still dynamic): exported in a
    fraction of the time, for measuring one geometry (``fvlab profile --backend onnxruntime``).
    A model built for one image size (``hat_swin_*``, as timm's Swin) is exported at that size.
    """
    _require_export_packages()
    path = Path(path)
    prepared = _prepared(model)
    image_size = image_size or fixed_image_size(prepared)
    height, width = image_size or _example_size(prepared)
    example = torch.randn(2, prepared.in_chans, height, width)
    side = torch.export.Dim.DYNAMIC  # an error, not a silent constant, if a side would be fixed
    dynamic = ({0: torch.export.Dim("batch", min=1)} if image_size else
               {0: torch.export.Dim("batch", min=1), 2: side, 3: side},)
    big = sum(p.numel() * p.element_size() for p in prepared.parameters()) > _SINGLE_FILE_BYTES
    with torch.no_grad():
        program = torch.onnx.export(
            prepared, (example,), input_names=["image"], output_names=["logits"],
            dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False,
            optimize=True)
    program.save(str(path), external_data=big)
    return path


def ort_session(path: str | Path, providers: Sequence[str] | None = None,
                threads: int | None = None) -> Any:
    """An ONNX Runtime InferenceSession of an exported file (default: the CPU provider,
    torch's thread count)."""
    _require_export_packages()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), sess_options=options,
                                providers=list(providers or ["CPUExecutionProvider"]))


def check_onnx(path: str | Path, model: torch.nn.Module, sizes: Sequence[tuple[int, int]],
               batch_sizes: Sequence[int] = (1, 3), seed: int = 0) -> list[dict[str, Any]]:
    """Run the exported file in ONNX Runtime and ``model`` in PyTorch (fp32, eval) on the same
    random images; one row per batch size and size with the max abs difference of the logits."""
    session = ort_session(path)
    reference = copy.deepcopy(model).float().cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for height, width in sizes:
        for batch in batch_sizes:
            images = torch.randn(batch, reference.in_chans, height, width, generator=generator)
            with torch.no_grad():
                expected = reference(images)
            (got,) = session.run(["logits"], {"image": images.numpy()})
            diff = (torch.from_numpy(got) - expected).abs().max().item()
            rows.append(dict(batch=batch, height=height, width=width,
                             max_abs_diff=diff if math.isfinite(diff) else float("inf")))
    return rows


def remove_onnx(path: str | Path) -> None:
    """Delete an exported file and any external-data file saved beside it."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".data")):
        if candidate.exists():
            os.remove(candidate)


def onnxruntime_runner(model: torch.nn.Module, input_shape: Sequence[int], device: torch.device | None = None,
                       directory: str | Path | None = None) -> Callable[[torch.Tensor], Any]:
    """``model`` exported and loaded in ONNX Runtime, as a callable on torch tensors (``fvlab profile
    --backend onnxruntime``): the CUDA provider for a CUDA device where installed, else the CPU one."""
    import tempfile

    _require_export_packages()
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device is not None and torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("--backend onnxruntime on CUDA needs onnxruntime-gpu (the CUDA provider)")
        providers = ["CUDAExecutionProvider", *providers]
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = export_onnx(model.float().cpu(), Path(tmp) / "model.onnx", image_size=tuple(input_shape[-2:]))
        session = ort_session(path, providers)  # reads the file now: the directory may go
    name = session.get_inputs()[0].name
    inputs: dict[int, Any] = {}

    def run(x: torch.Tensor) -> Any:
        # Converted once per input tensor: the timed loop measures the session, not the copy.
        key = x.data_ptr()
        if key not in inputs:
            inputs[key] = x.detach().float().cpu().contiguous().numpy()
        return session.run(None, {name: inputs[key]})

    return run
