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

A retried trial runs in its own run directory and continues from the checkpoint of the
attempt it repeats; a trial killed ``MAX_RETRIES + 1`` times (an out-of-memory killer) is
not queued again, and its ``fail_reason`` says so.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import logging
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from fvlab.metrics import PRIMARY_METRIC, TRIAL_ATTRS, VAL_MIOU_BEST
from fvlab.sweep.attrs import FAIL_REASON, PROCESS, PRUNED_REASON, RESUME_FROM, RUN_DIR, RUN_NAME

__all__ = ["open_storage", "storage_label", "budget_lock", "process_tag", "process_alive",
           "recover_dead_trials", "retry_trial", "retry_history", "retried_numbers", "retrying", "RetryAttempt",
           "HEARTBEAT_INTERVAL", "GRACE_PERIOD", "SQLITE_TIMEOUT", "MAX_RETRIES", "KILLED"]

log = logging.getLogger(__name__)
T = TypeVar("T")

HEARTBEAT_INTERVAL = 60
GRACE_PERIOD = 600
SQLITE_TIMEOUT = 60
MAX_RETRIES = 3  # a trial killed again and again (the OOM killer) is given up after 3 retries
KILLED = "worker process"  # how recover_dead_trials' fail_reason starts
# What an attempt wrote about itself; its retry starts without them.
_ATTEMPT_ATTRS = (PROCESS, FAIL_REASON, PRUNED_REASON, RUN_NAME, RUN_DIR, TRIAL_ATTRS[PRIMARY_METRIC],
                  TRIAL_ATTRS[VAL_MIOU_BEST])


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


class RetryAttempt(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry with fvlab's attempt semantics: the retry gets its own process tag and run
    directory (the dead attempt's tag would let another worker fail the live retry; its directory
    keeps what that attempt wrote) and ``resume_from`` lists the earlier attempts' directories."""

    def __init__(self, max_retry: int | None = MAX_RETRIES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            super().__init__(max_retry=max_retry, inherit_intermediate_values=True)
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Enqueue ``trial`` again (unless its retries are spent), without its attempt's attributes."""
        attempt = copy.deepcopy(trial)
        attrs = dict(attempt.user_attrs)
        earlier = [attrs[RUN_DIR]] if attrs.get(RUN_DIR) else []
        attrs[RESUME_FROM] = earlier + [d for d in attrs.get(RESUME_FROM) or [] if d not in earlier]
        attempt.user_attrs = {k: v for k, v in attrs.items() if k not in _ATTEMPT_ATTRS}
        if self.max_retry is not None and len(retry_history(trial)) >= self.max_retry:
            log.warning("trial %d failed and is not retried: %d retries spent", trial.number, self.max_retry)
        super().__call__(study, attempt)


def retry_history(trial: FrozenTrial) -> list[int]:
    """Numbers of the earlier attempts that ``trial`` retries, the first attempt first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return list(RetryHeartbeatStaleTrialCallback.retry_history(trial))


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials that were queued again (each counts once, as its retry)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


_RACES = ("already exists", "duplicate", "deadlock", "could not serialize")


def retrying(action: Callable[[], T], what: str, attempts: int = 6) -> T:
    """``action()``, tried again on database errors: processes that start together race on
    Optuna's schema creation (duplicate ``CREATE TYPE``) and on creating one study."""
    from sqlalchemy.exc import DBAPIError, IntegrityError

    from optuna.exceptions import DuplicatedStudyError

    for attempt in range(attempts):
        try:
            return action()
        except (DBAPIError, DuplicatedStudyError) as err:
            # An unreachable server or a wrong password is not a race: report it at once.
            race = isinstance(err, (IntegrityError, DuplicatedStudyError)) or any(
                word in str(err).lower() for word in _RACES)
            if not race or attempt == attempts - 1:
                raise
            log.debug("%s: %s; trying again", what, type(err).__name__)
            time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))  # jitter: racers do not meet again
    raise AssertionError("unreachable")


def open_storage(storage: str | None, journal: Path) -> BaseStorage:
    """The study's storage: ``storage`` (an Optuna URL or a journal file path) or the journal file."""
    if storage is not None and _is_url(storage) and not storage.startswith("sqlite"):
        return retrying(lambda: _open_storage(storage, journal), "setting up the storage")
    return _open_storage(storage, journal)


def _open_storage(storage: str | None, journal: Path) -> BaseStorage:
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
                          heartbeat_stale_trial_callback=RetryAttempt())
        return RDBStorage(_driver_url(storage), **kwargs)


def storage_label(storage: str | None, journal: Path) -> str:
    """What optuna-dashboard is given for this storage (URL, its password hidden, or journal path)."""
    from fvlab.runtime import hide_password

    return hide_password(storage) if storage else str(journal)


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
    RetryAttempt(max_retry=None)(study, trial)


def recover_dead_trials(study: optuna.Study, storage: BaseStorage) -> list[tuple[int, bool]]:
    """Fail the RUNNING trials of this host whose process is gone and enqueue them again,
    unless the trial was killed ``MAX_RETRIES + 1`` times: then its ``fail_reason`` says why.
    Returns (trial number, queued again) per trial failed.

    A journal file has no heartbeat: after a ``kill -9`` the trial would stay RUNNING forever.
    """
    host = socket.gethostname()
    recovered = []
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    study_id = None
    for trial in trials:
        tag = trial.user_attrs.get(PROCESS)
        if trial.state != TrialState.RUNNING or not isinstance(tag, dict) or tag.get("host") != host \
                or process_alive(tag):
            continue
        # Interrupted attempts (Ctrl-C) do not count: only kills, the OOM killer's signature.
        killed = 1 + sum(1 for n in retry_history(trial)
                         if str(by_number[n].user_attrs.get(FAIL_REASON) or "").startswith(KILLED))
        reason = f"{KILLED} {tag.get('pid')} ended while running it (killed?)"
        if killed > MAX_RETRIES:
            reason += (f"; not retried: killed {killed} times ({MAX_RETRIES} retries at most; out of memory? "
                       f"see dmesg)")
        if study_id is None:
            study_id = storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:  # another process's trial: written through the storage, as fail_stale_trials does
            storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except Exception:  # another worker recovered it first
            continue
        if killed <= MAX_RETRIES:
            retry_trial(study, storage.get_trial(trial_id))
        recovered.append((trial.number, killed <= MAX_RETRIES))
    return recovered
