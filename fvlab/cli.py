"""The ``fvlab`` command: a thin layer over the library.

Exit codes (DESIGN.md): 0 success; 2 bad input (one clear message, no traceback, nothing
written); 1 a failure while running.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from typing import Any, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

DEFAULT_DATA = "fvlab.data.DigitsDataModule"


class BadInput(Exception):
    """Bad user input: reported in one line, exit code 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """Exit with code 2 and a one-line message (argparse prints the whole usage)."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


# ---- fvlab profile ---------------------------------------------------------------------


def data_geometry(config: dict[str, Any]) -> dict[str, Any]:
    """Image size, input channels and classes that an experiment's data section gives the model."""
    from fvlab.experiment import get_dotted

    data = config.get("data") or {}
    class_path = data.get("class_path", DEFAULT_DATA) if isinstance(data, dict) else DEFAULT_DATA
    init_args = dict(get_dotted(config, "data.init_args", None) or
                     {k: v for k, v in (data or {}).items() if k != "class_path"})
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise BadInput(f"data.class_path {class_path!r} cannot be imported; use e.g. "
                       f"{DEFAULT_DATA}") from None
    try:
        datamodule = cls(**init_args)
        return dict(image_size=datamodule.image_size, in_chans=datamodule.in_chans,
                    num_classes=datamodule.num_classes)
    except Exception:
        # Profiling needs no data: fall back to the configured or default sizes.
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        merged = {**defaults, **init_args}
        return dict(image_size=merged.get("image_size", 224), in_chans=merged.get("in_chans") or 3,
                    num_classes=merged.get("num_classes"))


def _profile_targets(args: argparse.Namespace) -> list[tuple[str, Any, dict[str, Any]]]:
    """(row name, arch spec, model/data sizes) for every model to profile."""
    from fvlab.experiment import ExperimentError, get_dotted, load_experiment
    from fvlab.models import list_variants

    if args.experiment is None:
        if args.arch not in list_variants():
            raise BadInput(f"unknown arch {args.arch!r}; known: {', '.join(list_variants())}")
        return [(args.arch, args.arch, dict(image_size=args.image_size or 224))]
    try:
        experiment = load_experiment(args.experiment)
    except ExperimentError as err:
        raise BadInput(str(err)) from None
    targets = []
    for variant in experiment.variant_names():
        config = experiment.config(variant)
        arch = get_dotted(config, "model.arch")
        if arch is None:
            raise BadInput(f"{args.experiment}: variant {variant!r} has no model.arch; "
                           f"set it to a variant name such as fastervit_tiny")
        sizes = data_geometry(config)
        if args.image_size:
            sizes["image_size"] = args.image_size
        targets.append((variant, arch, sizes))
    return targets


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
    parser = _ArgumentParser(prog="fvlab profile", description=profile_command.__doc__)
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

    import torch

    from fvlab.models import build_model
    from fvlab.profile import profile_model

    try:
        targets = _profile_targets(args)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"--device {args.device}: CUDA is not available here; use --device cpu")
        models = []
        for name, arch, sizes in targets:
            overrides = {k: sizes[k] for k in ("in_chans", "num_classes") if sizes.get(k)}
            try:
                models.append((name, build_model(arch, **overrides).to(device), sizes["image_size"]))
            except (ValueError, TypeError) as err:
                raise BadInput(f"{name}: {err}") from None
    except BadInput as err:
        print(f"fvlab profile: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rows = []
    for name, model, image_size in models:
        metrics = profile_model(model, image_size, throughput=not args.no_throughput,
                                batch_size=args.batch_size, device=device, amp=args.amp,
                                repeats=args.repeats)
        rows.append({"name": name, "image_size": image_size, **metrics})
    print(json.dumps(rows, indent=2) if args.json else _format_table(rows))
    return EXIT_OK



# ---- fvlab fit / validate / test -------------------------------------------------------


def _split_fit_args(prog: str, argv: Sequence[str], description: str) -> tuple[argparse.Namespace, list[str]]:
    """fvlab's own options; everything else goes to LightningCLI as overrides."""
    parser = _ArgumentParser(prog=prog, description=description, add_help=False)
    parser.add_argument("experiment", help="experiment YAML file")
    parser.add_argument("--variant", action="append", default=None,
                        help="run only this variant (repeatable)")
    parser.add_argument("--force", action="store_true", help="re-run variants that are complete")
    parser.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", default=None,
                        help="'last' resumes each variant from its last checkpoint; or a file")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        print("\nAny other option is a LightningCLI override, e.g. --trainer.max_epochs 2 "
              "--model.arch.ct_size 4 --data.batch_size 32; --print_config prints the resolved config.")
        raise SystemExit(0 if argv else EXIT_BAD_INPUT)
    args, rest = parser.parse_known_args(argv)
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
    warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")


