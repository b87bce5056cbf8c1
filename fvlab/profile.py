"""Parameters, FLOPs (fvcore) and measured throughput: the same three figures for every model.

FLOPs follow fvcore's convention, the one of the FasterViT paper's table: one multiply-add
counts as one FLOP. What is counted is the inference cost per image: the position-bias and
position-embedding MLPs depend only on the geometry, so in eval mode they are computed once
and cached, and a traced eval forward does not count them.

Throughput has one protocol, ``measure_side_by_side``: the paper's and timm's benchmark (eval,
inference mode, BatchNorm folded, warm-up, synchronisation around timing) timed in interleaved
rounds, medians with their 95% intervals. ``model_metrics`` times one network the same way.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from fvlab.metrics import (GFLOPS, LATENCY_MS, PARAMS_BUILT_M, PARAMS_M, SPEEDUP, THROUGHPUT, THROUGHPUT_HI,
                           THROUGHPUT_LO)

__all__ = ["SideBySide", "BACKENDS", "SINGLE_ROUNDS", "count_params", "count_flops", "flop_breakdown",
           "measure_side_by_side", "median_interval",
           "default_benchmark_settings", "model_metrics", "autocast_for_precision"]


def count_params(model: nn.Module, image_size: int | Sequence[int] | None = None) -> int:
    """Number of parameters (shared ones counted once); with ``image_size``, only those an input of that
    size uses (a model's ``idle_parameters(image_size)``, e.g. FasterViT's carrier-token weights of a
    stage that is one window there, are left out; a supernet's ``used_parameter_count``, whose narrow
    subnets use parts of tensors)."""
    used = getattr(model, "used_parameter_count", None)
    if image_size is not None and callable(used):
        return int(used(image_size))
    idle = getattr(model, "idle_parameters", None)
    unused = {id(p) for p in idle(image_size)} if image_size is not None and callable(idle) else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in unused)


# ---- FLOPs ---------------------------------------------------------------------------


def _fvcore() -> Any:
    # fvcore scripts a loss function at import, which torch now flags as deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import fvcore.nn
        import fvcore.nn.jit_handles
    return fvcore.nn


def _shape(value: Any) -> list[int]:
    return _fvcore().jit_handles.get_shape(value)


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """aten::scaled_dot_product_attention: q @ k^T plus attn @ v, per head and sequence."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    batch = math.prod(q[:-2])
    n, d_qk = q[-2], q[-1]
    m, d_v = k[-2], v[-1]
    return batch * n * m * d_qk + batch * n * m * d_v


def avg_pool_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """aten::avg_pool2d: one addition per input element of each output's kernel window."""
    in_shape, out_shape = _shape(inputs[0]), _shape(outputs[0])
    kernel = inputs[1].toIValue()
    if kernel is None:
        # Traced from the input size (as our carrier-token pooling is): estimate the kernel
        # as the input/output ratio per axis.
        kernel = [math.ceil(i / o) for i, o in zip(in_shape[-2:], out_shape[-2:])]
    # A kernel computed from the traced input size comes back as 0-dim tensors.
    kernel = [int(k) for k in kernel] if isinstance(kernel, (list, tuple)) else [int(kernel)]
    if len(kernel) == 1:
        kernel = kernel * 2
    return math.prod(out_shape) * kernel[0] * kernel[1]


def reduce_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """aten::mean and similar reductions: one FLOP per input element (as adaptive_avg_pool2d)."""
    return math.prod(_shape(inputs[0]))


_EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::avg_pool2d": avg_pool_flop_jit,
    "aten::mean": reduce_flop_jit,
}

# Element-wise and scalar ops: not counted under fvcore's (and the paper's) convention, and
# silenced so that no unsupported-operator warning reaches the user for our own model.
_UNCOUNTED_OPS = ("aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_",
                  "aten::div", "aten::div_", "aten::neg", "aten::gelu", "aten::gelu_",
                  "aten::softmax", "aten::sigmoid", "aten::silu", "aten::silu_", "aten::exp",
                  "aten::log2", "aten::abs", "aten::sign", "aten::index_select", "aten::pad",
                  "aten::ceil", "aten::sum", "aten::linspace", "aten::meshgrid")


