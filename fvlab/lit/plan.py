"""``fvlab fit`` as library calls: select, plan, then fit an experiment's runs.

- ``load_selection``: the experiment, the variants and seeds asked for, and the runs directory;
- ``plan_run``: the skip / resume / refuse policy for one existing run directory;
- ``plan_fit``: every selected run built once (to check it) and given its action (skip, fresh,
  resume; ``plan_run``'s rules) before anything is written;
- ``fit_jobs``: the planned runs fitted in order, the architecture measured once per variant.

Under DDP every process runs the same command (Lightning's launcher re-runs it when the first
fit starts; torchrun starts them all) and plans for itself. The plans agree: the other ranks
plan before they join the first fit, and until then rank 0 has written only what keeps its own
plan (the first run's config.yaml over a fresh or restarted directory; a resumed one as it was).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_only

from fvlab.experiment import Experiment, ExperimentError, load_experiment
from fvlab.lit.build import BadConfig, build_run
from fvlab.lit.fit import fit_run, release_memory
from fvlab.metrics import FINAL_METRICS
from fvlab.runs import (CONFIG_FILE, DISPLAY_KEYS, METRICS_FILE, changed_keys, checkpoint_path, config_hash,
                        is_run_config, is_run_dir, layout_conflict, read_metrics, run_dir_for, trained_config,
                        variant_dir_of, write_json)

__all__ = ["RunRefused", "RunPlan", "plan_run", "changed_run_keys", "PlanError", "FitJob", "Selection", "FitPlan", "own_runs_dir", "load_selection", "plan_fit",
           "fail_build", "fit_jobs", "check_checkpoint", "run_checkpoint"]


# ---- one run directory: skip, fresh, resume or refuse --------------------------------


class RunRefused(ValueError):
    """A run directory whose finished work a new run would throw away: the message says what to pass."""


@dataclass
class RunPlan:
    """What to do with a run directory: ``skip`` it, start it ``fresh`` or ``resume`` it."""

    action: str
    ckpt_path: str | None = None
    note: str = ""


def _stored_hash(run_dir: Path, previous: Mapping[str, Any]) -> str | None:
    # A run killed before it wrote metrics.json still has its config.yaml.
    if previous.get("config_hash"):
        return previous["config_hash"]
    stored = trained_config(run_dir)
    return config_hash(stored) if stored is not None else None


def _changes(run_dir: Path, config: Mapping[str, Any] | None) -> tuple[str, list[str]]:
    """`` (changed: a, b)`` naming the keys that differ from the stored config, and the keys."""
    stored = trained_config(run_dir) if config is not None else None
    if stored is None:
        return "", []
    keys = changed_keys(stored, dict(config), DISPLAY_KEYS)
    if not keys:
        return "", []
    return f" (changed: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''})", keys


def changed_run_keys(run_dir: Path, config: Mapping[str, Any]) -> list[str]:
    """Dotted keys in which ``config`` differs from the config a run directory was trained with."""
    return _changes(Path(run_dir), config)[1]


def plan_run(run_dir: Path, config_hash: str, *, force: bool = False, resume: bool = False,
             config: Mapping[str, Any] | None = None) -> RunPlan:
    """Skip a complete unchanged run, resume an unfinished one on request (same config only),
    restart on --force; refuse anything that would lose work silently (RunRefused)."""
    run_dir = Path(run_dir)
    last = checkpoint_path(run_dir, "last")
    layout = layout_conflict(run_dir)
    if layout:
        raise RunRefused(layout)
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return RunPlan("fresh", note="resume requested, but nothing to resume" if resume else "")
    if not run_dir.is_dir() or not is_run_dir(run_dir):
        raise RunRefused(f"{run_dir} exists and is not an fvlab run directory (no metrics.json or "
                         f"fvlab config.yaml); move it away or choose another --runs-dir")
    if force:
        return RunPlan("fresh", note="--force: started again")
    previous = read_metrics(run_dir) or {}
    complete = previous.get("status") == "complete"
    same = _stored_hash(run_dir, previous) == config_hash
    if complete and same:
        return RunPlan("skip", note="complete, skipped (--force re-runs it)")
    if not complete and not last.is_file():
        return RunPlan("fresh", note="an earlier attempt failed before its first checkpoint; started again"
                       if previous else "")
    if same:  # unfinished, with a last.ckpt
        if resume:
            return RunPlan("resume", str(last), note=f"resuming {last}")
        raise RunRefused(f"{run_dir} holds an unfinished run with {last.relative_to(run_dir)}; resume it "
                         f"with --ckpt_path last, or start over with --force")
    changed, keys = _changes(run_dir, config)
    state = "a complete" if complete else "an unfinished"
    # Lightning restores the optimizer and the timm schedule from last.ckpt: a resume under another
    # config would mix two trainings (a longer run would spend its extra epochs at min_lr).
    why = " --ckpt_path last continues the same config only;" if resume else ""
    longer = (" (a resumed schedule keeps its old length, so training longer means training again)"
              if resume and any(k in ("trainer.max_epochs", "trainer.max_steps") for k in keys) else "")
    raise RunRefused(f"{run_dir} holds {state} run trained with a different config{changed};{why} "
                     f"re-train it with --force{longer}, or keep it and use another --runs-dir")


# ---- an experiment's runs ------------------------------------------------------------


class PlanError(ValueError):
    """Bad input to ``fvlab fit`` (unknown variant, bad seeds, a run it would overwrite ...): exit 2."""


@dataclass
class FitJob:
    """One run of ``fvlab fit``: a variant (and seed), its resolved config, run directory and plan."""

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
        return run_dir_for(Path(), self.variant, self.seed).as_posix()


@dataclass
class Selection:
    """What a command works on: the experiment, the variants and seeds asked for, where runs go."""

    experiment: Experiment
    variants: list[str]
    seeds: list[int] | None
    runs_dir: Path


@dataclass
class FitPlan:
    """Every selected run of an experiment with its action, in the order they are fitted."""

    experiment: Experiment
    root: Path
    jobs: list[FitJob]
    force: bool = False  # --force: trained and measured again
    # The command line's config arguments (--config FILE, --key value ...), for variants not selected.
    overrides: list[str] = field(default_factory=list)
    # The networks plan_fit built (with their identities), measured without building them again.
    built: dict[str, Any] = field(default_factory=dict, repr=False)


def own_runs_dir(path: Path, experiment: Experiment) -> Path | None:
    """For a run's own config.yaml (runs/<name>/<variant>[/seed_<s>]/config.yaml), its runs directory."""
    if path.name != CONFIG_FILE or not is_run_config(path):
        return None
    variant_dir = variant_dir_of(path.resolve().parent)
    if variant_dir.name != experiment.variant_names()[0] or variant_dir.parent.name != experiment.name:
        return None
    return variant_dir.parent.parent


