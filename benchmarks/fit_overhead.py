"""Training steps/s of `fvlab fit` against a plain PyTorch loop: the cost of the Lightning layer.

Both sides train the same model (built from the same experiment config), on the same
data loader, with the same batch size, optimizer (timm AdamW), per-step schedule (timm
cosine) and loss. `fvlab fit`'s side is built exactly as the command builds it (LightningCLI,
TensorBoard logging, profile and checkpoint callbacks); its steps are timed from the second
training batch to the last, so one-time work (profiling at fit start, the checkpoint at
epoch end) stays outside, as it does for the plain loop. Rounds alternate the two sides
and the ratio is taken within each round; the median is reported. Both sides run at the same
precision: once in fp32 and once at the experiment's own precision (``auto`` resolves to
bf16-mixed on CPUs with native bf16), the plain loop under the same autocast; comparing fit in
bf16 against a plain loop in fp32 would measure precision, not overhead.

    python benchmarks/fit_overhead.py                     # experiments/baseline.yaml
    python benchmarks/fit_overhead.py --steps 30 --rounds 7
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from fvlab.experiment import load_experiment
from fvlab.lit.build import build_run, variant_config
from fvlab.runtime import cpu_description


class StepTimer(pl.Callback):
    """Wall time from the start of the second training batch to the end of the last."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.steps = batch_idx


def lightning_steps_per_s(config: dict, steps: int, workdir: Path, precision: str) -> float:
    """Steps/s of one `fvlab fit` epoch of ``steps`` batches."""
    spec = build_run(config, workdir / "run", [
        "--trainer.precision", precision, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(steps),
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false"],
        experiment="overhead", variant="lightning")
    timer = StepTimer()
    spec.trainer.callbacks.append(timer)
    spec.trainer.fit(spec.model, datamodule=spec.datamodule)
    return timer.steps / (timer.end - timer.start)


def plain_steps_per_s(config: dict, steps: int, workdir: Path, precision: str) -> float:
    """Steps/s of a hand-written loop over the same model, data, optimizer, schedule and precision."""
    spec = build_run(config, workdir / "plain", ["--trainer.max_epochs", "1", "--trainer.precision", "32-true"],
                     experiment="overhead", variant="plain")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    module, data = spec.model, spec.datamodule
    data.setup("fit")
    model = module.model.train()
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    hp = module.hparams
    optimizer = create_optimizer_v2(model, opt=hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=hp.scheduler, num_epochs=1,
                                       warmup_epochs=hp.warmup_epochs, warmup_lr=hp.warmup_lr,
                                       min_lr=hp.min_lr, step_on_epochs=False,
                                       updates_per_epoch=steps)
    start, timed = 0.0, 0
    for i, (x, y) in enumerate(data.train_dataloader()):
        if i == 1:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:  # as Lightning's bf16-mixed: autocast forward and loss, fp32 weights
            loss = F.cross_entropy(model(x), y, label_smoothing=hp.label_smoothing)
        loss.backward()
        optimizer.step()
        scheduler.step_update(num_updates=i + 1)
        timed = i  # steps after the first (an epoch may hold fewer than ``steps`` batches)
        if i + 1 == steps:
            break
    return timed / (time.perf_counter() - start)


def main() -> None:
    """Alternate the two sides for several rounds and print the median ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default=str(Path(__file__).parents[1] / "experiments/baseline.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="batches per round (at most one epoch's)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    experiment = load_experiment(args.experiment)
    config = variant_config(experiment)
    own = build_run(config, None, {"trainer.logger": False}).precision  # `auto` resolved here
    batch = config.get("data", {}).get("init_args", {}).get("batch_size")
    print(f"# {experiment.path}: {config['model']['arch']}, batch {batch}, {args.steps} steps "
          f"per round, {args.rounds} alternating rounds, {torch.get_num_threads()} threads, {cpu_description()[0]}")
    worst = float("inf")
    for precision in dict.fromkeys(["32-true", own]):
        ratios, fit_rates, plain_rates = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                sides = ["fit", "plain"] if r % 2 == 0 else ["plain", "fit"]
                rates = {}
                for side in sides:
                    torch.manual_seed(r)
                    fn = lightning_steps_per_s if side == "fit" else plain_steps_per_s
                    rates[side] = fn(config, args.steps, Path(tmp) / f"{r}", precision)
                fit_rates.append(rates["fit"])
                plain_rates.append(rates["plain"])
                ratios.append(rates["fit"] / rates["plain"])
        worst = min(worst, statistics.median(ratios))
        print(f"precision {precision}{' (the experiment precision)' if precision == own else ''}:")
        print(f"  fvlab fit   steps/s (median): {statistics.median(fit_rates):.2f}")
        print(f"  plain loop  steps/s (median): {statistics.median(plain_rates):.2f}")
        print(f"  ratio fit/plain (median): {statistics.median(ratios):.3f}  "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"goal fit/plain >= 0.95 at every precision: {'met' if worst >= 0.95 else 'NOT met'} ({worst:.3f})")


if __name__ == "__main__":
    main()
