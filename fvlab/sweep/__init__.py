"""Optuna architecture search over FasterViT settings: ``fvlab sweep SWEEP.yaml``.

One line per submodule (each module's own docstring has the detail):

- ``command``: ``fvlab sweep``: checks everything, creates or resumes the study, runs workers.
- ``space``: the sweep file, its distributions and list-choice encoding (``load_sweep``).
- ``objective``: one trial = one fit run of the base experiment with sampled overrides.
- ``canonical``: an architecture's canonical form, the key of duplicate trials and of measurements.
- ``attrs``: the user attributes fvlab sets on trials, and the one rule for finding the reference trial.
- ``rungs``: ``pruner: rungs``, successive halving for any number of objectives.
- ``storage``: journal / SQLite / PostgreSQL storages, the budget lock, dead-trial recovery.
- ``workers``: worker processes that share a study's ``n_trials`` budget.
- ``front_tables``: the best trial or Pareto front as tables (pareto.md/csv) and runnable configs.
- ``confirm``: ``confirm: {seeds: [...]}``, the front and the reference re-trained with fresh seeds.
- ``oneshot``: one-shot search, a ``supernet:`` sweep's supernet training and subnet evaluation.
- ``rank_quality``: rank quality measured like with like (Kendall's tau against one more training).
"""

from fvlab.sweep.command import sweep_command
from fvlab.sweep.space import SweepError, SweepSpec, load_sweep

__all__ = ["sweep_command", "SweepError", "SweepSpec", "load_sweep"]
