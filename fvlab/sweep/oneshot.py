"""One-shot search: a sweep with a ``supernet:`` block trains one weight-sharing FasterViT over
its space, then each trial evaluates a subnet of it instead of training a model.

- ``train_supernet`` fits a ``SupernetClassifier`` through the run library (``build_run``,
  ``plan_run``, ``fit_run``) into ``runs/<study>/supernet/``: config.yaml, metrics.json,
  TensorBoard, checkpoints. A complete supernet of the same config is skipped; an unfinished
  one resumes from its last.ckpt (a sweep rerun resumes); a changed config is refused.
- ``OneShotObjective`` is a ``SweepObjective`` whose trials, after the same building,
  duplicate check, constraints and side-by-side measurement of the stand-alone architecture,
  set their subnet on the trained supernet, recalibrate BatchNorm on ``bn_batches`` training
  batches (the same batches for every subnet) and validate it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import optuna
import torch
from optuna.trial import FrozenTrial

from fvlab.lit.build import BadConfig, RunSpec, apply_overrides, build_run
from fvlab.lit.fit import fit_run, release_memory
from fvlab.lit.measure import measure_specs
from fvlab.lit.plan import RunRefused, changed_run_keys, plan_run
from fvlab.lit.supernet import SupernetClassifier
from fvlab.metrics import VAL_LOSS, trial_attr
from fvlab.models.supernet import recalibrate_batchnorm
from fvlab.runs import CONFIG_FILE, SUPERNET_DIR, checkpoint_path, read_metrics, trial_dir_name
from fvlab.sweep.attrs import BN_BATCHES, DEVICE, EVALUATED_ON, FAIL_REASON, PRECISION, RUN_NAME, SEED
from fvlab.sweep.objective import ArchitectureProfiler, SweepObjective
from fvlab.sweep.space import SweepError, SweepSpec

__all__ = ["supernet_space", "supernet_config", "check_supernet_config", "train_supernet",
           "load_supernet", "calibration_batches", "evaluate_subnet", "trial_subnet", "extract_trial_subnet",
           "OneShotObjective", "objective_for"]

_ARCH = "model.arch."


def supernet_space(sweep: SweepSpec) -> dict[str, list[Any]]:
    """The sweep's space as ``FasterViTSupernet`` reads it: FasterViT argument -> its values."""
    return {key.removeprefix(_ARCH): [param.decode(v) for v in param.discrete_values or []]
            for key, param in sweep.space.items()}


def supernet_config(sweep: SweepSpec, base: Mapping[str, Any]) -> dict[str, Any]:
    """The run config of the supernet: the base experiment with the sweep's overrides, the space and
    the sandwich settings as ``SupernetClassifier`` arguments, ``supernet.epochs`` epochs."""
    settings = sweep.supernet or {}
    config = apply_overrides(dict(base), {**sweep.overrides, "trainer.max_epochs": settings["epochs"]})
    config["model"] = {**dict(config.get("model") or {}), "space": supernet_space(sweep),
                       "sandwich": settings["sandwich"], "distill": settings["distill"]}
    return config


def _build(sweep: SweepSpec, base: Mapping[str, Any], run_dir: Path | None) -> RunSpec:
    overrides = {"trainer.logger": False} if run_dir is None else {}
    return build_run(supernet_config(sweep, base), run_dir, overrides, experiment=sweep.study,
                     variant=SUPERNET_DIR, model_class=SupernetClassifier)


def check_supernet_config(sweep: SweepSpec, base: Mapping[str, Any]) -> None:
    """Build the supernet once without writing anything; SweepError naming the problem."""
    try:
        spec = _build(sweep, base, None)
    except BadConfig as err:
        raise SweepError(f"{sweep.path}: supernet: the base experiment cannot train a supernet: {err}") from None
    del spec
    release_memory()


