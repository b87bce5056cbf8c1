"""The ``fvlab`` command: a thin layer over the library.

Exit codes (DESIGN.md): 0 success; 2 bad input (one clear message, no traceback, nothing
written); 1 a failure while running.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from fvlab._argparse import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, ArgumentParser
from fvlab.models.registry import checkpoints_trusted, trust_checkpoints
from fvlab.runtime import quiet_lightning as _quiet_lightning


DEFAULT_DATA = "fvlab.data.DigitsDataModule"


class BadInput(Exception):
    """Bad user input: reported in one line, exit code 2."""


TRUST_HELP = ("load checkpoint files that hold more than tensors (their pickle can run code): "
              "only for files you trust")


def _check_checkpoint(path: str | Path) -> None:
    """BadInput unless the checkpoint file loads as tensors and plain values (or is trusted)."""
    from fvlab.lit.plan import PlanError, check_checkpoint

    try:
        check_checkpoint(path)
    except PlanError as err:
        raise BadInput(str(err)) from None


# ---- fvlab profile ---------------------------------------------------------------------


def _profile_targets(args: argparse.Namespace, device: Any) -> tuple[Any, dict[str, Any]]:
    """(experiment or None, name -> built run or --arch target) for every model to profile, each
    checked as `fit` checks it; all held together, since they are measured side by side."""
    from fvlab.experiment import ExperimentError, load_experiment, set_dotted
    from fvlab.lit.measure import Target
    from fvlab.lit.runner import BadConfig, build_run
    from fvlab.models import build_model, list_variants

    if args.experiment is None:
        if args.arch not in list_variants():
            raise BadInput(f"unknown arch {args.arch!r}; known: {', '.join(list_variants())}")
        return None, {args.arch: Target(build_model(args.arch), args.image_size or 224, None, device)}
    try:
        experiment = load_experiment(args.experiment)
    except ExperimentError as err:
        raise BadInput(str(err)) from None
    targets = {}
    for variant in experiment.variant_names():
        config = experiment.config(variant)
        if args.image_size:
            config.setdefault("data", {"class_path": DEFAULT_DATA})
            try:
                set_dotted(config, "data.image_size", args.image_size)
            except ExperimentError as err:
                raise BadInput(f"{args.experiment} [{variant}]: {err}") from None
        try:
            targets[variant] = build_run(config, None, {"trainer.logger": False}, experiment=experiment.name,
                                         variant=variant)
        except BadConfig as err:
            raise BadInput(f"{args.experiment} [{variant}]: {err}") from None
    return experiment, targets


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


def _interval_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    """``1183 [1150, 1204]``: a median with its 95% interval, or ``-``."""
    value, lo, hi = row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if value is None:
        return "-"
    return fmt.format(value) + (f" [{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None and hi is not None else "")


def _format_table(rows: list[dict[str, Any]]) -> str:
    from fvlab.report.stats import markdown_table

    header = ["model", "resolution", "batch", "params (M)", "GFLOPs", "throughput (img/s) [95%]",
              "speedup [95%]", "latency (ms) [95%]", "backend", "precision", "device"]
    cells = [[row["name"], str(row["image_size"]), str(row.get("batch_size") or "-"),
              f"{row['model/params_m']:.2f}",
              f"{row['model/gflops']:.3f}" if row.get("model/gflops") is not None else "-",
              _interval_cell(row, "model/throughput", "{:.0f}"), _interval_cell(row, "model/speedup", "{:.3f}"),
              _interval_cell(row, "model/latency_ms", "{:.2f}"), str(row.get("backend", "-")),
              str(row.get("precision", "-")), str(row.get("device", "-"))] for row in rows]
    return markdown_table(header, cells)


def profile_command(argv: Sequence[str]) -> int:
    """``fvlab profile``: params, GFLOPs, throughput and latency per model, measured side by side, without training."""
    from fvlab.profile import BACKENDS

    parser = ArgumentParser(prog="fvlab profile", description=profile_command.__doc__)
    parser.add_argument("experiment", nargs="?", help="experiment YAML: profile every variant")
    parser.add_argument("--arch", help="a variant name, e.g. fastervit_0")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: the "
                        "experiment's data image size, or 224 with --arch)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="one row per model and batch size (default: 128 on CUDA, 32 on CPU)")
    parser.add_argument("--batch-size", type=int, help="one throughput batch (same as --batch-sizes B)")
    parser.add_argument("--backend", choices=BACKENDS, default="eager",
                        help="eager PyTorch, torch.compile (inductor), or the exported ONNX graph in "
                             "ONNX Runtime (default: eager)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the experiment's, "
                        "or cuda if available)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast (bf16, fp16 on CUDA; default: the run's precision, or on for CUDA "
                             "with --arch)")
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int,
                        help="interleaved timing rounds (default: 15 on CPU, 30 on CUDA)")
    parser.add_argument("--runs-dir", default="runs", help="where runs/<experiment>/profile.json goes "
                        "(default: runs)")
    parser.add_argument("--no-throughput", action="store_true", help="params and GFLOPs only")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = parser.parse_args(argv)
    trust_checkpoints(args.trust_checkpoint)
    if (args.experiment is None) == (args.arch is None):
        parser.error("give an experiment file or --arch NAME (not both)")
    if args.batch_size is not None and args.batch_sizes is not None:
        parser.error("give --batch-size or --batch-sizes, not both")
    batch_sizes = args.batch_sizes or ([args.batch_size] if args.batch_size else [None])
    for name in ("image_size", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if any(b is not None and b < 1 for b in batch_sizes):
        parser.error(f"batch sizes must be >= 1, got {' '.join(map(str, batch_sizes))}")
    if args.backend == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            parser.error("--backend onnxruntime needs ONNX Runtime: pip install 'fvlab[export]'")

    from fvlab.lit.measure import profile_rows, write_profile_json
    from fvlab.lit.runner import release_memory

    _quiet_lightning()
    try:
        device = _profile_device(args.device)
        experiment, specs = _profile_targets(args, device)
    except BadInput as err:
        print(f"fvlab profile: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    reference = experiment.reference if experiment is not None else None
    precision = None
    if args.amp is not None:
        precision = ("16-mixed" if device.type == "cuda" else "bf16-mixed") if args.amp else "32-true"
    elif args.experiment is None and device.type == "cuda":
        precision = "16-mixed"
    elif any(getattr(spec, "device", device) != device for spec in specs.values()):
        precision = "32-true"  # the run's precision belongs to its own device
    rows = profile_rows(specs, batch_sizes=batch_sizes, reference=reference, throughput=not args.no_throughput,
                        rounds=args.rounds, backend=args.backend, device=device, precision=precision)
    del specs
    release_memory()
    path = None
    if experiment is not None and not args.no_throughput:
        path = Path(args.runs_dir) / experiment.name / "profile.json"
        write_profile_json(path, rows)
    print(json.dumps(rows, indent=2, default=str) if args.json else _format_table(rows))
    if path is not None and not args.json:
        print(f"\nwritten to {path}")
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
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
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
                         f"{'--seeds, ' if seeds else ''}--force, --ckpt_path, --runs-dir, --trust-checkpoint, and "
                         f"dotted config overrides such as --trainer.max_epochs 2")
    args.print_config = "--print_config" in rest
    trust_checkpoints(args.trust_checkpoint)
    rest = [item for item in rest if item != "--print_config"]
    return args, rest




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
        _check_checkpoint(ckpt)
        # run_dir=None, no logger: evaluating adds no events or checkpoints to the run directory.
        spec = build_run(experiment.config(variant), None,
                         {**parse_cli_overrides(overrides), "trainer.logger": False},
                         experiment=experiment.name, variant=variant, seed=seed)
        if stage == "test" and getattr(spec.datamodule, "no_test_split", ""):
            raise BadInput(f"{args.experiment} [{variant}]: no test split to test on: "
                           f"{spec.datamodule.no_test_split}")
    except (BadConfig, ExperimentError) as err:
        print(f"fvlab {stage}: error: {args.experiment}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BadInput as err:
        print(f"fvlab {stage}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    measured = getattr(spec.trainer, stage)(spec.model, datamodule=spec.datamodule, ckpt_path=ckpt,
                                            weights_only=not checkpoints_trusted())
    if stage == "test" and spec.trainer.is_global_zero and run_dir.is_dir():
        from fvlab.lit.runner import write_test_json

        write_test_json(run_dir, ckpt, measured[0] if measured else {}, spec.datamodule)
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
        # Its own context: what a command sets (--trust-checkpoint) ends with it.
        return contextvars.copy_context().run(COMMANDS[command], rest)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # argparse's --help and errors
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
