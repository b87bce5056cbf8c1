"""The ``fvlab`` command: a thin layer over the library.

Exit codes (DESIGN.md): 0 success; 2 bad input (one clear message, no traceback, nothing
written); 1 a failure while running.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
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


@dataclass
class FitJob:
    """One run of ``fvlab fit``: a variant (and seed), its config, run directory and plan."""

    variant: str
    seed: int | None
    config: dict[str, Any]
    run_dir: Path
    action: str = "fresh"
    ckpt_path: str | None = None
    note: str = ""

    @property
    def label(self) -> str:
        """``variant`` or ``variant/seed_S``."""
        return self.variant if self.seed is None else f"{self.variant}/seed_{self.seed}"


def _own_runs_dir(path: Path, experiment: Any) -> Path | None:
    """For a run's own config.yaml (runs/<name>/<variant>[/seed_<s>]/config.yaml), its runs directory."""
    from fvlab.lit.runner import CONFIG_HEADER

    try:
        if path.name != "config.yaml" or not path.read_text().startswith(CONFIG_HEADER):
            return None
    except OSError:
        return None
    run_dir = path.resolve().parent
    variant_dir = run_dir.parent if run_dir.name.startswith("seed_") else run_dir
    if variant_dir.name != experiment.variant_names()[0] or variant_dir.parent.name != experiment.name:
        return None
    return variant_dir.parent.parent


def _load_selection(args: argparse.Namespace) -> tuple[Any, list[str], list[int] | None]:
    from fvlab.experiment import ExperimentError, load_experiment

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
    if args.runs_dir is None:
        args.runs_dir = str(_own_runs_dir(Path(args.experiment), experiment) or "runs")
    seeds = getattr(args, "seeds", None) or experiment.seeds
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise BadInput(f"--seeds {' '.join(map(str, seeds))} repeats a seed; list each seed once")
    if seeds is not None and any(not 0 <= s < 2**32 for s in seeds):
        raise BadInput(f"--seeds must lie in [0, 2**32), got {seeds}")
    if Path(args.runs_dir).exists() and not Path(args.runs_dir).is_dir():
        raise BadInput(f"--runs-dir {args.runs_dir} is a file; give a directory (default: runs)")
    return experiment, selected, seeds


def _plan_fit(args: argparse.Namespace, overrides: list[str]) -> tuple[Any, Path, list[FitJob]]:
    """Check every selected variant and seed and decide skip/fresh/resume before anything is
    written; BadInput otherwise. Each variant is built once to check it, then dropped, so big
    ablations are never held in memory together."""
    import gc

    from fvlab.experiment import ExperimentError, parse_cli_overrides, run_dir_for
    from fvlab.lit.runner import BadConfig, RunRefused, build_run, config_hash, plan_run

    if args.ckpt_path == "best":
        raise BadInput("--ckpt_path best: fit resumes from the last checkpoint (--ckpt_path last) "
                       "or a checkpoint FILE; best.ckpt is for fvlab validate/test")
    experiment, selected, seeds = _load_selection(args)
    if args.ckpt_path not in (None, "last"):
        if len(selected) * len(seeds or [None]) > 1:
            raise BadInput("--ckpt_path FILE needs a single run (one --variant, one seed); use "
                           "--ckpt_path last to resume every run from its own last checkpoint")
        if not Path(args.ckpt_path).is_file():
            raise BadInput(f"--ckpt_path: checkpoint file not found: {args.ckpt_path}")
    try:
        parsed = parse_cli_overrides(overrides)
    except ExperimentError as err:
        raise BadInput(str(err)) from None
    root = Path(args.runs_dir) / experiment.name
    jobs = []
    for variant in selected:
        config = experiment.config(variant)
        try:
            spec = build_run(config, root / variant, parsed, experiment=experiment.name, variant=variant,
                             seed=seeds[0] if seeds else None)
        except BadConfig as err:
            raise BadInput(f"{args.experiment} [{variant}]: {err}") from None
        resolved = spec.config
        del spec
        gc.collect()
        for seed in seeds or [None]:
            run_dir = run_dir_for(root, variant, seed)
            if seed is not None:
                resolved = {**resolved, "seed_everything": seed}
            try:
                plan = plan_run(run_dir, config_hash(resolved), force=args.force,
                                resume=args.ckpt_path == "last", config=resolved)
            except RunRefused as err:
                raise BadInput(str(err)) from None
            ckpt = args.ckpt_path if args.ckpt_path not in (None, "last") else plan.ckpt_path
            jobs.append(FitJob(variant, seed, config, run_dir, plan.action, ckpt, plan.note))
    return experiment, root, jobs


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


