"""The ``fvlab`` command: a thin layer over the library.

Exit codes: 0 success; 2 bad input (one clear message, no traceback, nothing written, so a
corrected rerun starts clean); 1 a failure while running.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from fvlab._argparse import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, ArgumentParser
from fvlab.metrics import GFLOPS, LATENCY_MS, PARAMS_M, SPEEDUP, THROUGHPUT
from fvlab.models.checkpoint import checkpoints_trusted, trust_checkpoints
from fvlab.runs import PROFILE_FILE
from fvlab.runtime import quiet_lightning as _quiet_lightning
from fvlab.tables import interval_cell, markdown_table


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
    from fvlab.experiment import ExperimentError, load_experiment
    from fvlab.lit.build import BadConfig, build_run
    from fvlab.lit.measure import Target
    from fvlab.models import create_model, list_variants

    if args.experiment is None:
        if args.arch not in list_variants():
            raise BadInput(f"unknown arch {args.arch!r}; known: {', '.join(list_variants())}")
        return None, {args.arch: Target(create_model(args.arch), args.image_size or 224, None, device)}
    try:
        experiment = load_experiment(args.experiment)
    except ExperimentError as err:
        raise BadInput(str(err)) from None
    targets = {}
    sized = {"data.image_size": args.image_size} if args.image_size else {}
    for variant in experiment.variant_names():
        try:
            targets[variant] = build_run(experiment.layers(variant), None,
                                         [sized, *args.overrides, {"trainer.logger": False}],
                                         experiment=experiment.name, variant=variant)
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
    return interval_cell(row.get(key), row.get(f"{key}_lo"), row.get(f"{key}_hi"), fmt)


def _format_table(rows: list[dict[str, Any]]) -> str:
    """fvlab profile's rows as a markdown table."""
    header = ["model", "resolution", "batch", "params (M)", "GFLOPs", "throughput (img/s) [95%]",
              "speedup [95%]", "latency (ms) [95%]", "backend", "precision", "device"]
    cells = [[row["name"], str(row["image_size"]), str(row.get("batch_size") or "-"),
              f"{row[PARAMS_M]:.2f}",
              f"{row[GFLOPS]:.3f}" if row.get(GFLOPS) is not None else "-",
              _interval_cell(row, THROUGHPUT, "{:.0f}"), _interval_cell(row, SPEEDUP, "{:.3f}"),
              _interval_cell(row, LATENCY_MS, "{:.2f}"), str(row.get("backend", "-")),
              str(row.get("precision", "-")), str(row.get("device", "-"))] for row in rows]
    return markdown_table(header, cells)


def _profile_parser() -> ArgumentParser:
    """The parser of ``fvlab profile``'s own options."""
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
                        help="interleaved timing rounds of about 0.2 s each (default: 60)")
    parser.add_argument("--runs-dir", default="runs", help="where runs/<experiment>/profile.json goes "
                        "(default: runs)")
    parser.add_argument("--no-throughput", action="store_true", help="params and GFLOPs only")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    return parser


def _check_profile_args(parser: ArgumentParser, args: argparse.Namespace) -> list[int | None]:
    """The batch sizes to measure; parser.error (exit 2) for options that clash or are out of range."""
    if (args.experiment is None) == (args.arch is None):
        parser.error("give an experiment file or --arch NAME (not both)")
    if args.arch is not None and args.overrides:
        parser.error(f"{args.overrides[0]}: config options need an experiment file, not --arch")
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
    return batch_sizes


def _profile_precision(args: argparse.Namespace, device: Any, specs: dict[str, Any]) -> str | None:
    """The precision to measure at, or None for each run's own."""
    if args.amp is not None:
        return ("16-mixed" if device.type == "cuda" else "bf16-mixed") if args.amp else "32-true"
    if args.experiment is None and device.type == "cuda":
        return "16-mixed"
    if any(getattr(spec, "device", device) != device for spec in specs.values()):
        return "32-true"  # the run's precision belongs to its own device
    return None


