"""fvlab on one GPU, in under 5 minutes: inference against the paper and the official model,
one training epoch, and the exported graph in ONNX Runtime.

    python benchmarks/gpu.py            # on a machine with a CUDA GPU
    python benchmarks/gpu.py --smoke    # the same code paths on the CPU at toy sizes (a check, not a figure)

Prints:
(a) FasterViT-0 at 224, batch 128, AMP (fp16): images/s eager and torch.compile'd, against the
    paper's A100 figure (5,802 img/s) and against the official `fastervit` package (deploy
    mode) in interleaved rounds (fvlab's side-by-side protocol: median, 95% interval);
(b) one `fvlab fit` epoch of fastervit_0 on synthetic 224-px images with AMP and channels_last:
    training steps/s and images/s;
(c) the exported ONNX graph in ONNX Runtime's CUDA (and TensorRT, if present) provider,
    side by side with eager PyTorch.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import fvlab
from fvlab.profile import measure_side_by_side
from fvlab.runtime import quiet_lightning

PAPER_A100 = 5802.0  # FasterViT-0, 224 px, batch 128, A100, AMP (arXiv 2306.06189, Table 1)


def official(arch: str) -> torch.nn.Module | None:
    """The official model in deploy mode, or None when the `fastervit` package is missing."""
    try:
        from fastervit.models import faster_vit
    except ImportError:
        return None
    model = getattr(faster_vit, f"faster_vit_{arch.rsplit('_', 1)[-1]}_224")().eval()
    return model


def deploy(model: torch.nn.Module, size: int, device: torch.device) -> torch.nn.Module:
    """The official model after switch_to_deploy (its fastest inference path)."""
    model = model.to(device).eval()
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size, device=device))  # fills the buffers deploy mode keeps
    for module in model.modules():
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()
    return model


def line(label: str, r) -> str:
    """One result line: median with its interval, and the speedup to the reference."""
    return (f"  {label:<28} {r.images_per_s:9.0f} img/s [{r.images_per_s_lo:.0f}, {r.images_per_s_hi:.0f}]"
            f"   speedup {r.speedup:.3f} [{r.speedup_lo:.3f}, {r.speedup_hi:.3f}] vs {r.reference}"
            + (f"   compile {r.compile_s:.0f} s" if r.compile_s else ""))


def inference(arch: str, size: int, batch: int, device: torch.device, precision: str, rounds: int) -> None:
    """(a): eager and compiled, ours against the official model, side by side."""
    print(f"(a) {arch} inference at {size} px, batch {batch}, {precision}, {rounds} interleaved rounds")
    ours = fvlab.create_model(arch)
    models = {"fvlab": ours}
    ref = official(arch) if size == 224 else None
    if ref is not None:
        ours.load_state_dict(ref.state_dict())  # one parameter layout: both run the same weights
        models["official (deploy)"] = deploy(ref, size, device)
    else:
        print("  official `fastervit` package not installed (or not at this size): fvlab only")
    for backend in ("eager", "compile"):
        try:
            results = measure_side_by_side(models, size, batch_size=batch, device=device, precision=precision,
                                           rounds=rounds, backend=backend, reference="fvlab")
        except Exception as err:  # report and go on: the other parts still run
            print(f"  {backend}: failed: {type(err).__name__}: {err}")
            continue
        for name, r in results.items():
            print(line(f"{name} {backend}", r))
        if device.type == "cuda":
            r = results["fvlab"]
            print(f"  fvlab {backend} / paper A100 ({PAPER_A100:.0f} img/s): {r.images_per_s / PAPER_A100:.2f}")


def training(arch: str, size: int, batch: int, precision: str, accelerator: str, steps: int) -> None:
    """(b): one `fvlab fit` epoch on synthetic images with AMP and channels_last, steps/s."""
    import lightning.pytorch as pl

    from fvlab.lit.build import build_run

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.start = self.end = 0.0
            self.steps = 0

        def on_train_batch_start(self, trainer, pl_module, b, batch_idx) -> None:
            if batch_idx == 2:  # after cudnn autotuning and the first allocations
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx) -> None:
            if batch_idx >= 2:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.end = time.perf_counter()
                self.steps = batch_idx - 1

    print(f"(b) one `fvlab fit` epoch: {arch}, synthetic {size}-px images, batch {batch}, {precision}, "
          f"channels_last")
    config = {"model": {"arch": {"name": arch}, "channels_last": True},
              "data": {"class_path": "fvlab.data.SyntheticDataModule",
                       "init_args": {"image_size": size, "num_classes": 1000, "num_samples": batch * (steps + 2),
                                     "val_samples": batch, "batch_size": batch, "num_workers": 0}},
              "trainer": {"max_epochs": 1, "precision": precision, "accelerator": accelerator, "devices": 1,
                          "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
                          "enable_checkpointing": False, "enable_progress_bar": False}}
    with tempfile.TemporaryDirectory():
        spec = build_run(config, None, {})
        timer = StepTimer()
        spec.trainer.callbacks.append(timer)
        spec.trainer.fit(spec.model, datamodule=spec.datamodule)
    if timer.steps:
        rate = timer.steps / (timer.end - timer.start)
        print(f"  {rate:.2f} steps/s, {rate * batch:.0f} training images/s over {timer.steps} steps")


def onnx_runtime(arch: str, size: int, batch: int, device: torch.device, rounds: int) -> None:
    """(c): the exported graph in ONNX Runtime (CUDA / TensorRT providers) against eager PyTorch."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("(c) ONNX Runtime not installed: pip install 'fvlab[export]' (onnxruntime-gpu for CUDA)")
        return
    from fvlab.export import export_onnx

    providers = ort.get_available_providers()
    print(f"(c) exported {arch} in ONNX Runtime {ort.__version__}, batch {batch}, fp32; providers: "
          f"{', '.join(providers)}")
    model = fvlab.create_model(arch).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{arch}.onnx"
        export_onnx(model, path)
        wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in providers]
        if device.type == "cpu":
            wanted = ["CPUExecutionProvider"]
        if not wanted:
            print("  no CUDA or TensorRT provider: install onnxruntime-gpu")
            return
        for provider in wanted:
            session = ort.InferenceSession(str(path), providers=[provider])
            x = torch.randn(batch, 3, size, size).numpy()
            name = session.get_inputs()[0].name
            session.run(None, {name: x})  # warm-up (TensorRT builds its engine here)
            rates = []
            for _ in range(rounds):
                start = time.perf_counter()
                session.run(None, {name: x})
                rates.append(batch / (time.perf_counter() - start))
            rates.sort()
            print(f"  {provider:<28} {rates[len(rates) // 2]:9.0f} img/s (median of {rounds}; "
                  f"min {rates[0]:.0f}, max {rates[-1]:.0f})")


def main() -> int:
    """Run (a), (b) and (c) on the GPU (or, with --smoke, at toy sizes on the CPU)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks the code paths only")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    quiet_lightning()
    if args.smoke:
        device, arch, size, batch, precision, accelerator = torch.device("cpu"), "fastervit_micro", 32, 4, "32-true", "cpu"
        rounds, steps = args.rounds or 3, 4
    elif torch.cuda.is_available():
        device, arch, size, batch, precision, accelerator = torch.device("cuda"), "fastervit_0", 224, 128, "16-mixed", "gpu"
        rounds, steps = args.rounds or 20, 60
        torch.backends.cudnn.benchmark = True
    else:
        print("benchmarks/gpu.py: no CUDA GPU here; --smoke runs the code paths on the CPU")
        return 0
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    print(f"# fvlab {fvlab.__version__}, torch {torch.__version__}, {where}")
    start = time.perf_counter()
    inference(arch, size, batch, device, precision, rounds)
    training(arch, size, batch, precision, accelerator, steps)
    onnx_runtime(arch, size, batch, device, rounds)
    print(f"# {time.perf_counter() - start:.0f} s in total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
