"""Optuna architecture search over FasterViT settings: ``fvlab sweep SWEEP.yaml``.

- ``space``: the sweep file, its distributions and list-choice encoding (``load_sweep``).
- ``objective``: one trial = one fit run of the base experiment with sampled overrides.
- ``storage``: journal / SQLite / PostgreSQL storages, the budget lock, dead-trial recovery.
- ``workers``: worker processes that share a study's ``n_trials`` budget.
- ``pareto``: best trial or Pareto front as tables and runnable configs.
"""

from fvlab.sweep.command import sweep_command
from fvlab.sweep.space import SweepError, SweepSpec, load_sweep

__all__ = ["sweep_command", "SweepError", "SweepSpec", "load_sweep"]
