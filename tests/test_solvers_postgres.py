"""Several worker processes on one optuna study in PostgreSQL: no trial lost or duplicated.

Starts a real throwaway PostgreSQL server: ``initdb`` + ``pg_ctl`` from Debian's ``postgresql``
package (on PATH or under ``/usr/lib/postgresql/*/bin``), a cluster in a temporary folder,
listening on a free localhost port with trust authentication, stopped and deleted afterwards.
As root (PostgreSQL refuses to run as root) the server runs as the ``postgres`` user. Skipped,
with the reason, only where the server cannot be had: no binaries, no ``postgres`` user under
root, no ``psycopg`` driver, or a server that does not start.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    pytest.importorskip("optuna")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's default PostgreSQL driver)
    except ImportError:
        pytest.skip("the psycopg driver is not installed: pip install 'psycopg[binary]'")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl): apt-get install postgresql")
    as_user: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd

            pg_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        if not runuser:
            pytest.skip("running as root without runuser to start the server as 'postgres'")
        as_user = [runuser, "-u", "postgres", "--"]
    folder = tempfile.mkdtemp(prefix="mpq-pg-")
    if as_user:
        os.chown(folder, pg_user.pw_uid, pg_user.pw_gid)
    data = os.path.join(folder, "data")
    port = _free_port()
    log = os.path.join(folder, "server.log")
    try:
        subprocess.run(
            [
                *as_user,
                initdb,
                "-D",
                data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        opts = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*as_user, pg_ctl, "-D", data, "-l", log, "-w", "-t", "60", "-o", opts, "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {exc} {detail.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)


WORKER = """
import sys
from mpq.solvers.bayes import solve_bayes
from mpq.testing import random_problem
url, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
p = random_problem(3, decisions=10, options=5, frac=0.5)
sol = solve_bayes(p, n_trials=n, seed=seed, storage=url, study_name="shared")
assert p.feasible(sol.choice)
print(sol.stats["trials"])
"""


def test_two_worker_processes_share_one_study(postgres_url: str) -> None:
    import optuna

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    per_worker = (12, 9)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, postgres_url, str(seed), str(n)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed, n in enumerate(per_worker)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    numbers = sorted(t.number for t in study.trials)
    total = sum(per_worker)
    assert numbers == list(range(total)), numbers  # each number once: none lost, none twice
    assert len({t._trial_id for t in study.trials}) == total
    states = {t.state for t in study.trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    # a third call from this process continues the same study
    from mpq.solvers.bayes import solve_bayes
    from mpq.testing import random_problem

    p = random_problem(3, decisions=10, options=5, frac=0.5)
    sol = solve_bayes(p, n_trials=2, storage=postgres_url, study_name="shared")
    assert sol.stats["trials"] == total + 2