def _fail_build(job: FitJob, experiment: str, error: str) -> dict[str, Any]:
    """Record a run that could not even be built as that run's failure."""
    from fvlab.lit.runner import _write_json

    from fvlab.lit.runner import FINAL_METRICS

    result = {"experiment": experiment, "variant": job.variant, "seed": job.seed, "status": "failed",
              "error": error, "epochs": 0, "wall_s": 0.0, **dict.fromkeys(FINAL_METRICS)}
    job.run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(job.run_dir / "metrics.json", result)
    return result


def fit_command(argv: Sequence[str]) -> int:
    """``fvlab fit``: train every variant (x seed) of an experiment, then print the comparison table."""
    import json
    import os

    from lightning.pytorch.utilities import rank_zero_only

    from fvlab.lit.callbacks import MODEL_METRICS
    from fvlab.lit.runner import BadConfig, build_run, find_runs, fit_run, release_memory
    from fvlab.report import write_summary
    from fvlab.report.collect import read_run

    args, overrides = _split_fit_args("fvlab fit", argv, fit_command.__doc__, seeds=True)
    _quiet_lightning()
    try:
        if args.print_config:
            return _print_config(args, overrides)
        experiment, root, jobs = _plan_fit(args, overrides)
    except BadInput as err:
        print(f"fvlab fit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # DDP re-launches this command in every process: the other ranks follow rank 0's plan, read
    # before rank 0 started writing (the building above set Lightning's own global rank).
    rank = rank_zero_only.rank
    if rank != 0 and "FVLAB_FIT_PLAN" in os.environ:
        plan = {tuple(item[:2]): item[2] for item in json.loads(os.environ["FVLAB_FIT_PLAN"])}
        jobs = [job for job in jobs if (job.variant, job.seed) in plan]
        for job in jobs:
            job.ckpt_path = plan[(job.variant, job.seed)]
            job.action = "resume" if job.ckpt_path else "fresh"
    else:
        os.environ["FVLAB_FIT_PLAN"] = json.dumps(
            [[job.variant, job.seed, job.ckpt_path] for job in jobs if job.action != "skip"])
    for job in jobs:
        if job.action == "skip" and rank == 0:
            print(f"[{experiment.name}] {job.label}: {job.note}")
    failed = False
    measured: dict[str, dict[str, Any]] = {}  # the architecture's figures, once per variant
    try:
        for job in (job for job in jobs if job.action != "skip"):
            if rank == 0:
                print(f"[{experiment.name}] fitting {job.label} -> {job.run_dir}"
                      + (f" (resuming {job.ckpt_path})" if job.ckpt_path else ""), flush=True)
            world_size = 1
            try:
                spec = build_run(job.config, job.run_dir, overrides, experiment=experiment.name,
                                 variant=job.variant, seed=job.seed)
            except BadConfig as err:
                result = _fail_build(job, experiment.name, f"BadConfig: {err}") if rank == 0 else {}
            else:
                result = fit_run(spec, ckpt_path=job.ckpt_path, model_metrics=measured.get(job.variant))
                world_size = spec.trainer.world_size
                del spec
                release_memory()
                if all(result.get(k) is not None for k in MODEL_METRICS):
                    measured[job.variant] = {k: result[k] for k in MODEL_METRICS}
            if result.get("status") not in (None, "complete"):
                failed = True
                print(f"[{experiment.name}] {job.label} failed: {result.get('error')}",
                      file=sys.stderr, flush=True)
                if world_size > 1:
                    print(f"[{experiment.name}] a failure under several processes ends the job on "
                          f"every rank; fix it, then rerun to train what is left", file=sys.stderr)
                    break
    except KeyboardInterrupt:
        failed = True
        print(f"[{experiment.name}] interrupted; resume with --ckpt_path last", file=sys.stderr)
    if rank != 0:
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


# ---- fvlab export ----------------------------------------------------------------------


def _load_weights(model: Any, path: str | Path, trust_checkpoint: bool) -> None:
    """Load a checkpoint into ``model`` (its EMA weights when EMA ran); BadInput if it cannot be."""
    import inspect
    import pickle

    from fvlab.models import load_checkpoint

    # The loader grows a trust_checkpoint opt-in (DESIGN.md); pass it on once it has one.
    trust = ({"trust_checkpoint": True} if trust_checkpoint
             and "trust_checkpoint" in inspect.signature(load_checkpoint).parameters else {})
    try:
        load_checkpoint(model, path, **trust)
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInput(f"cannot load checkpoint {path}: {first_line}") from None


def _export_target(args: argparse.Namespace) -> tuple[Any, Path, int]:
    """(model with its weights, output path, image size) for ``fvlab export``; BadInput otherwise."""
    from fvlab.experiment import ExperimentError, load_experiment, run_dir_for
    from fvlab.lit.runner import BadConfig, build_run
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
        image_size = args.image_size or model.pretrained_cfg["input_size"][-1]
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
        run_dir = run_dir_for(Path(args.runs_dir) / experiment.name, variant, seed)
        ckpt = args.ckpt_path
        if ckpt in (None, "best", "last"):
            ckpt = run_dir / "checkpoints" / ("last.ckpt" if ckpt == "last" else "best.ckpt")
            if not ckpt.is_file():
                raise BadInput(f"no checkpoint at {ckpt}; train it with `fvlab fit {args.experiment} "
                               f"--variant {variant}` or pass --ckpt_path FILE")
        try:
            # The run's own model (classes and channels from its data); nothing is written.
            spec = build_run(experiment.config(variant), None, {"trainer.logger": False},
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


def export_command(argv: Sequence[str]) -> int:
    """``fvlab export``: ONNX with dynamic batch and image size, checked in ONNX Runtime first."""
    from fvlab.export import (DEFAULT_OPSET, EXPORTER, INSTALL_HINT, check_onnx, export_onnx,
                              missing_export_packages, parity_sizes, remove_onnx)

    parser = ArgumentParser(prog="fvlab export", description=export_command.__doc__)
    parser.add_argument("experiment", nargs="?", help="experiment YAML: export a trained variant")
    parser.add_argument("--variant", help="the variant to export (needed if the file has several)")
    parser.add_argument("--seed", type=int, help="which seed's run (default: the file's first seed)")
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
                        help="load a checkpoint that holds more than tensors (only files you trust)")
    args = parser.parse_args(argv)
    if (args.experiment is None) == (args.arch is None):
        parser.error("give an experiment file or --arch NAME (not both)")
    if args.arch is not None and (args.variant or args.seed is not None):
        parser.error("--variant and --seed pick a run of an experiment; with --arch give --ckpt_path")
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size must be >= 1, got {args.image_size}")
    if not 7 <= args.opset <= 23:
        parser.error(f"--opset must be between 7 and 23 (default {DEFAULT_OPSET}), got {args.opset}")
    if not args.atol > 0:
        parser.error(f"--atol must be > 0, got {args.atol}")
    missing = missing_export_packages()
    if missing:
        print(f"fvlab export: error: ONNX export needs {', '.join(missing)}; {INSTALL_HINT}",
              file=sys.stderr)
        return EXIT_BAD_INPUT

    _quiet_lightning()
    try:
        model, out, image_size = _export_target(args)
        try:
            sizes = parity_sizes(model, image_size)
        except ValueError as err:
            raise BadInput(f"--image-size {image_size}: {err}") from None
    except BadInput as err:
        print(f"fvlab export: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_onnx(model, out, opset=args.opset)
        rows = check_onnx(out, model, sizes)
    except Exception as err:  # noqa: BLE001 - an export failure is a failure while running
        remove_onnx(out)
        print(f"fvlab export: failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}",
              file=sys.stderr)
        return EXIT_FAILURE
    print(f"ONNX Runtime vs PyTorch (fp32 logits), {EXPORTER}, opset {args.opset}:")
    for row in rows:
        print(f"  batch {row['batch']}  {row['height']}x{row['width']}  "
              f"max |diff| {row['max_abs_diff']:.2e}")
    worst = max(row["max_abs_diff"] for row in rows)
    if not worst <= args.atol:
        remove_onnx(out)
        print(f"fvlab export: refused: max |diff| {worst:.2e} > {args.atol:g}; {out} removed",
              file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {out} (dynamic batch, height and width; BatchNorm fused; fp32; "
          f"max |diff| {worst:.2e} <= {args.atol:g})")
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
    try:
        return COMMANDS[command](rest)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # argparse's --help and errors
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