def train_supernet(sweep: SweepSpec, base: Mapping[str, Any], study_dir: Path,
                   log: Callable[..., None] = print) -> dict[str, Any]:
    """Train the study's supernet into ``study_dir/supernet`` unless it is complete; its metrics.json.

    Raises SweepError when the directory holds a supernet of another config (it is never
    overwritten), RuntimeError when training fails, KeyboardInterrupt when interrupted (a rerun
    resumes from last.ckpt)."""
    run_dir = Path(study_dir) / SUPERNET_DIR
    spec = _build(sweep, base, run_dir)
    try:
        try:
            # A sweep rerun resumes what it started, the supernet included.
            plan = plan_run(run_dir, spec.config_hash, resume=True, config=spec.config)
        except RunRefused as err:
            keys = changed_run_keys(run_dir, spec.config) if (run_dir / CONFIG_FILE).is_file() else []
            if not keys:
                raise SweepError(f"supernet: {err}") from None
            shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
            raise SweepError(f"{run_dir} holds a supernet trained with a different config (changed: {shown}); "
                             f"its trials' values come from those weights, so it is never replaced: move it "
                             f"away to train it again, or use another --study-name or --runs-dir") from None
        if plan.action == "skip":
            log(f"[{sweep.study}] supernet: complete in {run_dir}, not trained again", flush=True)
            return read_metrics(run_dir) or {}
        log(f"[{sweep.study}] supernet: training {sweep.supernet['epochs']} epoch(s) into {run_dir}"
            + (f" ({plan.note})" if plan.note else ""), flush=True)
        # The supernet's own speed ranks nothing: each trial measures its stand-alone architecture.
        result = fit_run(spec, ckpt_path=plan.ckpt_path,
                         model_metrics=measure_specs({"supernet": spec}, throughput=False)["supernet"])
    finally:
        del spec
        release_memory()
    if result.get("status") != "complete":
        raise RuntimeError(f"training the supernet failed: {result.get('error')}")
    return result


def load_supernet(sweep: SweepSpec, base: Mapping[str, Any], study_dir: Path) -> RunSpec:
    """The study's trained supernet (the weights of its last epoch), built without a run directory."""
    run_dir = Path(study_dir) / SUPERNET_DIR
    metrics = read_metrics(run_dir) or {}
    last = checkpoint_path(run_dir, "last")
    if metrics.get("status") != "complete" or not last.is_file():
        raise RuntimeError(f"{run_dir} holds no complete supernet; rerun fvlab sweep to train it")
    spec = _build(sweep, base, None)
    # Built without a logger (an evaluation writes no events): that key alone may differ.
    changed = [key for key in changed_run_keys(run_dir, spec.config) if not key.startswith("trainer.logger")]
    if changed:
        raise RuntimeError(f"{run_dir} was trained with another config than this sweep's supernet "
                           f"(changed: {', '.join(changed[:6])})")
    # Our own run directory's checkpoint: tensors only.
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    spec.model.load_state_dict(state)
    return spec


def calibration_batches(spec: RunSpec, bn_batches: int, seed: int) -> Iterator[Any]:
    """The ``bn_batches`` training batches every subnet's BatchNorm is recalibrated on: the data
    streams restart from ``seed``, so every evaluation (and extraction) sees the same ones."""
    datamodule = spec.datamodule
    datamodule.setup("fit")
    if hasattr(datamodule, "seed_data"):
        datamodule.seed_data(seed)
    return (batch for _, batch in zip(range(bn_batches), datamodule.train_dataloader()))


def evaluate_subnet(spec: RunSpec, subnet: Mapping[str, Any], bn_batches: int, seed: int) -> dict[str, float]:
    """``val/*`` of one subnet of a trained supernet: BatchNorm recalibrated on ``bn_batches``
    training batches (:func:`calibration_batches`), then Lightning's validation loop on the val split."""
    module: SupernetClassifier = spec.model
    datamodule = spec.datamodule
    module.to(spec.device)
    module.model.set_subnet(dict(subnet))
    used = recalibrate_batchnorm(module.model, calibration_batches(spec, bn_batches, seed))
    module.evaluated_subnet = dict(subnet)
    module.val_acc1_best.reset()  # the best of this validation, not of the previous subnet's
    try:
        measured = spec.trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        module.evaluated_subnet = None
    values = {k: float(v) for k, v in (measured[0] if measured else {}).items()}
    values["bn_batches"] = used
    return values


def trial_subnet(trial: FrozenTrial, sweep: SweepSpec) -> dict[str, Any]:
    """The subnet a one-shot trial evaluated: its parameters as ``FasterViTSupernet`` reads them."""
    return {key.removeprefix(_ARCH): value for key, value in sweep.decode(trial.params).items()}


