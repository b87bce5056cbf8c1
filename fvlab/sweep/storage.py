"""Optuna storages for sweeps, the trial-budget lock, and recovery of trials whose process died.

- No ``--storage``: an Optuna journal file ``runs/<study>/study.journal`` (several processes on
  one machine; ``optuna-dashboard runs/<study>/study.journal`` reads it).
- ``sqlite:///...``: with a lock timeout, so parallel workers wait instead of failing.
- ``postgresql://...`` (several machines): heartbeats every 60 s with a 10 min grace period;
  a trial whose worker stopped beating is failed and enqueued again with the same parameters
  (``RetryHeartbeatStaleTrialCallback``); ``pool_pre_ping`` survives dropped connections.

``budget_lock`` serialises "count the trials, then ask for a new one" between processes, so
that workers sharing a study end with exactly ``n_trials``: a file lock for the journal and
SQLite, an advisory lock for PostgreSQL (and MySQL).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

__all__ = ["open_storage", "storage_label", "budget_lock", "process_tag", "process_alive",
           "recover_dead_trials", "retry_trial", "HEARTBEAT_INTERVAL", "GRACE_PERIOD", "SQLITE_TIMEOUT"]

HEARTBEAT_INTERVAL = 60
GRACE_PERIOD = 600
SQLITE_TIMEOUT = 60


def _is_url(storage: str) -> bool:
    return "://" in storage


def _driver_url(url: str) -> str:
    # What a plain postgresql:// means depends on SQLAlchemy's version (psycopg2 up to 2.0,
    # psycopg 3 from 2.1): name whichever driver is installed, psycopg 3 first.
    if url.startswith("postgresql://"):
        for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if importlib.util.find_spec(module) is not None:
                return f"postgresql+{driver}://" + url.removeprefix("postgresql://")
    return url


def _retry_callback() -> RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)


def open_storage(storage: str | None, journal: Path) -> BaseStorage:
    """The study's storage: ``storage`` (an Optuna URL or a journal file path) or the journal file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if storage is None or not _is_url(storage):
            path = Path(storage) if storage else journal
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if storage.startswith("sqlite"):
            return RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT}})
        kwargs: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True}}
        if not storage.startswith("mysql"):
            kwargs.update(heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                          heartbeat_stale_trial_callback=_retry_callback())
        return RDBStorage(_driver_url(storage), **kwargs)


def storage_label(storage: str | None, journal: Path) -> str:
    """What optuna-dashboard is given for this storage (URL or journal path)."""
    return storage if storage else str(journal)


def _sqlite_path(url: str) -> str | None:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    return path if path and path != ":memory:" else None


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released by the kernel if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _advisory_lock(storage: RDBStorage, study_name: str) -> Iterator[None]:
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(f"fvlab:{study_name}".encode()).digest()[:8], "big", signed=True)
    dialect = storage.engine.dialect.name
    with storage.engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        else:
            conn.execute(text("SELECT GET_LOCK(:key, 3600)"), {"key": f"fvlab:{study_name}"[:64]})
        conn.commit()
        try:
            yield
        finally:
            if dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            else:
                conn.execute(text("SELECT RELEASE_LOCK(:key)"), {"key": f"fvlab:{study_name}"[:64]})
            conn.commit()


@contextlib.contextmanager
def budget_lock(storage: BaseStorage, storage_arg: str | None, journal: Path,
                study_name: str) -> Iterator[None]:
    """Held while a worker counts the study's trials and asks for a new one."""
    if isinstance(storage, JournalStorage):
        with _file_lock(str(Path(storage_arg) if storage_arg and not _is_url(storage_arg) else journal)):
            yield
    elif isinstance(storage, RDBStorage) and storage.engine.dialect.name in ("postgresql", "mysql"):
        with _advisory_lock(storage, study_name):
            yield
    elif isinstance(storage, RDBStorage) and _sqlite_path(storage.url):
        with _file_lock(_sqlite_path(storage.url)):  # type: ignore[arg-type]
            yield
    else:
        yield


# ---- processes that died -----------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22 (start time in clock ticks) follows the parenthesised command name.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tag() -> dict[str, Any]:
    """Who runs a trial: host, pid and the pid's start time (a reused pid is another process)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def process_alive(tag: dict[str, Any]) -> bool:
    """Whether the process of ``tag`` (on this host) still runs."""
    pid = int(tag.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = _start_time(pid)
    return start is None or tag.get("start") is None or start == tag.get("start")


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a failed trial again with the same parameters (and its intermediate values)."""
    _retry_callback()(study, trial)


def recover_dead_trials(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """Fail the RUNNING trials of this host whose process is gone and enqueue them again.

    A journal file has no heartbeat: after a ``kill -9`` the trial would stay RUNNING forever.
    """
    host = socket.gethostname()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tag = trial.user_attrs.get("fvlab_process")
        if not isinstance(tag, dict) or tag.get("host") != host or process_alive(tag):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason",
                                        f"worker process {tag.get('pid')} ended while running it (killed?)")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception:  # another worker recovered it first
            continue
        frozen = storage.get_trial(trial._trial_id)
        retry_trial(study, frozen)
        recovered.append(trial.number)
    return recovered