def flop_breakdown(model: nn.Module, image_size: int | Sequence[int] = 224,
                   in_chans: int | None = None, device: str | torch.device | None = None,
                   quiet_unsupported: bool = False) -> dict[str, int]:
    """FLOPs of one image per operator kind (``conv``, ``linear``, ``scaled_dot_product_attention`` ...)."""
    FlopCountAnalysis = _fvcore().FlopCountAnalysis
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    in_chans = in_chans or getattr(model, "in_chans", 3)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        x = _random_input((1, in_chans, h, w), device)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape logic
            model(x)  # fills the eval-mode caches of geometry-only terms
            analysis = FlopCountAnalysis(model, x)
            for op, handle in _EXTRA_HANDLES.items():
                analysis.set_op_handle(op, handle)
            for op in _UNCOUNTED_OPS:
                analysis.set_op_handle(op, None)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            by_operator = dict(analysis.by_operator())
        unsupported = analysis.unsupported_ops()
    finally:
        model.train(was_training)
    if unsupported and not quiet_unsupported:
        warnings.warn("fvcore counted 0 FLOPs for ops it has no handle for: "
                      + summarize_unsupported(unsupported), stacklevel=3)
    return by_operator


def count_flops(model: nn.Module, image_size: int | Sequence[int] = 224,
                in_chans: int | None = None, device: str | torch.device | None = None,
                quiet_unsupported: bool = False) -> float:
    """GFLOPs of one image at ``image_size`` (one multiply-add = one FLOP), inference path."""
    return sum(flop_breakdown(model, image_size, in_chans, device, quiet_unsupported).values()) / 1e9