def _prepare_runs(args: argparse.Namespace, overrides: list[str]) -> tuple[Any, Any, list[Any]]:
    """Load the experiment and check that every selected variant builds; BadInput before anything
    is written. Returns the experiment, its run root and one (variant, config, run_dir) per
    selected variant; the built objects are dropped so that big models are not held at once."""
    import gc
    from pathlib import Path

    from fvlab.experiment import ExperimentError, load_experiment
    from fvlab.lit.runner import BadConfig, build_run

    try:
        experiment = load_experiment(args.experiment)
    except ExperimentError as err:
        raise BadInput(str(err)) from None
    known = experiment.variant_names()
    selected = args.variant or known
    unknown = [v for v in selected if v not in known]
    if unknown:
        raise BadInput(f"unknown variant {', '.join(map(repr, unknown))} in {args.experiment}; "
                       f"known: {', '.join(known)}")
    if args.ckpt_path not in (None, "last", "best") and len(selected) > 1:
        raise BadInput("--ckpt_path FILE needs a single --variant; use --ckpt_path last to "
                       "resume every variant from its own last checkpoint")
    if args.ckpt_path not in (None, "last", "best") and not Path(args.ckpt_path).is_file():
        raise BadInput(f"--ckpt_path: checkpoint file not found: {args.ckpt_path}")
    if Path(args.runs_dir).exists() and not Path(args.runs_dir).is_dir():
        raise BadInput(f"--runs-dir {args.runs_dir} is a file; give a directory (default: runs)")
    root = Path(args.runs_dir) / experiment.name
    planned = []
    for variant in selected:
        config = experiment.config(variant)
        try:
            build_run(config, root / variant, overrides, experiment=experiment.name, variant=variant)
        except BadConfig as err:
            raise BadInput(f"{args.experiment} [{variant}]: {err}") from None
        gc.collect()
        planned.append((variant, config, root / variant))
    return experiment, root, planned


def fit_command(argv: Sequence[str]) -> int:
    """``fvlab fit``: train every variant of an experiment, then print the comparison table."""
    import os

    from fvlab.lit.runner import build_run, fit_run, read_metrics
    from fvlab.report import format_markdown, summary_rows, write_summary

    args, overrides = _split_fit_args("fvlab fit", argv, fit_command.__doc__)
    _quiet_lightning()
    try:
        experiment, root, planned = _prepare_runs(args, overrides)
        todo, notes = [], []
        for variant, config, run_dir in planned:
            previous = read_metrics(run_dir)
            complete = previous is not None and previous.get("status") == "complete"
            last = run_dir / "checkpoints" / "last.ckpt"
            if complete and not args.force:
                notes.append(f"{variant}: complete, skipped (--force re-runs it)")
                continue
            ckpt = args.ckpt_path
            if ckpt == "last":
                ckpt = str(last) if last.is_file() and not args.force else None
            elif ckpt is None and last.is_file() and not complete and not args.force:
                raise BadInput(f"{run_dir} holds an unfinished run with checkpoints/last.ckpt; "
                               f"resume it with --ckpt_path last, or start over with --force")
            todo.append((variant, config, run_dir, ckpt))
    except BadInput as err:
        print(f"fvlab fit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # DDP re-launches this command in each worker process: they must run the same list.
    if os.environ.get("LOCAL_RANK", "0") != "0" and "FVLAB_FIT_VARIANTS" in os.environ:
        names = os.environ["FVLAB_FIT_VARIANTS"].split(",")
        todo = [item for item in todo if item[0] in names]
    else:
        os.environ["FVLAB_FIT_VARIANTS"] = ",".join(item[0] for item in todo)
    for note in notes:
        print(f"[{experiment.name}] {note}")
    failed = False
    try:
        for variant, config, run_dir, ckpt in todo:
            print(f"[{experiment.name}] fitting variant {variant!r} -> {run_dir}"
                  + (f" (resuming {ckpt})" if ckpt else ""), flush=True)
            spec = build_run(config, run_dir, overrides, experiment=experiment.name, variant=variant)
            result = fit_run(spec, ckpt_path=ckpt)
            del spec
            if result["status"] != "complete":
                failed = True
                print(f"[{experiment.name}] variant {variant!r} failed: {result.get('error')}",
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        failed = True
        print(f"[{experiment.name}] interrupted; resume with --ckpt_path last", file=sys.stderr)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return EXIT_OK
    results = [read_metrics(root / v) or {"variant": v, "status": "not run"}
               for v in experiment.variant_names()]
    rows = summary_rows(results)
    write_summary(root, rows, title=f"{experiment.name} ({experiment.path})")
    print(f"\n{experiment.name}: {root}/summary.md, summary.csv; "
          f"tensorboard --logdir {root}\n")
    print(format_markdown(rows))
    return EXIT_FAILURE if failed else EXIT_OK


def _evaluate_command(stage: str, argv: Sequence[str]) -> int:
    """``fvlab validate|test``: LightningCLI's subcommand on one variant, from a checkpoint."""
    args, overrides = _split_fit_args(f"fvlab {stage}", argv, f"run Trainer.{stage}")
    _quiet_lightning()
    try:
        if args.variant and len(args.variant) > 1:
            raise BadInput(f"fvlab {stage} takes at most one --variant")
        overrides = [*overrides, "--trainer.logger", "false"]
        experiment, root, planned = _prepare_runs(args, overrides)
        variant, config, run_dir = planned[0]
        ckpt = args.ckpt_path
        if ckpt in (None, "last", "best"):
            name = "best.ckpt" if ckpt in (None, "best") else "last.ckpt"
            path = run_dir / "checkpoints" / name
            if not path.is_file():
                raise BadInput(f"no checkpoint at {path}; train it with `fvlab fit {args.experiment} "
                               f"--variant {variant}` or pass --ckpt_path FILE")
            ckpt = str(path)
    except BadInput as err:
        print(f"fvlab {stage}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from fvlab.lit.runner import build_run

    # run_dir=None: evaluating writes nothing into the run directory.
    spec = build_run(config, None, overrides, experiment=experiment.name, variant=variant)
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