def load_selection(path: str | Path, variants: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                   runs_dir: str | Path | None = None) -> Selection:
    """Load the experiment and check the variants and seeds asked for (default: the file's); PlanError if bad.

    ``runs_dir`` defaults to ``runs``, or for a run's own config.yaml to the runs directory it lives in.
    """
    try:
        experiment = load_experiment(path)
    except ExperimentError as err:
        raise PlanError(str(err)) from None
    known = experiment.variant_names()
    selected = list(variants or known)
    unknown = [v for v in selected if v not in known]
    if unknown:
        raise PlanError(f"unknown variant {', '.join(map(repr, unknown))} in {path}; "
                        f"known: {', '.join(known)}")
    if runs_dir is None:
        runs_dir = own_runs_dir(Path(path), experiment) or "runs"
    seeds = list(seeds) if seeds else experiment.seeds
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise PlanError(f"--seeds {' '.join(map(str, seeds))} repeats a seed; list each seed once")
    if seeds is not None and any(not 0 <= s < 2**32 for s in seeds):
        raise PlanError(f"--seeds must lie in [0, 2**32), got {seeds}")
    if Path(runs_dir).exists() and not Path(runs_dir).is_dir():
        raise PlanError(f"--runs-dir {runs_dir} is a file; give a directory (default: runs)")
    return Selection(experiment, selected, seeds, Path(runs_dir))


def plan_fit(selection: Selection, overrides: Sequence[str] = (), *, force: bool = False,
             ckpt_path: str | None = None) -> FitPlan:
    """Check every selected variant and seed and decide skip/fresh/resume before anything is
    written; PlanError otherwise. LightningCLI parses each variant's fragments and ``overrides``
    (command-line arguments) once, here: the jobs hold the resolved configs. Each variant is built
    once to check it, then dropped, so big ablations are never held in memory together."""
    experiment, selected, seeds = selection.experiment, selection.variants, selection.seeds
    if ckpt_path == "best":
        raise PlanError("--ckpt_path best: fit resumes from the last checkpoint (--ckpt_path last) "
                        "or a checkpoint FILE; best.ckpt is for fvlab validate/test")
    if ckpt_path not in (None, "last"):
        if len(selected) * len(seeds or [None]) > 1:
            raise PlanError("--ckpt_path FILE needs a single run (one --variant, one seed); use "
                            "--ckpt_path last to resume every run from its own last checkpoint")
        if not Path(ckpt_path).is_file():
            raise PlanError(f"--ckpt_path: checkpoint file not found: {ckpt_path}")
    from fvlab.lit.measure import Target, arch_identity

    root = selection.runs_dir / experiment.name
    jobs = []
    built: dict[str, Any] = {}
    for variant in selected:
        try:
            spec = build_run(experiment.layers(variant), root / variant, list(overrides), experiment=experiment.name,
                             variant=variant, seed=seeds[0] if seeds else None)
        except BadConfig as err:
            raise PlanError(f"{experiment.path} [{variant}]: {err}") from None
        resolved = spec.config
        # The network (not the trainer or data) is kept for the side-by-side measurement.
        built[variant] = (Target.of(spec), arch_identity(spec))
        del spec
        gc.collect()
        for seed in seeds or [None]:
            run_dir = run_dir_for(root, variant, seed)
            if seed is not None:
                resolved = {**resolved, "seed_everything": seed}
            try:
                plan = plan_run(run_dir, config_hash(resolved), force=force, resume=ckpt_path == "last",
                                config=resolved)
            except RunRefused as err:
                raise PlanError(str(err)) from None
            ckpt = ckpt_path if ckpt_path not in (None, "last") else plan.ckpt_path
            if ckpt is not None:
                check_checkpoint(ckpt)
            jobs.append(FitJob(variant, seed, resolved, run_dir, plan.action, ckpt, plan.note))
    return FitPlan(experiment, root, jobs, force=force, built=built, overrides=list(overrides))


