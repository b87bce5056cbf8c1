"""Images/s of fvlab's FasterViT against the official implementation, in one run.

Both models get the same configuration, weights and thread count. Each round times ours
and the official one back to back (the order alternates between rounds), and the ratio is
taken within the round: on a shared machine absolute figures drift between runs, while
ratios of neighbouring measurements hold. The median over rounds is reported.

    python benchmarks/model_speed.py                       # FasterViT-0 at 224
    python benchmarks/model_speed.py --batch-sizes 16 --modes eval --rounds 9

Ours runs at its fastest for inference (BatchNorm folded, channels_last); the official
model at its fastest: eval mode after ``switch_to_deploy()`` on every module that has one.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

import fvlab.models  # registers the variants with timm; fvlab.create_model


def official_model(arch: str) -> torch.nn.Module | None:
    """The official model of the same variant, or None when the package is missing."""
    try:
        from fastervit.models import faster_vit
    except ImportError:
        return None
    index = arch.rsplit("_", 1)[-1]
    return getattr(faster_vit, f"faster_vit_{index}_224")()


def make_step(model: torch.nn.Module, mode: str, batch: torch.Tensor) -> Callable[[], None]:
    """A closure running one eval forward or one training step (forward, backward, SGD)."""
    if mode == "eval":
        def step() -> None:
            with torch.inference_mode():
                model(batch)
        return step
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    target = torch.zeros(batch.shape[0], dtype=torch.long)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch), target).backward()
        optimizer.step()
    return train_step


def time_step(step: Callable[[], None], iters: int) -> float:
    """Seconds per call, over ``iters`` calls."""
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def ours_step(arch: str, state: dict | None, mode: str, batch: torch.Tensor) -> Callable[[], None]:
    """fvlab's model at its fastest for ``mode`` (eval: BatchNorm folded, channels_last), the official weights."""
    ours = fvlab.create_model(arch)
    if state is not None:
        ours.load_state_dict(fvlab.models.checkpoint_filter_fn(state, ours))  # the official layout
    if mode == "eval":
        ours = ours.eval().fuse().to(memory_format=torch.channels_last)
        return make_step(ours, mode, batch.contiguous(memory_format=torch.channels_last))
    return make_step(ours.train(), mode, batch)


def official_step(arch: str, state: dict, mode: str, batch: torch.Tensor) -> Callable[[], None]:
    """The official model at its fastest for ``mode`` (eval: after ``switch_to_deploy()``)."""
    ref = official_model(arch)
    ref.load_state_dict(state)
    if mode == "eval":
        ref.eval()
        with torch.inference_mode():
            ref(batch[:1])  # fills the position-term buffers deploy mode reuses
        for module in ref.modules():
            if hasattr(module, "switch_to_deploy"):
                module.switch_to_deploy()
    else:
        ref.train()
    return make_step(ref, mode, batch)


def alternate(steps: dict[str, Callable[[], None]], rounds: int,
              batch_size: int) -> tuple[dict[str, list[float]], list[float]]:
    """Images/s per model and round, and the official/ours time ratio per round, the order alternating."""
    for step in steps.values():
        step()  # warm-up: allocator, oneDNN primitive caches
    # Enough calls per timing for ~1 s of work per model.
    iters = max(1, round(1.0 / time_step(steps["ours"], 1)))
    ips: dict[str, list[float]] = {name: [] for name in steps}
    ratios = []
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        seconds = {name: time_step(steps[name], iters) for name in order}
        for name, s in seconds.items():
            ips[name].append(batch_size / s)
        if "official" in seconds:
            ratios.append(seconds["official"] / seconds["ours"])
    return ips, ratios


def print_row(mode: str, batch_size: int, ips: dict[str, list[float]], ratios: list[float]) -> None:
    """One table row: medians, and the ratio's median and range (dashes without the official model)."""
    ours_ips = statistics.median(ips["ours"])
    if ratios:
        print(f"{mode:<6} {batch_size:>5} {ours_ips:>11.2f} "
              f"{statistics.median(ips['official']):>15.2f} "
              f"{statistics.median(ratios):>14.2f}x {min(ratios):>6.2f}-{max(ratios):.2f}x")
    else:
        print(f"{mode:<6} {batch_size:>5} {ours_ips:>11.2f} {'-':>15} {'-':>15} {'-':>14}")


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="fastervit_0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def main() -> None:
    """Parse arguments, build both models, run the alternating rounds and print the table."""
    args = parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    reference = official_model(args.arch)
    print(f"# {args.arch} at {args.image_size}px, fp32, CPU, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.rounds} alternating rounds, median")
    if reference is None:
        print("# official `fastervit` package not installed: ours only")
    print(f"{'mode':<6} {'batch':>5} {'ours img/s':>11} {'official img/s':>15} "
          f"{'ratio (median)':>15} {'ratio min-max':>14}")

    state = reference.state_dict() if reference is not None else None
    for mode in args.modes:
        for batch_size in args.batch_sizes:
            batch = torch.randn(batch_size, 3, args.image_size, args.image_size)
            steps = {"ours": ours_step(args.arch, state, mode, batch)}
            if state is not None:
                steps["official"] = official_step(args.arch, state, mode, batch)
            print_row(mode, batch_size, *alternate(steps, args.rounds, batch_size))


if __name__ == "__main__":
    main()
