"""fp32 against bf16 autocast on this machine's CPU: training steps/s and inference images/s.

``precision: auto`` trains in bf16-mixed only on CPUs with native bf16 (fvlab.runtime); this
prints the figures behind that rule for the CPU it runs on. Both sides run the same model,
weights and input; bf16 runs under ``torch.autocast("cpu", torch.bfloat16, cache_enabled=False)``,
exactly as Lightning's ``bf16-mixed`` wraps the forward and loss (backward and optimizer in fp32
master weights). Rounds alternate the order of the two sides and the ratio is taken within
each round; the median over rounds is reported.

    python benchmarks/precision.py                 # demo training step + FasterViT-0 inference
    python benchmarks/precision.py --rounds 15
    python benchmarks/precision.py --learn 2       # also train the digits demo 2 epochs each way
    python benchmarks/precision.py --rounds 0 --learn 4   # the learning check only

Training: the ``make demo`` step: fastervit_tiny (window 4, ct_size 2) on 1x128x128 images,
batch 64, timm AdamW, label-smoothed cross-entropy. Inference: FasterViT-0 at 224, batch 16,
BatchNorm folded, channels_last, under ``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import statistics
import time
import warnings
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import fvlab
from fvlab.lit.module import ImageClassifier
from fvlab.metrics import VAL_ACC1, VAL_LOSS
from fvlab.models import ArchConfig
from fvlab.runtime import (ARM_NATIVE_BF16_FLAGS, X86_NATIVE_BF16_FLAGS, cpu_description, cpu_has_native_bf16,
                           resolve_precision)

DEMO_ARCH = ArchConfig(name="fastervit_tiny", window_size=4, ct_size=2)


def autocast(precision: str) -> ContextManager:
    """The context Lightning's precision plugin runs the forward in, on CPU."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def training_step(precision: str, batch_size: int = 64, image_size: int = 128) -> Callable[[], None]:
    """One optimizer step of the demo's ImageClassifier (fastervit_tiny, greyscale digits size)."""
    torch.manual_seed(0)
    module = ImageClassifier(arch=DEMO_ARCH, num_classes=10, in_chans=1, image_size=image_size,
                             lr=3e-3).train()
    optimizer = create_optimizer_v2(module.model, opt="adamw", lr=3e-3, weight_decay=0.05)
    x = torch.randn(batch_size, 1, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision):
            loss = F.cross_entropy(module(x), y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
    return step


def inference_step(precision: str, arch: str = "fastervit_0", batch_size: int = 16,
                   image_size: int = 224) -> Callable[[], None]:
    """One eval forward of a FasterViT at its fastest (BatchNorm folded, channels_last)."""
    torch.manual_seed(0)
    model = fvlab.create_model(arch).eval().fuse().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode(), autocast(precision):
            model(x)
    return step


def seconds_per_call(step: Callable[[], None], iters: int) -> float:
    """Mean wall time of ``iters`` calls."""
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def compare(name: str, build: Callable[[str], Callable[[], None]], items: int, rounds: int,
            seconds: float) -> None:
    """Alternate fp32 and bf16 timings for ``rounds`` rounds; print medians and the ratio."""
    steps = {p: build(p) for p in ("fp32", "bf16")}
    for step in steps.values():
        step(), step()  # warm-up: allocator, oneDNN primitive caches
    iters = {p: max(1, round(seconds / seconds_per_call(s, 1))) for p, s in steps.items()}
    rates: dict[str, list[float]] = {p: [] for p in steps}
    ratios = []
    for r in range(rounds):
        order = ["fp32", "bf16"] if r % 2 == 0 else ["bf16", "fp32"]
        per_call = {p: seconds_per_call(steps[p], iters[p]) for p in order}
        for p, s in per_call.items():
            rates[p].append(items / s)
        ratios.append(per_call["fp32"] / per_call["bf16"])
    unit = "steps/s" if items == 1 else "img/s"
    print(f"{name:<34} {statistics.median(rates['fp32']):>9.2f} {statistics.median(rates['bf16']):>9.2f}"
          f" {unit:>8} {statistics.median(ratios):>8.2f}x {min(ratios):>6.2f}-{max(ratios):.2f}x")


def learn(epochs: int) -> None:
    """Train the digits demo ``epochs`` epochs in 32-true and bf16-mixed; print the validation accuracy of each."""
    import lightning.pytorch as pl

    from fvlab.data import DigitsDataModule

    for precision in ("32-true", "bf16-mixed"):
        pl.seed_everything(0, verbose=False)
        module = ImageClassifier(arch=DEMO_ARCH, num_classes=10, in_chans=1, image_size=128,
                                 lr=3e-3, warmup_epochs=min(1, epochs - 1), label_smoothing=0.1)
        trainer = pl.Trainer(accelerator="cpu", precision=precision, max_epochs=epochs, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        start = time.perf_counter()
        trainer.fit(module, datamodule=DigitsDataModule(image_size=128, batch_size=64))
        metrics = trainer.callback_metrics
        print(f"digits demo {epochs} epochs {precision:<10}  {VAL_ACC1} {metrics[VAL_ACC1].item():.4f}  "
              f"{VAL_LOSS} {metrics[VAL_LOSS].item():.4f}  ({time.perf_counter() - start:.0f} s)")


def main() -> None:
    """Print the CPU, what ``precision: auto`` resolves to, and the fp32/bf16 table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=1.0, help="work per timing, per side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--learn", type=int, default=0, metavar="EPOCHS",
                        help="also train the digits demo this many epochs in each precision")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    model_name, flags = cpu_description()
    found = sorted(f for f in flags if f in X86_NATIVE_BF16_FLAGS + ARM_NATIVE_BF16_FLAGS)
    print(f"# CPU: {model_name} ({platform.machine()}), {args.threads} threads, torch {torch.__version__}")
    print(f"# native bf16 flags found: {', '.join(found) or 'none'} "
          f"(looked for {', '.join(X86_NATIVE_BF16_FLAGS + ARM_NATIVE_BF16_FLAGS)}); "
          f"cpu_has_native_bf16() = {cpu_has_native_bf16()}; "
          f"precision auto -> {resolve_precision('auto', 'cpu')}")
    print(f"# (oneDNN's _is_mkldnn_bf16_supported() = {torch.ops.mkldnn._is_mkldnn_bf16_supported()}: "
          f"true on any AVX-512 CPU, emulated or not)")
    if args.rounds > 0:
        print(f"# {args.rounds} alternating rounds, ~{args.seconds:g} s per side per round; "
              f"ratio = bf16/fp32 speed")
        print(f"{'workload':<34} {'fp32':>9} {'bf16':>9} {'unit':>8} {'median':>9} {'min-max':>13}")
        compare("train fastervit_tiny 128px b64", training_step, 1, args.rounds, args.seconds)
        compare("infer FasterViT-0 224px b16", inference_step, 16, args.rounds, args.seconds)
    if args.learn > 0:
        learn(args.learn)


if __name__ == "__main__":
    main()
