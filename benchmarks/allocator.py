"""Throughput and page faults with glibc malloc's default state against ``fvlab.runtime.tune_allocator()``.

By default glibc serves large blocks with mmap and unmaps them on free (and trims the heap
top), so every large tensor page-faults all its pages again; ``tune_allocator()`` keeps freed
memory in the heap. Each measurement runs in a fresh subprocess (so no mode inherits another's
heap): build the workload, warm up, then time a few repeats and count the page faults
(``getrusage`` ru_minflt / ru_majflt) per measured iteration. Rounds alternate the order of the
modes; the speed ratio against ``default`` is taken within each round and its median reported,
in wall-clock time and in CPU time (user+sys of all threads, which other processes on a shared
machine disturb less); the kernel's share (sys) is where page faults cost.

    python benchmarks/allocator.py                                # default vs tuned, 5 rounds
    python benchmarks/allocator.py --modes default threshold tuned tuned_pad --rounds 3

Modes: ``default`` glibc as it starts (FVLAB_TUNE_ALLOCATOR=0); ``tuned`` tune_allocator();
``threshold`` only no trimming and the highest mmap threshold glibc accepts (32 MiB on 64-bit),
what ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_`` can do: blocks above 32 MiB are still
mmapped; ``tuned_pad`` tune_allocator() plus a 64 MiB ``M_TOP_PAD``.

Workloads: ``train`` the demo's training step (fastervit_tiny, 1x128x128, batch 64, AdamW);
``infer`` fvlab's FasterViT-0 at 224, batch 16 (BatchNorm folded, channels_last); ``official``
the `fastervit` package's faster_vit_0_224 at 224, batch 16, after switch_to_deploy (skipped
when the package is missing).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

MODES = ("default", "threshold", "tuned", "tuned_pad")
WORKLOADS = {"train": ("demo train step fastervit_tiny 128px b64", 1),
             "infer": ("infer fvlab FasterViT-0 224px b16", 16),
             "official": ("infer official faster_vit_0_224 b16", 16)}


def apply_mode(mode: str) -> None:
    """Set up glibc malloc for ``mode`` (in the measuring subprocess, before the workload is built)."""
    from fvlab import runtime

    if mode in ("tuned", "tuned_pad"):
        if not runtime.tune_allocator():
            raise SystemExit("tune_allocator() had no effect here (not glibc, or FVLAB_TUNE_ALLOCATOR=0)")
    libc = ctypes.CDLL("libc.so.6") if mode in ("threshold", "tuned_pad") else None
    if mode == "threshold":
        libc.mallopt(runtime.M_TRIM_THRESHOLD, -1)
        libc.mallopt(runtime.M_MMAP_THRESHOLD, 32 * 2**20)
    if mode == "tuned_pad":
        libc.mallopt(runtime.M_TOP_PAD, 64 * 2**20)


def official_step(batch_size: int = 16, image_size: int = 224) -> Callable[[], None] | None:
    """One eval forward of the official FasterViT-0 in deploy mode, or None without the package."""
    import torch

    try:
        from fastervit.models import faster_vit
    except ImportError:
        return None
    torch.manual_seed(0)
    model = faster_vit.faster_vit_0_224().eval()
    x = torch.randn(batch_size, 3, image_size, image_size)
    with torch.inference_mode():
        model(x[:1])  # fills the position-term buffers deploy mode reuses
    for module in model.modules():
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()

    def step() -> None:
        with torch.inference_mode():
            model(x)
    return step


def measure(workload: str, mode: str, precision: str, warmup: int, repeats: int,
            threads: int) -> dict[str, Any]:
    """Run in the subprocess: time ``repeats`` calls after ``warmup`` and count their page faults."""
    apply_mode(mode)
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from precision import inference_step, training_step

    torch.manual_seed(0)
    if workload == "train":
        step = training_step(precision)
    elif workload == "infer":
        step = inference_step(precision)
    else:
        step = official_step()
        if step is None:
            return {"skipped": "the `fastervit` package is not installed"}
    for _ in range(warmup):
        step()
    seconds = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": statistics.median(seconds),
            "cpu": (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / repeats,
            "sys": (after.ru_stime - before.ru_stime) / repeats,
            "minflt": (after.ru_minflt - before.ru_minflt) / repeats,
            "majflt": (after.ru_majflt - before.ru_majflt) / repeats,
            "maxrss_mib": after.ru_maxrss / 1024}


def run_child(workload: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh interpreter."""
    env = dict(os.environ, FVLAB_TUNE_ALLOCATOR="0" if mode in ("default", "threshold") else "1")
    for key in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_"):
        env.pop(key, None)  # the parent's glibc tunables would blur the modes
    out = subprocess.run([sys.executable, __file__, "--child", workload, mode,
                          "--precision", args.precision, "--warmup", str(args.warmup),
                          "--repeats", str(args.repeats), "--threads", str(args.threads)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{workload}/{mode} subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Alternate the modes over fresh subprocesses for each workload; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["default", "tuned"], choices=MODES)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        print(json.dumps(measure(*args.child, args.precision, args.warmup, args.repeats, args.threads)))
        return
    if "default" not in args.modes:
        args.modes.insert(0, "default")

    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"# glibc malloc state, {args.precision}, {threads} threads, torch {torch.__version__}; "
          f"{args.rounds} rounds of fresh subprocesses, modes alternating; per subprocess "
          f"{args.warmup} warm-up + {args.repeats} timed calls (median)")
    print("# speed: wall-clock items/s and its ratio to default; cpu: the ratio of CPU seconds per "
          "call (user+sys, all threads; less disturbed by other processes); sys ms/it: kernel time per call")
    print(f"{'workload':<40} {'mode':<10} {'items/s':>8} {'speed':>7} {'min-max':>11} {'cpu':>7} "
          f"{'sys ms/it':>9} {'minflt/it':>9} {'majflt/it':>9} {'maxRSS MiB':>10}")
    for workload in args.workloads:
        label, items = WORKLOADS[workload]
        results: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
        for r in range(args.rounds):
            order = args.modes if r % 2 == 0 else list(reversed(args.modes))
            for mode in order:
                results[mode].append(run_child(workload, mode, args))
            if "skipped" in results["default"][0]:
                break
        if "skipped" in results["default"][0]:
            print(f"{label:<40} skipped: {results['default'][0]['skipped']}")
            continue
        for mode in args.modes:
            runs = results[mode]
            ratios = [d["seconds"] / m["seconds"] for d, m in zip(results["default"], runs)]
            cpu_ratios = [d["cpu"] / m["cpu"] for d, m in zip(results["default"], runs)]
            print(f"{label:<40} {mode:<10} {items / statistics.median(r['seconds'] for r in runs):>8.2f} "
                  f"{statistics.median(ratios):>6.3f}x {min(ratios):>4.2f}-{max(ratios):.2f}x "
                  f"{statistics.median(cpu_ratios):>6.3f}x "
                  f"{1000 * statistics.median(r['sys'] for r in runs):>9.1f} "
                  f"{statistics.median(r['minflt'] for r in runs):>9.0f} "
                  f"{statistics.median(r['majflt'] for r in runs):>9.1f} "
                  f"{statistics.median(r['maxrss_mib'] for r in runs):>10.0f}")


if __name__ == "__main__":
    main()
