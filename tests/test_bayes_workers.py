"""Several bayes workers on one optuna study: ``n_trials`` with ``top_up`` is the study's
total across workers, and a parameter set already measured in the study is not measured
again (its value is reused)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from mpq.solvers.bayes import solve_bayes
from mpq.solvers.measure import CachedMeasure
from mpq.testing import random_problem


def _problem():  # type: ignore[no-untyped-def]
    return random_problem(6, decisions=12, options=5, resources=1, frac=0.5)


def _measure(problem, calls: list[tuple[int, ...]]) -> CachedMeasure:  # type: ignore[no-untyped-def]
    idx = np.arange(len(problem.decisions))

    def f(choice: np.ndarray) -> float:
        calls.append(tuple(int(c) for c in choice))
        return float(problem.distortion[idx, choice].sum())

    return CachedMeasure(f, len(problem.decisions))


def test_two_workers_stop_at_the_study_total(tmp_path: Path) -> None:
    import optuna

    p = _problem()
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    solve_bayes(p, n_trials=1, seed=0, storage=url, study_name="s", top_up=True)  # create it
    total = 16

    def worker(seed: int) -> None:
        solve_bayes(p, n_trials=total, seed=seed, storage=url, study_name="s", top_up=True)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    study = optuna.load_study(study_name="s", storage=url)
    finished = [t for t in study.trials if t.state.is_finished()]
    # each worker stops once the study holds `total` finished trials; a trial already running
    # in the other worker may still finish: at most one more per extra worker
    assert total <= len(finished) <= total + 1
    # a later worker with the same total runs nothing
    again = solve_bayes(p, n_trials=total, seed=3, storage=url, study_name="s", top_up=True)
    assert again.stats["trials"] == len(study.trials)


def test_a_parameter_set_measured_before_is_not_measured_again(tmp_path: Path) -> None:
    import optuna

    p = _problem()
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    first: list[tuple[int, ...]] = []
    solve_bayes(p, _measure(p, first), n_trials=4, seed=0, storage=url, study_name="s")
    study = optuna.load_study(study_name="s", storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    seen = done[0]
    study.enqueue_trial(seen.params)  # another worker samples the same parameter set
    calls: list[tuple[int, ...]] = []
    solve_bayes(p, _measure(p, calls), n_trials=1, seed=1, storage=url, study_name="s")
    study = optuna.load_study(study_name="s", storage=url)
    last = study.trials[-1]
    assert last.params == seen.params
    assert last.user_attrs["duplicate_of"] == seen.number
    assert last.value == seen.value
    assert tuple(seen.user_attrs["choice"]) not in calls


def test_a_sqlite_study_reads_and_writes_inside_one_locked_transaction(tmp_path: Path) -> None:
    # optuna pops an enqueued trial by reading it and then setting it RUNNING; both must be in
    # one transaction holding the write lock, or two workers pop the same trial. The oracle: a
    # transaction that has only *read* already blocks another writer.
    import sqlite3

    from mpq.solvers.bayes import open_storage

    path = tmp_path / "studies.db"
    store = open_storage(str(path))
    with store.engine.connect() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM studies").fetchall()  # a read, nothing else
        other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()
        conn.rollback()
    other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # free again once that transaction ended
    other.execute("ROLLBACK")
    other.close()