def check_checkpoint(path: str | Path) -> None:
    """PlanError unless the checkpoint loads as tensors and plain values (or the user trusts it)."""
    from fvlab.models.checkpoint import UntrustedCheckpointError, read_checkpoint

    try:
        read_checkpoint(path, mmap=True)  # mapped, not read: cheap even for big files
    except UntrustedCheckpointError as err:
        raise PlanError(str(err)) from None


def run_checkpoint(experiment: Experiment, runs_dir: str | Path, variant: str, seed: int | None,
                   ckpt_path: str | None) -> tuple[Path, Path]:
    """(run directory, checkpoint file) of a trained run: ``ckpt_path`` a FILE, or ``best`` (default) /
    ``last`` of the run (``fvlab validate``, ``test``, ``export``); PlanError when there is none."""
    run_dir = run_dir_for(Path(runs_dir) / experiment.name, variant, seed)
    if ckpt_path not in (None, "last", "best"):
        if not Path(ckpt_path).is_file():
            raise PlanError(f"--ckpt_path: checkpoint file not found: {ckpt_path}")
        return run_dir, Path(ckpt_path)
    path = checkpoint_path(run_dir, ckpt_path or "best")
    if not path.is_file():
        raise PlanError(f"no checkpoint at {path}; train it with `fvlab fit {experiment.path} "
                        f"--variant {variant}` or pass --ckpt_path FILE")
    return run_dir, path


def fail_build(job: FitJob, experiment: str, error: str) -> dict[str, Any]:
    """Record a run that could not even be built as that run's failure."""
    result = {"experiment": experiment, "variant": job.variant, "seed": job.seed, "status": "failed",
              "error": error, "epochs": 0, "wall_s": 0.0, **dict.fromkeys(FINAL_METRICS)}
    job.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(job.run_dir / METRICS_FILE, result)
    return result


def fit_jobs(plan: FitPlan, log: Callable[..., None] = print) -> bool:
    """Fit the plan's runs in order (rank 0 reports through ``log``); True when one failed.

    A run that fails is recorded and the next one starts, except under several processes,
    where a failure ends the job on every rank. Ctrl-C stops after recording the run.
    """
    import sys

    name = plan.experiment.name
    rank = rank_zero_only.rank  # Lightning's own global rank, set when plan_fit built the runs
    for job in plan.jobs:
        if job.action == "skip" and rank == 0:
            log(f"[{name}] {job.label}: {job.note}")
    failed = False
    measured: dict[str, dict[str, Any]] = {}
    if rank == 0 and any(job.action != "skip" for job in plan.jobs):
        measured = _measure_variants(plan, log)
    plan.built.clear()  # training never holds the other variants' networks
    try:
        for job in (job for job in plan.jobs if job.action != "skip"):
            if rank == 0:
                log(f"[{name}] fitting {job.label} -> {job.run_dir}"
                    + (f" (resuming {job.ckpt_path})" if job.ckpt_path else ""), flush=True)
            world_size = 1
            try:
                spec = build_run(job.config, job.run_dir, experiment=name, variant=job.variant, seed=job.seed)
            except BadConfig as err:
                result = fail_build(job, name, f"BadConfig: {err}") if rank == 0 else {}
            else:
                result = fit_run(spec, ckpt_path=job.ckpt_path, model_metrics=measured.get(job.variant))
                world_size = spec.trainer.world_size
                del spec
                release_memory()
            if result.get("status") not in (None, "complete"):
                failed = True
                log(f"[{name}] {job.label} failed: {result.get('error')}", file=sys.stderr, flush=True)
                if world_size > 1:
                    log(f"[{name}] a failure under several processes ends the job on every rank; "
                        f"fix it, then rerun to train what is left", file=sys.stderr)
                    break
    except KeyboardInterrupt:
        failed = True
        log(f"[{name}] interrupted; resume with --ckpt_path last", file=sys.stderr)
    return failed


def _measure_variants(plan: FitPlan, log: Callable[..., None]) -> dict[str, dict[str, Any]]:
    """Every variant's ``model/*`` figures, measured side by side before the first run trains.

    A variant that cannot be built (one not selected, say) leaves every run to measure its own
    architecture alone, with a warning: the figures are then not comparable across variants.
    """
    import sys

    from fvlab.lit.measure import measure_experiment

    try:
        return measure_experiment(plan.experiment, plan.overrides, plan.root, force=plan.force, built=plan.built)
    except (BadConfig, ExperimentError) as err:
        log(f"[{plan.experiment.name}] warning: the variants could not be measured side by side ({err}); "
            f"each run measures its own architecture", file=sys.stderr)
        return {}