def profile_command(argv: Sequence[str]) -> int:
    """``fvlab profile``: params, GFLOPs, throughput and latency per model, measured side by side, without training."""
    parser = _profile_parser()
    args = _parse_with_overrides(parser, argv, help_when_empty=False)
    trust_checkpoints(args.trust_checkpoint)
    batch_sizes = _check_profile_args(parser, args)

    from fvlab.lit.fit import release_memory
    from fvlab.lit.measure import profile_rows, write_profile_json

    _quiet_lightning()
    try:
        device = _profile_device(args.device)
        experiment, specs = _profile_targets(args, device)
    except BadInput as err:
        print(f"fvlab profile: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    reference = experiment.reference if experiment is not None else None
    precision = _profile_precision(args, device, specs)
    rows = profile_rows(specs, batch_sizes=batch_sizes, reference=reference, throughput=not args.no_throughput,
                        rounds=args.rounds, backend=args.backend, device=device, precision=precision)
    del specs
    release_memory()
    path = None
    if experiment is not None and not args.no_throughput:
        path = Path(args.runs_dir) / experiment.name / PROFILE_FILE
        write_profile_json(path, rows)
    print(json.dumps(rows, indent=2, default=str) if args.json else _format_table(rows))
    if path is not None and not args.json:
        print(f"\nwritten to {path}")
    return EXIT_OK


# ---- fvlab fit / validate / test -------------------------------------------------------


CONFIG_HELP = ("Any other option is LightningCLI's, merged in order after the experiment file: "
               "--config FILE (repeatable), --key value or --key=value (e.g. --trainer.max_epochs 2 "
               "--model.arch.ct_size 4 --data.batch_size 32), --trainer.callbacks+=CLASS, "
               "--print_config[=skip_null] (print the resolved config and exit).")
# Options without a dot that LightningCLI takes (every config key has a dot).
_CLI_OPTIONS = ("config", "print_config", "seed_everything", "name")


def _parse_with_overrides(parser: ArgumentParser, argv: Sequence[str],
                          help_when_empty: bool = True) -> argparse.Namespace:
    """fvlab's own options into a namespace; the rest, LightningCLI's, into ``overrides`` unparsed
    (LightningCLI parses them, after the experiment's own config). With no arguments: the help
    (exit 2), or, where ``help_when_empty`` is off, the command's own check names what is missing."""
    if (not argv and help_when_empty) or (argv and argv[0] in ("-h", "--help")) or "--help" in argv:
        parser.print_help()
        print(f"\n{CONFIG_HELP}")
        raise SystemExit(0 if argv else EXIT_BAD_INPUT)
    args, rest = parser.parse_known_args(argv)
    own = ", ".join(parser.own_options)
    for item in rest:
        key = item[2:].partition("=")[0] if item.startswith("--") else ""
        if key and "." not in key and key not in _CLI_OPTIONS:
            parser.error(f"unknown option --{key}; the options are {own}, and LightningCLI's: "
                         f"--config FILE, --print_config and config keys such as --trainer.max_epochs 2")
    args.overrides = rest
    return args


def _split_fit_args(prog: str, argv: Sequence[str], description: str,
                    seeds: bool = False) -> tuple[argparse.Namespace, list[str]]:
    """fvlab's own options; everything else goes to LightningCLI, after the experiment's config."""
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
    args = _parse_with_overrides(parser, argv)
    trust_checkpoints(args.trust_checkpoint)
    return args, args.overrides


def _load_selection(args: argparse.Namespace) -> tuple[Any, list[str], list[int] | None]:
    """The experiment, variants and seeds that ``args`` select (BadInput if bad); fills in args.runs_dir."""
    from fvlab.lit.plan import PlanError, load_selection

    try:
        selection = load_selection(args.experiment, args.variant, getattr(args, "seeds", None), args.runs_dir)
    except PlanError as err:
        raise BadInput(str(err)) from None
    args.runs_dir = str(selection.runs_dir)
    return selection.experiment, selection.variants, selection.seeds


def _run_checkpoint(experiment: Any, runs_dir: str, variant: str, seed: int | None,
                    ckpt_path: str | None) -> tuple[Path, Path]:
    """fvlab.lit.plan.run_checkpoint, with its PlanError as BadInput."""
    from fvlab.lit.plan import PlanError, run_checkpoint

    try:
        return run_checkpoint(experiment, runs_dir, variant, seed, ckpt_path)
    except PlanError as err:
        raise BadInput(str(err)) from None


def _plan_fit(args: argparse.Namespace, overrides: list[str]) -> Any:
    """Every selected run with its action (fvlab.lit.plan.plan_fit), decided before anything is written."""
    from fvlab.lit.plan import PlanError, Selection, plan_fit

    experiment, selected, seeds = _load_selection(args)
    try:
        return plan_fit(Selection(experiment, selected, seeds, Path(args.runs_dir)), overrides,
                        force=args.force, ckpt_path=args.ckpt_path)
    except PlanError as err:
        raise BadInput(str(err)) from None


def fit_command(argv: Sequence[str]) -> int:
    """``fvlab fit``: train every variant (x seed) of an experiment, then print the comparison table."""
    from lightning.pytorch.utilities import rank_zero_only

    from fvlab.lit.plan import fit_jobs
    from fvlab.report import write_summary
    from fvlab.report.collect import read_run
    from fvlab.runs import find_runs

    args, overrides = _split_fit_args("fvlab fit", argv, fit_command.__doc__, seeds=True)
    _quiet_lightning()
    try:
        # Every DDP rank plans alike (see fvlab.lit.plan); --print_config prints the first run's config.
        plan = _plan_fit(args, overrides)
    except BadInput as err:
        print(f"fvlab fit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    experiment, root, jobs = plan.experiment, plan.root, plan.jobs
    failed = fit_jobs(plan)
    if rank_zero_only.rank != 0:
        return EXIT_FAILURE if failed else EXIT_OK
    # Every run of the experiment directory, not only this command's: a rerun of one variant's
    # config.yaml keeps the other rows.
    found = find_runs(root)
    results = [read_run(run_dir, events=False).metrics for run_dir in found]
    results += [{"experiment": experiment.name, "variant": job.variant, "seed": job.seed,
                 "status": "not run"} for job in jobs if job.run_dir not in found]
    table = write_summary(root, results, title=f"{experiment.name} ({experiment.path})",
                          reference=experiment.reference, variant_order=experiment.variant_names())
    print(f"\n{experiment.name}: {root}/summary.md, summary.csv; tensorboard --logdir {root}\n")
    print(table)
    return EXIT_FAILURE if failed else EXIT_OK


def _evaluate_command(stage: str, argv: Sequence[str]) -> int:
    """``fvlab validate|test``: LightningCLI's own subcommand on one variant, from a checkpoint."""
    from fvlab.experiment import ExperimentError
    from fvlab.lit.build import BadConfig, run_stage
    from fvlab.lit.fit import write_test_json

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
        run_dir, path = _run_checkpoint(experiment, args.runs_dir, variant, seed, args.ckpt_path)
        ckpt = str(path)
        _check_checkpoint(ckpt)
        # run_dir=None, no logger: evaluating adds no events or checkpoints to the run directory.
        done = run_stage(stage, experiment.layers(variant), ckpt, [*overrides, {"trainer.logger": False}],
                         experiment=experiment.name, variant=variant, seed=seed,
                         weights_only=not checkpoints_trusted())
    except (BadConfig, ExperimentError) as err:
        print(f"fvlab {stage}: error: {args.experiment}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BadInput as err:
        print(f"fvlab {stage}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if stage == "test" and done.trainer.is_global_zero and run_dir.is_dir():
        write_test_json(run_dir, ckpt, done.measured, done.datamodule, done.model.task)
    return EXIT_OK


def validate_command(argv: Sequence[str]) -> int:
    """``fvlab validate``: validation metrics of a trained variant."""
    return _evaluate_command("validate", argv)


def testing_command(argv: Sequence[str]) -> int:
    """``fvlab test``: test metrics of a trained variant."""
    return _evaluate_command("test", argv)


# ---- fvlab export ----------------------------------------------------------------------


def _load_weights(model: Any, path: str | Path, trust_checkpoint: bool) -> None:
    """Load a checkpoint into ``model`` (its EMA weights when EMA ran); BadInput if it cannot be."""
    import pickle

    from fvlab.models import load_checkpoint
    from fvlab.models.checkpoint import UntrustedCheckpointError

    try:
        load_checkpoint(model, path, trust_checkpoint=trust_checkpoint or None)
    except UntrustedCheckpointError as err:
        raise BadInput(str(err)) from None
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInput(f"cannot load checkpoint {path}: {first_line}") from None


def _export_target(args: argparse.Namespace) -> tuple[Any, Path, int]:
    """(model with its weights, output path, image size) for ``fvlab export``; BadInput otherwise."""
    from fvlab.experiment import ExperimentError, load_experiment
    from fvlab.export import fixed_image_size
    from fvlab.lit.build import BadConfig, build_run
    from fvlab.models import create_model, list_variants

    if args.ckpt_path not in (None, "best", "last") and not Path(args.ckpt_path).is_file():
        raise BadInput(f"--ckpt_path: checkpoint file not found: {args.ckpt_path}")
    if args.experiment is None:
        if args.arch not in list_variants():
            raise BadInput(f"unknown arch {args.arch!r}; known: {', '.join(list_variants())}")
        if args.ckpt_path in ("best", "last"):
            raise BadInput(f"--ckpt_path {args.ckpt_path} names a run's checkpoint; with --arch give a FILE")
        model = create_model(args.arch)
        if args.ckpt_path is not None:
            _load_weights(model, args.ckpt_path, args.trust_checkpoint)
        fixed = fixed_image_size(model)
        image_size = args.image_size or (fixed[0] if fixed else model.pretrained_cfg["input_size"][-1])
        out = Path(args.out or f"{args.arch}.onnx")
    else:
        try:
            experiment = load_experiment(args.experiment)
        except ExperimentError as err:
            raise BadInput(str(err)) from None
        known = experiment.variant_names()
        if args.variant is None and len(known) > 1:
            raise BadInput(f"{args.experiment} has {len(known)} variants; name one with --variant "
                           f"({', '.join(known)})")
        variant = args.variant or known[0]
        if variant not in known:
            raise BadInput(f"unknown variant {variant!r} in {args.experiment}; known: {', '.join(known)}")
        if args.seed is not None and args.seed not in (experiment.seeds or []):
            raise BadInput(f"--seed {args.seed}: {args.experiment} has "
                           + (f"seeds {', '.join(map(str, experiment.seeds))}" if experiment.seeds
                              else "no seeds list (one run per variant); drop --seed"))
        seed = args.seed if args.seed is not None else (experiment.seeds or [None])[0]
        run_dir, ckpt = _run_checkpoint(experiment, args.runs_dir, variant, seed, args.ckpt_path)
        try:
            # The run's own model (classes and channels from its data); nothing is written.
            spec = build_run(experiment.layers(variant), None, [*args.overrides, {"trainer.logger": False}],
                             experiment=experiment.name, variant=variant, seed=seed)
        except BadConfig as err:
            raise BadInput(f"{args.experiment} [{variant}]: {err}") from None
        model = spec.model.model
        image_size = args.image_size or getattr(spec.datamodule, "image_size", None) or 224
        del spec
        _load_weights(model, ckpt, args.trust_checkpoint)
        out = Path(args.out) if args.out else run_dir / "model.onnx"
    if out.suffix != ".onnx" or out.is_dir():
        raise BadInput(f"--out {out}: give a file name ending in .onnx")
    return model, out, image_size


def _export_parser() -> ArgumentParser:
    """The parser of ``fvlab export``'s own options."""
    from fvlab.export import DEFAULT_OPSET

    parser = ArgumentParser(prog="fvlab export", description=export_command.__doc__)
    parser.add_argument("experiment", nargs="?", help="experiment YAML: export a trained variant")
    parser.add_argument("--variant", help="the variant to export (needed if the file has several)")
    parser.add_argument("--seeds", "--seed", dest="seed", type=int,
                        help="which seed's run (default: the file's first seed)")
    parser.add_argument("--arch", help="a variant name, e.g. fastervit_0: untrained, or --ckpt_path weights")
    parser.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", default=None,
                        help="checkpoint FILE, or best (default) / last of the run")
    parser.add_argument("--out", help="output .onnx file (default: <run dir>/model.onnx, or ./<arch>.onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--image-size", type=int, help="side of the check's first image size (default: "
                        "the experiment's data image size, or the variant's default input size)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest max abs difference of logits the check accepts (default 1e-4)")
    parser.add_argument("--runs-dir", default="runs", help="where run directories are (default: runs)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help=TRUST_HELP)
    return parser


def _check_export_args(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit 2) for ``fvlab export`` options that clash or are out of range."""
    from fvlab.export import DEFAULT_OPSET

    if (args.experiment is None) == (args.arch is None):
        parser.error("give an experiment file or --arch NAME (not both)")
    if args.arch is not None and (args.variant or args.seed is not None):
        parser.error("--variant and --seeds pick a run of an experiment; with --arch give --ckpt_path")
    if args.arch is not None and args.overrides:
        parser.error(f"{args.overrides[0]}: config options need an experiment file, not --arch")
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size must be >= 1, got {args.image_size}")
    if not 7 <= args.opset <= 23:
        parser.error(f"--opset must be between 7 and 23 (default {DEFAULT_OPSET}), got {args.opset}")
    if not args.atol > 0:
        parser.error(f"--atol must be > 0, got {args.atol}")


def _export_plan(args: argparse.Namespace) -> tuple[Any, Path, list[tuple[int, int]]]:
    """(model with its weights, output path, the image sizes to check it at); BadInput otherwise."""
    from fvlab.export import parity_sizes

    model, out, image_size = _export_target(args)
    try:
        sizes = parity_sizes(model, image_size)
    except ValueError as err:
        raise BadInput(f"--image-size {image_size}: {err}") from None
    return model, out, sizes


def _export_and_check(model: Any, out: Path, opset: int,
                      sizes: list[tuple[int, int]]) -> list[dict[str, Any]] | None:
    """Write the ONNX file and compare it with PyTorch at ``sizes``: the rows, or None (reported) on failure."""
    from fvlab.export import check_onnx, export_onnx, remove_onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_onnx(model, out, opset=opset)
        return check_onnx(out, model, sizes)
    except Exception as err:  # noqa: BLE001 - an export failure is a failure while running
        remove_onnx(out)
        print(f"fvlab export: failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}",
              file=sys.stderr)
        return None


def _print_parity(rows: list[dict[str, Any]], opset: int) -> float:
    """Print the check's rows; the largest difference of logits among them."""
    from fvlab.export import EXPORTER

    print(f"ONNX Runtime vs PyTorch (fp32 logits), {EXPORTER}, opset {opset}:")
    for row in rows:
        print(f"  batch {row['batch']}  {row['height']}x{row['width']}  "
              f"max |diff| {row['max_abs_diff']:.2e}")
    return max(row["max_abs_diff"] for row in rows)


def export_command(argv: Sequence[str]) -> int:
    """``fvlab export``: ONNX with dynamic batch and image size, checked in ONNX Runtime first."""
    from fvlab.export import INSTALL_HINT, fixed_image_size, missing_export_packages, remove_onnx

    parser = _export_parser()
    args = _parse_with_overrides(parser, argv, help_when_empty=False)
    _check_export_args(parser, args)
    missing = missing_export_packages()
    if missing:
        print(f"fvlab export: error: ONNX export needs {', '.join(missing)}; {INSTALL_HINT}",
              file=sys.stderr)
        return EXIT_BAD_INPUT

    _quiet_lightning()
    try:
        model, out, sizes = _export_plan(args)
    except BadInput as err:
        print(f"fvlab export: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = _export_and_check(model, out, args.opset, sizes)
    if rows is None:
        return EXIT_FAILURE
    worst = _print_parity(rows, args.opset)
    if not worst <= args.atol:
        remove_onnx(out)
        print(f"fvlab export: refused: max |diff| {worst:.2e} > {args.atol:g}; {out} removed",
              file=sys.stderr)
        return EXIT_FAILURE
    fixed = fixed_image_size(model)
    shapes = "dynamic batch, height and width" if fixed is None else f"dynamic batch; {fixed[0]}x{fixed[1]} images only"
    fused = "; BatchNorm fused" if hasattr(model, "fuse") else ""
    print(f"wrote {out} ({shapes}{fused}; fp32; max |diff| {worst:.2e} <= {args.atol:g})")
    return EXIT_OK


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
            "profile": profile_command, "sweep": sweep_command, "report": report_command,
            "export": export_command}


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
              "  report    report.md, tables and plots comparing runs, variants, seeds and trials\n"
              "  export    ONNX with dynamic batch and image size, checked in ONNX Runtime\n\n"
              "Run `fvlab COMMAND --help` for a command's options.")
        return EXIT_OK if argv else EXIT_BAD_INPUT
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fvlab: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    from fvlab.runtime import frozen_heap

    if command in ("fit", "validate", "test", "profile", "sweep"):
        import lightning.pytorch  # noqa: F401  (imported now so that the freeze below covers it)
    # What is loaded by now lives as long as the process: frozen, it is not walked by every
    # collection that frees a run's models and trainers.
    try:
        with frozen_heap():
            # Its own context: what a command sets (--trust-checkpoint) ends with it.
            return contextvars.copy_context().run(COMMANDS[command], rest)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # argparse's --help and errors
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