def _random_input(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # A private generator: profiling inside a training run must not shift the global RNG,
    # or a resumed run would no longer match an uninterrupted one.
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(device)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ---- Throughput ----------------------------------------------------------------------


def default_benchmark_settings(device: torch.device) -> dict[str, Any]:
    """The paper's setting on CUDA (batch 128, channels_last); a batch that times in milliseconds on a CPU."""
    if device.type == "cuda":
        return dict(batch_size=128, channels_last=True, warmup=10)
    return dict(batch_size=32, channels_last=True, warmup=2)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _prepare_for_inference(model: nn.Module, device: torch.device, channels_last: bool,
                           fuse: bool) -> nn.Module:
    model = copy.deepcopy(model).to(device).eval()
    if fuse and hasattr(model, "fuse"):
        model.fuse()  # BatchNorm folded into convs: what an inference deployment runs
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def summarize_unsupported(unsupported: Counter) -> str:
    """One line naming the ops fvcore could not count."""
    return ", ".join(f"{op} x{n}" for op, n in sorted(unsupported.items()))


def autocast_for_precision(precision: str | None) -> tuple[bool, torch.dtype | None]:
    """(amp, dtype) that inference under a Lightning ``precision`` setting runs with."""
    text = str(precision or "32")
    if text.startswith("bf16"):
        return True, torch.bfloat16
    if text.startswith("16"):
        return True, torch.float16
    return False, None


# Rounds of a network timed on its own (``model_metrics``): one network has no interleaving to
# average over, so a few rounds give its median and interval in about three seconds on a CPU.
SINGLE_ROUNDS = 10
ROUNDS_ENV = "FVLAB_PROFILE_ROUNDS"  # the rounds of every measurement, where set (the tests' quick protocol)


def model_metrics(network: nn.Module, image_size: int | Sequence[int], *, in_chans: int | None = None,
                  device: str | torch.device | None = None, precision: str | None = None,
                  throughput: bool = True, batch_size: int | None = None,
                  repeats: int | None = None) -> dict[str, float | None]:
    """Params, GFLOPs, throughput (with its interval) and latency of one network, timed as
    ``measure_side_by_side`` times (``repeats`` rounds, default ``SINGLE_ROUNDS``); a failed
    measurement is None with a warning."""
    device_type = torch.device(device).type if device is not None else "cpu"
    # Measuring inside a run must leave every generator as it was: the run trains the same
    # whether or not its architecture was measured earlier (seeds of a variant share one measurement).
    cuda = [torch.device(device).index or 0] if device_type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        return _model_metrics(network, image_size, in_chans=in_chans, device=device, precision=precision,
                              throughput=throughput, batch_size=batch_size, repeats=repeats)


def _model_metrics(network: nn.Module, image_size: int | Sequence[int], *, in_chans: int | None,
                   device: str | torch.device | None, precision: str | None, throughput: bool,
                   batch_size: int | None, repeats: int | None) -> dict[str, float | None]:
    device_type = (torch.device(device) if device is not None else _model_device(network)).type
    metrics: dict[str, float | None] = dict.fromkeys(
        (PARAMS_M, GFLOPS, THROUGHPUT, LATENCY_MS))
    metrics[PARAMS_M] = count_params(network, image_size) / 1e6
    metrics[PARAMS_BUILT_M] = count_params(network) / 1e6
    try:
        metrics[GFLOPS] = count_flops(network, image_size, in_chans=in_chans)
    except Exception as err:  # a measurement never fails a run
        warnings.warn(f"FLOP count failed, recorded as null: {type(err).__name__}: {err}", stacklevel=2)
    if not throughput:
        return metrics
    try:
        result = measure_side_by_side({"model": network}, image_size, batch_size=batch_size, device=device,
                                      precision=precision, in_chans=in_chans,
                                      rounds=repeats or (None if os.environ.get(ROUNDS_ENV) else SINGLE_ROUNDS))["model"]
        metrics.update({k: v for k, v in result.metrics().items() if k != SPEEDUP})  # a speedup over itself
    except Exception as err:  # out of memory, an unsupported dtype on this device ...
        warnings.warn(f"throughput measurement failed, recorded as null: "
                      f"{type(err).__name__}: {err}", stacklevel=2)
    finally:
        if device_type == "cuda":
            torch.cuda.empty_cache()  # after an out-of-memory too: the run trains on an unfragmented cache
    return metrics


# ---- Side by side ---------------------------------------------------------------------
#
# On a shared machine the speed available to one process moves 10-30% from one second to the
# next, so a figure measured alone ranks nothing. The models being compared are therefore
# measured in interleaved rounds in one process (A B C, then B C A, ...), a whole round lasting
# about ``round_s`` (each model's slot ``round_s / n``); every figure is the median over rounds
# with a distribution-free 95% interval, and a speedup is the median of per-round ratios, so a
# burst of load that slows one round slows both sides of its ratio. Rounds are short because
# bursts last 0.2-1.5 s: a short round mostly falls wholly inside or outside one, while a long
# one lets a burst slow one side of a ratio only (measurements: docs/performance.md).

BACKENDS = ("eager", "compile", "onnxruntime")
CONFIDENCE = 0.95


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(median, lo, hi): the median and its distribution-free interval from order statistics."""
    from scipy import stats

    if not values:
        raise ValueError("no values")
    median = statistics.median(values)
    # The binomial interval [x_(k), x_(n-k+1)] of the median (scipy's quantile test, p = 1/2).
    interval = stats.quantile_test(values, q=median, p=0.5).confidence_interval(confidence)
    if math.isnan(interval.low) or math.isnan(interval.high):
        # Too few values for any pair of order statistics to reach ``confidence`` (n <= 5 at 95%):
        # scipy gives NaN; the range, the widest interval there is, still says how far rounds spread.
        return median, min(values), max(values)
    return median, float(interval.low), float(interval.high)


@dataclass
class SideBySide:
    """One model's figures from an interleaved measurement: medians over rounds with 95% intervals."""

    name: str
    images_per_s: float
    images_per_s_lo: float
    images_per_s_hi: float
    latency_ms: float | None
    latency_ms_lo: float | None
    latency_ms_hi: float | None
    speedup: float | None
    speedup_lo: float | None
    speedup_hi: float | None
    reference: str | None
    batch_size: int
    rounds: int
    device: str
    dtype: str
    channels_last: bool
    backend: str
    threads: int
    compile_s: float | None = None
    # Batch-1 latency relative to the reference's: median of per-round ratios, with its interval.
    latency_ratio: float | None = None
    latency_ratio_lo: float | None = None
    latency_ratio_hi: float | None = None

    def metrics(self) -> dict[str, float | None]:
        """The ``model/*`` figures of this comparison: throughput with its interval, latency and speedup."""
        return {THROUGHPUT: self.images_per_s, THROUGHPUT_LO: self.images_per_s_lo,
                THROUGHPUT_HI: self.images_per_s_hi, LATENCY_MS: self.latency_ms,
                SPEEDUP: self.speedup}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON."""
        return asdict(self)


def _compiled(model: nn.Module, x: torch.Tensor, autocast: Any) -> tuple[Any, float]:
    """``torch.compile`` (inductor) of a prepared model and the seconds its first calls took."""
    compiled = torch.compile(model, dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        compiled(x)
        compiled(x[:1])  # the batch-1 latency shape compiles now, not inside a timed round
    return compiled, time.perf_counter() - start


def _rounds_of(runners: dict[str, Any], inputs: dict[str, torch.Tensor], device: torch.device,
               autocast: Any, rounds: int, round_s: float, warmup: int) -> dict[str, list[float]]:
    """Images/s of every runner in each of ``rounds`` interleaved rounds of about ``round_s`` seconds
    (each runner's slot an equal share; the order rotated each round)."""
    names = list(runners)
    slot_s = round_s / len(names)
    calls: dict[str, int] = {}
    with torch.inference_mode(), autocast:
        for name in names:  # warm-up, and how many calls fill one slot
            x = inputs[name]
            for _ in range(max(warmup, 1)):
                runners[name](x)
            _synchronize(device)
            start = time.perf_counter()
            runners[name](x)
            _synchronize(device)
            calls[name] = max(1, round(slot_s / max(time.perf_counter() - start, 1e-6)))
        rates: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                x, n = inputs[name], calls[name]
                _synchronize(device)
                start = time.perf_counter()
                for _ in range(n):
                    runners[name](x)
                _synchronize(device)
                rates[name].append(n * len(x) / (time.perf_counter() - start))
    return rates


@dataclass(frozen=True)
class _Timing:
    """How measure_side_by_side times: its arguments, or the device's defaults where not given."""

    device: torch.device
    batch_size: int
    channels_last: bool
    warmup: int
    rounds: int
    round_s: float


def _check_models(models: Mapping[str, nn.Module], reference: str | None, backend: str) -> str:
    """The reference model's name (default: the first); ValueError for no models or unknown names."""
    if not models:
        raise ValueError("no models to measure")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    names = list(models)
    reference = reference if reference is not None else names[0]
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not among the models ({', '.join(names)})")
    return reference


def _resolve_timing(models: Mapping[str, nn.Module], device: str | torch.device | None, batch_size: int | None,
                    channels_last: bool | None, warmup: int | None, rounds: int | None,
                    round_s: float | None) -> _Timing:
    """The timing settings given, the rest from the device's defaults; ValueError if out of range."""
    device = torch.device(device) if device is not None else _model_device(models[next(iter(models))])
    defaults = default_benchmark_settings(device)
    batch_size = batch_size or defaults["batch_size"]
    channels_last = defaults["channels_last"] if channels_last is None else channels_last
    warmup = defaults["warmup"] if warmup is None else warmup
    rounds = rounds or int(os.environ.get(ROUNDS_ENV) or 60)
    round_s = round_s or float(os.environ.get("FVLAB_PROFILE_ROUND_S") or 0.2)
    if batch_size < 1 or rounds < 1 or warmup < 0 or round_s <= 0:
        raise ValueError(f"batch_size and rounds must be >= 1, warmup >= 0 and round_s > 0, got "
                         f"{batch_size}, {rounds}, {warmup}, {round_s}")
    return _Timing(device, batch_size, channels_last, warmup, rounds, round_s)


def _autocast_dtype(precision: str | None, device: torch.device, backend: str) -> tuple[bool, torch.dtype | None, str]:
    """(autocast on, its dtype, the results' dtype label) for ``precision`` on ``device`` and ``backend``."""
    amp, amp_dtype = autocast_for_precision(precision)
    if amp and amp_dtype is torch.float16 and device.type == "cpu":
        amp_dtype = torch.bfloat16
    if backend == "onnxruntime":
        amp = False  # the exported graph is fp32 (what the export checks against PyTorch)
    dtype = f"amp_{str(amp_dtype).removeprefix('torch.')}" if amp else "fp32"
    return amp, amp_dtype, dtype


def _input_shape(models: Mapping[str, nn.Module], image_size: int | Sequence[int] | Mapping[str, Any],
                 in_chans: int | Mapping[str, int] | None, name: str, n: int) -> tuple[int, ...]:
    """(n, channels, height, width) of model ``name``'s input; sizes and channels may be per model."""
    size = image_size[name] if isinstance(image_size, Mapping) else image_size
    h, w = (size, size) if isinstance(size, int) else size
    chans = in_chans[name] if isinstance(in_chans, Mapping) else in_chans
    return (n, chans or getattr(models[name], "in_chans", 3), h, w)


def _build_runners(models: Mapping[str, nn.Module], batches: dict[str, torch.Tensor],
                   shape: Callable[[str, int], tuple[int, ...]], timing: _Timing, backend: str, fuse: bool,
                   autocast: Callable[[], Any]) -> tuple[dict[str, Any], dict[str, float | None]]:
    """Every model prepared for inference on ``backend``, and the seconds each one's compile took."""
    runners: dict[str, Any] = {}
    compile_s: dict[str, float | None] = dict.fromkeys(models)
    for name in models:
        prepared = _prepare_for_inference(models[name], timing.device, timing.channels_last, fuse)
        if backend == "compile":
            prepared, compile_s[name] = _compiled(prepared, batches[name], autocast())
        elif backend == "onnxruntime":
            from fvlab.export import onnxruntime_runner

            prepared = onnxruntime_runner(prepared, shape(name, timing.batch_size), device=timing.device)
        runners[name] = prepared
    return runners, compile_s


def _summarize(name: str, reference: str, rates: dict[str, list[float]],
               lat_rates: dict[str, list[float]] | None, **fields: Any) -> SideBySide:
    """One model's medians and intervals over the rounds: throughput, speedup, latency, latency ratio."""
    tp = median_interval(rates[name])
    ratios = [a / b for a, b in zip(rates[name], rates[reference])]
    sp = median_interval(ratios)
    # Batch-1 latency: per-call seconds, so the interval's ends swap relative to the rates.
    lat = median_interval([1000.0 / r for r in lat_rates[name]]) if lat_rates else (None, None, None)
    lat_ratio = (median_interval([b / a for a, b in zip(lat_rates[name], lat_rates[reference])])
                 if lat_rates else (None, None, None))
    return SideBySide(
        name=name, images_per_s=tp[0], images_per_s_lo=tp[1], images_per_s_hi=tp[2],
        latency_ms=lat[0], latency_ms_lo=lat[1], latency_ms_hi=lat[2],
        speedup=sp[0], speedup_lo=sp[1], speedup_hi=sp[2], reference=reference,
        latency_ratio=lat_ratio[0], latency_ratio_lo=lat_ratio[1], latency_ratio_hi=lat_ratio[2], **fields)


def measure_side_by_side(models: Mapping[str, nn.Module], image_size: int | Sequence[int] | Mapping[str, Any] = 224,
                         *, reference: str | None = None, batch_size: int | None = None,
                         device: str | torch.device | None = None, precision: str | None = None,
                         in_chans: int | Mapping[str, int] | None = None, channels_last: bool | None = None,
                         rounds: int | None = None, round_s: float | None = None, warmup: int | None = None,
                         latency: bool = True, backend: str = "eager", fuse: bool = True) -> dict[str, SideBySide]:
    """Throughput (and batch-1 latency) of several models measured in interleaved rounds in this process.

    Each model is copied and prepared as a deployment runs it (eval, BatchNorm folded,
    channels_last where it helps, autocast at the run's ``precision``), warmed up, then timed in
    ``rounds`` rounds, the order rotated each round. ``image_size`` and ``in_chans`` may differ
    per model (mappings by name). ``reference`` (default: the first model) is what
    ``speedup`` is the per-round ratio to. Backends: ``eager``, ``compile`` (torch.compile,
    its compile time reported as ``compile_s``), ``onnxruntime`` (the exported graph, CPU or
    the CUDA provider; see fvlab.export).
    """
    reference = _check_models(models, reference, backend)
    names = list(models)
    timing = _resolve_timing(models, device, batch_size, channels_last, warmup, rounds, round_s)
    device = timing.device
    amp, amp_dtype, dtype = _autocast_dtype(precision, device, backend)
    memory_format = torch.channels_last if timing.channels_last else torch.contiguous_format

    def shape(name: str, n: int) -> tuple[int, ...]:
        return _input_shape(models, image_size, in_chans, name, n)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp)

    batches = {name: _random_input(shape(name, timing.batch_size), device).contiguous(memory_format=memory_format)
               for name in names}
    singles = {name: _random_input(shape(name, 1), device).contiguous(memory_format=memory_format)
               for name in names}
    runners, compile_s = _build_runners(models, batches, shape, timing, backend, fuse, autocast)
    rates = _rounds_of(runners, batches, device, autocast(), timing.rounds, timing.round_s, timing.warmup)
    lat_rates = (_rounds_of(runners, singles, device, autocast(), timing.rounds, timing.round_s / 2, timing.warmup)
                 if latency else None)
    threads = torch.get_num_threads()
    results = {name: _summarize(name, reference, rates, lat_rates, batch_size=timing.batch_size,
                                rounds=timing.rounds, device=str(device), dtype=dtype,
                                channels_last=timing.channels_last, backend=backend, threads=threads,
                                compile_s=compile_s[name])
               for name in names}
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results
