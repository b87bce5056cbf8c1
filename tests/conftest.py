"""Shared fixtures: a throwaway PostgreSQL server for the storage tests of ``fvlab sweep``.

The server is Debian's ``postgresql`` (``.ci/run`` installs it): initdb into a temporary
directory, a free port on 127.0.0.1, stopped at the end of the session. PostgreSQL refuses to
run as root, so under root it runs as the ``postgres`` user. Without the binaries the tests
that need it skip and say why; under CI (``CI=true``) they fail instead, so CI always runs them.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

POSTGRES_ENV = "FVLAB_TEST_POSTGRES_URL"

# Side-by-side throughput in a few short rounds: the tests check the protocol, not the figures
# (benchmarks/ measure). Set here so that the fvlab processes the tests start inherit it too.
os.environ.setdefault("FVLAB_PROFILE_ROUNDS", "3")
os.environ.setdefault("FVLAB_PROFILE_ROUND_S", "0.005")

# Under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread:
# two workers with a thread per core each would fight over the cores (torch's threads spin while
# they wait), which made tests several times slower. Set before torch is imported, and inherited
# by the processes the tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)  # in case a plugin imported torch before this file


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Iterator[None]:
    """Run the tests with what collection loaded frozen, as the ``fvlab`` command freezes its imports.

    Every run and trial ends with a full collection; over the test modules and their imports
    each one took about 0.3 s, hundreds of times in a suite. In-process ``main()`` calls nest.
    """
    import lightning.pytorch  # noqa: F401  (frozen with the rest)

    from fvlab.runtime import frozen_heap

    with frozen_heap():
        yield


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the PostgreSQL tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a PostgreSQL server (``postgresql://fvlab@127.0.0.1:PORT``) for this test session."""
    if os.environ.get(POSTGRES_ENV):
        yield os.environ[POSTGRES_ENV].rstrip("/")
        return
    bindir = _postgres_bin()
    if bindir is None:
        _unavailable("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is missing (pip install -e '.[test]')")
    root = Path(tempfile.mkdtemp(prefix="fvlab-pg-"))
    data, port = root / "data", _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")  # initdb and postgres refuse to run as root
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "fvlab", "--auth=trust",
                        "--no-sync", "-E", "UTF8"], **run)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
                        "-w", "-t", "60", "-o",
                        f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off -c max_connections=200",
                        "start"], **run)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"could not start PostgreSQL: {getattr(err, 'stderr', '') or err} {log[-500:]}")
    try:
        yield f"postgresql://fvlab@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


_databases = itertools.count()


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    import psycopg

    name = f"fvlab_test_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"
