"""The ``fvlab`` command: a thin layer over the library.

Exit codes (DESIGN.md): 0 success; 2 bad input (one clear message, no traceback, nothing
written); 1 a failure while running.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from fvlab._argparse import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, ArgumentParser


DEFAULT_DATA = "fvlab.data.DigitsDataModule"


class BadInput(Exception):
    """Bad user input: reported in one line, exit code 2."""


# ---- fvlab profile ---------------------------------------------------------------------


def _profile_targets(args: argparse.Namespace) -> list[tuple[str, dict[str, Any] | None]]:
    """(row name, run config or None for --arch) for every model to profile, each checked as `fit` checks it."""
    import gc

    from fvlab.experiment import ExperimentError, load_experiment, set_dotted
    from fvlab.lit.runner import BadConfig, build_run
    from fvlab.models import list_variants

    if args.experiment is None:
        if args.arch not in list_variants():
            raise BadInput(f"unknown arch {args.arch!r}; known: {', '.join(list_variants())}")
        return [(args.arch, None)]
    try:
        experiment = load_experiment(args.experiment)
    except ExperimentError as err:
        raise BadInput(str(err)) from None
    targets = []
    for variant in experiment.variant_names():
        config = experiment.config(variant)
        if args.image_size:
            config.setdefault("data", {"class_path": DEFAULT_DATA})
            try:
                set_dotted(config, "data.image_size", args.image_size)
            except ExperimentError as err:
                raise BadInput(f"{args.experiment} [{variant}]: {err}") from None
        try:
            build_run(config, None, {"trainer.logger": False}, experiment=experiment.name, variant=variant)
        except BadConfig as err:
            raise BadInput(f"{args.experiment} [{variant}]: {err}") from None
        gc.collect()  # checked, then dropped: big ablations are not held in memory together
        targets.append((variant, config))
    return targets


def _profile_device(name: str | None) -> Any:
    """The torch device to measure on; BadInput for a name torch does not know or a missing GPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BadInput(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadInput(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise BadInput(f"--device {name}: this machine has {count} CUDA device(s) "
                           f"(cuda:0 ... cuda:{count - 1})")
    elif device.type not in ("cpu", "mps"):
        raise BadInput(f"--device {name!r}: fvlab profiles on cpu or cuda[:N]")
    return device


def _format_table(rows: list[dict[str, Any]]) -> str:
    header = ["model", "resolution", "params (M)", "GFLOPs", "throughput (img/s)", "batch",
              "device", "dtype", "latency (ms)"]
    lines = []
    for row in rows:
        tp = row.get("throughput") or {}
        lines.append([
            row["name"], f"{row['image_size']}", f"{row['model/params_m']:.2f}",
            f"{row['model/gflops']:.3f}",
            f"{row['model/throughput']:.1f}" if "model/throughput" in row else "-",
            str(tp.get("batch_size", "-")), str(tp.get("device", "-")), str(tp.get("dtype", "-")),
            f"{row['model/latency_ms']:.2f}" if "model/latency_ms" in row else "-"])
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def profile_command(argv: Sequence[str]) -> int:
    """``fvlab profile``: params, GFLOPs, throughput and latency per model, without training."""
    parser = ArgumentParser(prog="fvlab profile", description=profile_command.__doc__)
    parser.add_argument("experiment", nargs="?", help="experiment YAML: profile every variant")
    parser.add_argument("--arch", help="a variant name, e.g. fastervit_0")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: the "
                        "experiment's data image size, or 224 with --arch)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--batch-size", type=int, help="throughput batch (default: 128 on CUDA, 32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast for throughput (default: on for CUDA)")
    parser.add_argument("--repeats", type=int, help="timed repetitions")
    parser.add_argument("--no-throughput", action="store_true", help="params and GFLOPs only")
    args = parser.parse_args(argv)
    if (args.experiment is None) == (args.arch is None):
        parser.error("give an experiment file or --arch NAME (not both)")
    for name in ("image_size", "batch_size", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    from fvlab.lit.runner import build_run, release_memory
    from fvlab.models import build_model
    from fvlab.profile import autocast_for_precision, profile_model

    _quiet_lightning()
    try:
        device = _profile_device(args.device)
        targets = _profile_targets(args)
    except BadInput as err:
        print(f"fvlab profile: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = []
    for name, config in targets:
        amp, amp_dtype = args.amp, None
        if config is None:
            network, image_size, in_chans = build_model(name), args.image_size or 224, None
        else:
            spec = build_run(config, None, {"trainer.logger": False})
            network = spec.model.model
            image_size = getattr(spec.datamodule, "image_size", None) or 224
            in_chans = getattr(spec.datamodule, "in_chans", None)
            if amp is None and device == spec.device:
                amp, amp_dtype = autocast_for_precision(spec.precision)  # as `fvlab fit` measures it
            del spec
        metrics = profile_model(network.to(device), image_size, throughput=not args.no_throughput,
                                batch_size=args.batch_size, device=device, amp=amp, amp_dtype=amp_dtype,
                                repeats=args.repeats, in_chans=in_chans)
        rows.append({"name": name, "image_size": image_size, **metrics})
        del network
        release_memory()
    print(json.dumps(rows, indent=2) if args.json else _format_table(rows))
    return EXIT_OK


# ---- fvlab fit / validate / test -------------------------------------------------------


def _split_fit_args(prog: str, argv: Sequence[str], description: str,
                    seeds: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """fvlab's own options; everything else goes to LightningCLI as overrides."""
    parser = ArgumentParser(prog=prog, description=description, add_help=False)
    parser.add_argument("experiment", help="experiment YAML file (or a run's config.yaml)")
    parser.add_argument("--variant", action="append", default=None,
                        help="run only this variant (repeatable)")
    if seeds:
        parser.add_argument("--seeds", nargs="+", type=int, default=None,
                            help="train every variant once per seed (replaces the file's seeds)")
    parser.add_argument("--force", action="store_true", help="re-run variants that are complete")
    parser.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", default=None,
                        help="'last' resumes each run from its last checkpoint; or a file")
    parser.add_argument("--runs-dir", default=None, help="where run directories go (default: runs, "
                        "or, for a run's own config.yaml, the runs directory it lives in)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        print("\nAny other option is a LightningCLI override, e.g. --trainer.max_epochs 2 "
              "--model.arch.ct_size 4 --data.batch_size 32; --print_config prints the resolved config.")
        raise SystemExit(0 if argv else EXIT_BAD_INPUT)
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        key = item[2:].partition("=")[0] if item.startswith("--") else ""
        if key and "." not in key and key not in ("seed_everything", "print_config"):
            parser.error(f"unknown option --{key}; the options are --variant, "
                         f"{'--seeds, ' if seeds else ''}--force, --ckpt_path, --runs-dir, and "
                         f"dotted config overrides such as --trainer.max_epochs 2")
    args.print_config = "--print_config" in rest
    rest = [item for item in rest if item != "--print_config"]
    return args, rest


def _quiet_lightning() -> None:
    import logging
    import warnings

    # Lightning's start-up chatter (accelerator lines, adverts) would drown the table.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*instantiate_classes.*deprecated.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")


def _load_selection(args: argparse.Namespace) -> tuple[Any, list[str], list[int] | None]:
    """The experiment, variants and seeds that ``args`` select (BadInput if bad); fills in args.runs_dir."""
    from fvlab.lit.plan import PlanError, load_selection

    try:
        selection = load_selection(args.experiment, args.variant, getattr(args, "seeds", None), args.runs_dir)
    except PlanError as err:
        raise BadInput(str(err)) from None
    args.runs_dir = str(selection.runs_dir)
    return selection.experiment, selection.variants, selection.seeds


def _plan_fit(args: argparse.Namespace, overrides: list[str]) -> Any:
    """Every selected run with its action (fvlab.lit.plan.plan_fit), decided before anything is written."""
    from fvlab.lit.plan import PlanError, Selection, plan_fit

    experiment, selected, seeds = _load_selection(args)
    try:
        return plan_fit(Selection(experiment, selected, seeds, Path(args.runs_dir)), overrides,
                        force=args.force, ckpt_path=args.ckpt_path)
    except PlanError as err:
        raise BadInput(str(err)) from None


def _print_config(args: argparse.Namespace, overrides: list[str]) -> int:
    import yaml

    from fvlab.experiment import ExperimentError, parse_cli_overrides
    from fvlab.lit.runner import BadConfig, build_run

    experiment, selected, seeds = _load_selection(args)
    try:
        spec = build_run(experiment.config(selected[0]), None, parse_cli_overrides(overrides),
                         seed=seeds[0] if seeds else None)
    except (BadConfig, ExperimentError) as err:
        raise BadInput(f"{args.experiment} [{selected[0]}]: {err}") from None
    print(yaml.safe_dump({"name": experiment.name, **spec.config}, sort_keys=False), end="")
    return EXIT_OK


def fit_command(argv: Sequence[str]) -> int:
    """``fvlab fit``: train every variant (x seed) of an experiment, then print the comparison table."""
    from lightning.pytorch.utilities import rank_zero_only

    from fvlab.lit.plan import fit_jobs
    from fvlab.lit.runner import find_runs
    from fvlab.report import write_summary
    from fvlab.report.collect import read_run

    args, overrides = _split_fit_args("fvlab fit", argv, fit_command.__doc__, seeds=True)
    _quiet_lightning()
    try:
        if args.print_config:
            return _print_config(args, overrides)
        plan = _plan_fit(args, overrides)  # every DDP rank plans alike (see fvlab.lit.plan)
    except BadInput as err:
        print(f"fvlab fit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    experiment, root, jobs = plan.experiment, plan.root, plan.jobs
    failed = fit_jobs(plan, overrides)
    if rank_zero_only.rank != 0:
        return EXIT_FAILURE if failed else EXIT_OK
    # Every run of the experiment directory, not only this command's: a rerun of one variant's
    # config.yaml keeps the other rows.
    found = list(find_runs(root))
    results = [read_run(run_dir, events=False).metrics for run_dir in found]
    results += [{"experiment": experiment.name, "variant": job.variant, "seed": job.seed,
                 "status": "not run"} for job in jobs if job.run_dir not in found]
    table = write_summary(root, results, title=f"{experiment.name} ({experiment.path})",
                          reference=experiment.reference, variant_order=experiment.variant_names())
    print(f"\n{experiment.name}: {root}/summary.md, summary.csv; tensorboard --logdir {root}\n")
    print(table)
    return EXIT_FAILURE if failed else EXIT_OK


def _evaluate_command(stage: str, argv: Sequence[str]) -> int:
    """``fvlab validate|test``: LightningCLI's subcommand on one variant, from a checkpoint."""
    from fvlab.experiment import ExperimentError, parse_cli_overrides, run_dir_for
    from fvlab.lit.runner import BadConfig, build_run

    args, overrides = _split_fit_args(f"fvlab {stage}", argv, f"run Trainer.{stage}", seeds=True)
    _quiet_lightning()
    try:
        if args.variant and len(args.variant) > 1:
            raise BadInput(f"fvlab {stage} takes at most one --variant")
        if args.seeds and len(args.seeds) > 1:
            raise BadInput(f"fvlab {stage} takes at most one seed (--seeds S)")
        experiment, selected, seeds = _load_selection(args)
        if not args.variant and len(selected) > 1:
            raise BadInput(f"{args.experiment} has {len(selected)} variants; name one with --variant "
                           f"({', '.join(selected)})")
        variant, seed = selected[0], seeds[0] if seeds else None
        run_dir = run_dir_for(Path(args.runs_dir) / experiment.name, variant, seed)
        ckpt = args.ckpt_path
        if ckpt in (None, "last", "best"):
            path = run_dir / "checkpoints" / ("last.ckpt" if ckpt == "last" else "best.ckpt")
            if not path.is_file():
                raise BadInput(f"no checkpoint at {path}; train it with `fvlab fit {args.experiment} "
                               f"--variant {variant}` or pass --ckpt_path FILE")
            ckpt = str(path)
        elif not Path(ckpt).is_file():
            raise BadInput(f"--ckpt_path: checkpoint file not found: {ckpt}")
        # run_dir=None, no logger: evaluating writes nothing into the run directory.
        spec = build_run(experiment.config(variant), None,
                         {**parse_cli_overrides(overrides), "trainer.logger": False},
                         experiment=experiment.name, variant=variant, seed=seed)
    except (BadConfig, ExperimentError) as err:
        print(f"fvlab {stage}: error: {args.experiment}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BadInput as err:
        print(f"fvlab {stage}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    getattr(spec.trainer, stage)(spec.model, datamodule=spec.datamodule, ckpt_path=ckpt)
    return EXIT_OK


def validate_command(argv: Sequence[str]) -> int:
    """``fvlab validate``: validation metrics of a trained variant."""
    return _evaluate_command("validate", argv)


def testing_command(argv: Sequence[str]) -> int:
    """``fvlab test``: test metrics of a trained variant."""
    return _evaluate_command("test", argv)


# ---- entry point -----------------------------------------------------------------------

def sweep_command(argv: Sequence[str]) -> int:
    """``fvlab sweep``: Optuna search over HAT settings (see fvlab.sweep)."""
    from fvlab.sweep import sweep_command as run

    return run(argv)


def report_command(argv: Sequence[str]) -> int:
    """``fvlab report``: tables and plots comparing runs and studies (see fvlab.report)."""
    from fvlab.report import report_command as run

    return run(argv)


COMMANDS = {"fit": fit_command, "validate": validate_command, "test": testing_command,
            "profile": profile_command, "sweep": sweep_command, "report": report_command}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``fvlab COMMAND ...``; returns the exit code."""
    from fvlab.runtime import tune_allocator

    # Before torch allocates: every run and trial of this process measures under one allocator state.
    tune_allocator()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fvlab {" + ",".join(COMMANDS) + "} ...\n\n"
              "  fit       train every variant of an experiment, then print the comparison table\n"
              "  validate  validation metrics of a trained variant (--ckpt_path, default best)\n"
              "  test      test metrics of a trained variant\n"
              "  profile   params, GFLOPs, measured throughput and latency per model\n"
              "  sweep     Optuna search over HAT settings (multi-objective, resumable, many workers)\n"
              "  report    report.md, tables and plots comparing runs, variants, seeds and trials\n\n"
              "Run `fvlab COMMAND --help` for a command's options.")
        return EXIT_OK if argv else EXIT_BAD_INPUT
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fvlab: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return COMMANDS[command](rest)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # argparse's --help and errors
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