def extract_trial_subnet(sweep: SweepSpec, base: Mapping[str, Any], study_dir: Path, trial: FrozenTrial,
                         path: str | Path) -> Path:
    """Write the subnet a one-shot trial evaluated as a stand-alone checkpoint at ``path``: the
    supernet's weights, BatchNorm recalibrated on the batches of the trial's evaluation, so that
    the checkpoint validates as the trial did. ``model.arch.checkpoint_path`` (``fvlab fit``,
    ``create_model``, ``fvlab export``) reads it."""
    from optuna.trial import TrialState

    from fvlab.models.supernet import extract_subnet

    if sweep.supernet is None:
        raise SweepError(f"{sweep.path}: not a one-shot sweep (no supernet: block), so its trials have no "
                         f"subnet to extract; a trial of a stand-alone sweep has its own checkpoints")
    if trial.state != TrialState.COMPLETE or trial.user_attrs.get(BN_BATCHES) is None:
        raise SweepError(f"trial {trial.number} is {trial.state.name.lower()}: only an evaluated (complete) "
                         f"trial has the subnet and BatchNorm statistics to extract")
    spec = load_supernet(sweep, base, study_dir)
    try:
        spec.model.to(spec.device)
        # The count the trial was evaluated with, whatever the sweep file says now.
        batches = calibration_batches(spec, int(trial.user_attrs[BN_BATCHES]), spec.seed)
        extract_subnet(spec.model.model, trial_subnet(trial, sweep), path=path, batches=batches)
    finally:
        del spec
        release_memory()
    return Path(path)


class OneShotObjective(SweepObjective):
    """``objective(trial)`` of a one-shot study: the trial's subnet evaluated on the trained supernet."""

    def __init__(self, sweep: SweepSpec, base_config: Mapping[str, Any], study_dir: Path,
                 profiler: ArchitectureProfiler, locked: Callable[[], Any] | None = None,
                 recover: Callable[[], Any] | None = None):
        super().__init__(sweep, base_config, study_dir, profiler, locked=locked, recover=recover)
        self._supernet: RunSpec | None = None

    def supernet(self) -> RunSpec:
        """The trained supernet (loaded once per worker)."""
        if self._supernet is None:
            self._supernet = load_supernet(self.sweep, self.base_config, self.study_dir)
        return self._supernet

    def __call__(self, trial: optuna.Trial) -> list[float]:
        params = {key: param.suggest(trial) for key, param in self.sweep.space.items()}
        run_dir = self.study_dir / SUPERNET_DIR
        # A name (best/<name>.yaml, confirm/<name>/) but no directory: nothing is trained here.
        trial.set_user_attr(RUN_NAME, trial_dir_name(trial.number))
        trial.set_user_attr(EVALUATED_ON, str(run_dir))
        config = apply_overrides(self.base_config, {**self.sweep.overrides, **params})
        try:
            # The stand-alone model of the subnet: its canonical key, constraints and speed.
            standalone = build_run(config, None, {"trainer.logger": False})
        except BadConfig as err:
            self._prune(trial, f"cannot be built: {err}")
        try:
            copied = self.train_or_copy(trial, standalone)
            if copied is not None:
                return copied
            if any(name in self.sweep.constraints for name in ("max_gflops", "max_params_m")):
                self._check(trial, self.profiler.cheap(standalone))
            metrics = self.measure(trial, standalone)
            subnet = {key.removeprefix(_ARCH): value for key, value in params.items()}
        finally:
            standalone = None  # noqa: F841
            release_memory()
        supernet = self.supernet()
        trial.set_user_attr(SEED, supernet.seed)
        trial.set_user_attr(DEVICE, str(supernet.device))
        trial.set_user_attr(PRECISION, supernet.precision)
        try:
            measured = evaluate_subnet(supernet, subnet, int(self.sweep.supernet["bn_batches"]), supernet.seed)
            result = {**measured, "status": "complete"}
        except KeyboardInterrupt:
            trial.set_user_attr(FAIL_REASON, "interrupted")
            raise
        except Exception as err:  # one subnet that cannot run fails its trial, not the search
            result = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        trial.set_user_attr(BN_BATCHES, result.get("bn_batches"))
        if result.get(VAL_LOSS) is not None:  # a score to rank subnets by besides their accuracy
            trial.set_user_attr(trial_attr(VAL_LOSS), result[VAL_LOSS])
        return self._values(trial, result, metrics)


def objective_for(sweep: SweepSpec, base: Mapping[str, Any], study_dir: Path, profiler: ArchitectureProfiler,
                  **kwargs: Any) -> SweepObjective:
    """The study's objective: a subnet evaluation with a ``supernet:`` block, else a fit run."""
    cls = OneShotObjective if sweep.supernet is not None else SweepObjective
    return cls(sweep, base, study_dir, profiler, **kwargs)

