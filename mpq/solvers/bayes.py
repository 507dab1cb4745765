"""Bayesian search of plans on measured quality with optuna (Akiba et al., "Optuna: A
Next-generation Hyperparameter Optimization Framework", KDD 2019): TPE (Bergstra et al. 2011)
for one objective under the budget, NSGA-II (Deb et al. 2002) for the measured-quality vs cost
frontier.

The search space: one categorical parameter per decision (named after the decision), whose
choices are the names of its allowed options. A sampled plan that goes over a budget is
**repaired** to it deterministically (:func:`mpq.solvers._common.repair_downgrades`: the
cheapest downgrades in added table distortion per unit of budget excess removed) and the
repaired plan is measured; the trial keeps the repaired choice in its ``choice`` user
attribute. ``over_budget="prune"`` prunes such trials instead. Either way, every plan that is
measured and every plan returned fits every budget.

The study starts from the table's best plans: the ILP optimum, the greedy plan and the best
uniform plan that fits are enqueued as its first trials (NSGA-II: also every uniform plan that
fits), so the search can only improve on them (on the measure).

Storage (``storage=``): ``None`` is optuna's in-memory storage (the library default); an
``sqlite:///path.db`` URL (or a plain path ending in ``.db``/``.sqlite``) is a resumable study
(the CLI's default): a second call with the same ``study_name`` continues it, adding
``n_trials`` trials to those already there; a ``postgresql://user@host:port/db`` URL lets
several worker processes share one study (give each worker its own ``seed``). A study records
a fingerprint of the problem it was made for; reusing its name for another problem is an error.
A storage that does not answer is an :class:`~mpq.errors.MpqError` naming the URL (password
hidden).

optuna is imported inside the functions, so importing this module stays numpy-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from mpq.errors import MpqError
from mpq.solvers._common import done, over_min, repair_downgrades
from mpq.solvers.base import AllocationProblem, Solution, infeasible, validate_problem
from mpq.solvers.measure import CachedMeasure, Measure, cached, start_plans, uniform_choices
from mpq.solvers.options import Features, Search, SearchOptions

OverBudget = Literal["repair", "prune"]


def fingerprint(problem: AllocationProblem) -> str:
    """A digest of what a study searches over: decisions, options, allowed options, costs and
    limits (not the distortion table, which only orders the start plans)."""
    h = hashlib.sha256()
    h.update(repr((problem.decisions, problem.options)).encode())
    h.update(np.ascontiguousarray(problem.allowed).tobytes())
    for r in sorted(problem.costs):
        h.update(r.encode())
        h.update(np.ascontiguousarray(np.asarray(problem.costs[r], dtype=float)).tobytes())
    h.update(repr(sorted((r, float(v)) for r, v in problem.limits.items())).encode())
    return h.hexdigest()[:16]


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


def _storage_url(storage: str | None) -> str | None:
    if storage is None:
        return None
    text = str(storage)
    if "://" not in text:
        if text.endswith((".db", ".sqlite", ".sqlite3")):
            return f"sqlite:///{text}"
        raise MpqError(
            f"optuna storage {text!r} is not a URL; use 'sqlite:///path/study.db' or "
            f"'postgresql://user:password@host:port/database' (or None for in-memory)"
        )
    return text


def open_storage(storage: str | None) -> Any:
    """An optuna storage: in-memory for ``None``, else an RDB storage on the URL, checked to
    answer now (a clear :class:`MpqError` naming the URL when it does not).

    Several workers opening a fresh database at once race to create optuna's tables (one of
    them gets a unique-key violation from PostgreSQL's catalog); that is retried."""
    import optuna

    url = _storage_url(storage)
    if url is None:
        return optuna.storages.InMemoryStorage()
    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "postgres")):
        engine_kwargs = {"connect_args": {"connect_timeout": 5}}
    for attempt in range(6):
        try:
            store = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
            if url.startswith("sqlite"):
                _sqlite_wal(store)
            return store
        except ImportError as exc:
            raise MpqError(
                f"optuna storage {redact(url)}: the database driver is not installed ({exc}); "
                f"for PostgreSQL (SQLAlchemy 2.1 uses psycopg 3) run "
                f"`pip install 'psycopg[binary]'`"
            ) from None
        except Exception as exc:  # sqlalchemy's OperationalError, IntegrityError, ...
            text = str(exc).strip()
            racing = type(exc).__name__ == "IntegrityError" or "already exists" in text
            if racing and attempt < 5:
                time.sleep(0.2 * (attempt + 1))
                continue
            first = text.splitlines()[0] if text else type(exc).__name__
            what = "could not be set up" if racing else "does not answer"
            raise MpqError(
                f"optuna storage {redact(url)} {what} ({type(exc).__name__}: {first}); "
                f"start the database server or fix the URL"
            ) from None
    raise AssertionError("unreachable")


def _sqlite_wal(store: Any) -> None:
    """SQLite in WAL mode with ``synchronous=NORMAL``: one fsync per checkpoint instead of
    several per write (a trial writes one row per decision); 6x faster per trial on this
    machine's disk. A crash of the process loses nothing committed; a power cut may lose the
    last trials (they are re-run on resume). WAL needs a local file system (not NFS).

    Every transaction starts with ``BEGIN IMMEDIATE``. Python's sqlite3 driver otherwise begins
    a transaction only at the first write, so optuna's "read the trial, set it RUNNING only if
    it is still WAITING" runs its read outside the transaction: two workers could both pop the
    same enqueued trial, and the second then dies on "Cannot tell a COMPLETE trial". With the
    write lock taken at BEGIN the read and the write are one step (others wait their turn,
    up to the driver's busy timeout)."""
    import sqlalchemy

    def on_connect(conn: Any, _record: Any) -> None:
        conn.isolation_level = None  # the driver's own implicit BEGIN off: ours below instead
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(store.engine, "connect", on_connect)
    sqlalchemy.event.listen(store.engine, "begin", on_begin)
    store.engine.dispose()  # connections made before the listener get it on reconnect


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _open_study(
    problem: AllocationProblem,
    storage: str | None,
    study_name: str | None,
    sampler: Any,
    directions: Sequence[str],
    prefix: str,
) -> Any:
    import optuna

    store = open_storage(storage)
    digest = fingerprint(problem)
    name = study_name or f"{prefix}-{digest}"
    study = optuna.create_study(
        storage=store,
        sampler=sampler,
        study_name=name,
        directions=[str(d) for d in directions],  # type: ignore[misc]
        load_if_exists=True,
    )
    made_for = study.user_attrs.get("mpq_problem")
    if made_for is None:
        study.set_user_attr("mpq_problem", digest)
        study.set_user_attr("mpq_decisions", len(problem.decisions))
    elif made_for != digest:
        raise MpqError(
            f"optuna study {name!r} in {redact(str(storage))} was made for another problem "
            f"(fingerprint {made_for}, this one {digest}: other formats, costs or budget); "
            f"give another study name"
        )
    if len(study.directions) != len(directions):
        raise MpqError(
            f"optuna study {name!r} has {len(study.directions)} objective(s), this search "
            f"{len(directions)}; give another study name"
        )
    return study


class _Objective:
    """Samples one option per decision, repairs or prunes over-budget samples, measures."""

    def __init__(
        self,
        problem: AllocationProblem,
        score: CachedMeasure,
        over_budget: OverBudget,
        cost_resource: str | None = None,
    ) -> None:
        self.problem = problem
        self.score = score
        self.over_budget = over_budget
        self.cost_resource = cost_resource
        self.choices = [
            [problem.options[o] for o in np.flatnonzero(problem.allowed[d])]
            for d in range(len(problem.decisions))
        ]
        self.index = {name: i for i, name in enumerate(problem.options)}

    def params(self, choice: np.ndarray) -> dict[str, str]:
        return {
            name: self.problem.options[int(o)]
            for name, o in zip(self.problem.decisions, choice, strict=True)
        }

    def __call__(self, trial: Any) -> float | tuple[float, float]:
        import optuna

        sampled = np.array(
            [
                self.index[trial.suggest_categorical(name, self.choices[d])]
                for d, name in enumerate(self.problem.decisions)
            ],
            dtype=np.int64,
        )
        choice = sampled
        if not self.problem.feasible(sampled):
            if self.over_budget == "prune":
                trial.set_user_attr("over_budget", True)
                raise optuna.TrialPruned("over budget")
            choice, moves, ok = repair_downgrades(self.problem, sampled)
            if not ok or not self.problem.feasible(choice):
                trial.set_user_attr("over_budget", True)
                raise optuna.TrialPruned("over budget and not repairable")
            trial.set_user_attr("repaired", int(moves))
        trial.set_user_attr("choice", [int(c) for c in choice])
        prior = _measured_before(trial, choice)  # by another worker of a shared study
        if prior is not None:
            trial.set_user_attr("duplicate_of", prior.number)
            value = float(prior.values[0])
        else:
            value = self.score(choice)
        if self.cost_resource is None:
            return value
        return value, self.problem.cost_of(choice)[self.cost_resource]


def _measured_before(trial: Any, choice: np.ndarray) -> Any | None:
    """A finished trial of the same study that measured ``choice`` (None when there is none):
    its value is reused instead of measuring the same plan again."""
    import optuna

    study = getattr(trial, "study", None)
    if study is None:
        return None
    want = [int(c) for c in choice]
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number != trial.number and t.user_attrs.get("choice") == want and t.values:
            return t
    return None


def _done_trials(study: Any) -> list[Any]:
    import optuna

    return [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "choice" in t.user_attrs
    ]


def _finished(study: Any) -> int:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done))


def _enqueue(study: Any, objective: _Objective, plans: Sequence[np.ndarray]) -> int:
    """Enqueue the start plans once per study (not again when it is resumed)."""
    if study.user_attrs.get("mpq_started") or study.get_trials(deepcopy=False):
        return 0
    study.set_user_attr("mpq_started", True)
    for choice in plans:
        study.enqueue_trial(objective.params(choice), skip_if_exists=True)
    return len(plans)


def _check_counts(n_trials: int, timeout: float | None) -> None:
    if int(n_trials) != n_trials or n_trials < 0:
        raise MpqError(f"n_trials={n_trials} must be a non-negative integer")
    if timeout is not None and not timeout > 0:
        raise MpqError(f"timeout={timeout} must be positive seconds (or None)")


def solve_bayes(
    problem: AllocationProblem,
    measure: Measure | None = None,
    *,
    n_trials: int = 100,
    seed: int = 0,
    storage: str | None = None,
    study_name: str | None = None,
    over_budget: OverBudget = "repair",
    start: bool = True,
    n_startup_trials: int = 10,
    timeout: float | None = None,
    top_up: bool = False,
) -> Solution:
    """TPE search for the plan with the least ``measure`` (default: the table's summed
    distortion) within every budget; see the module docstring.

    Adds ``n_trials`` trials to the study (in-memory unless ``storage``); the answer is the
    best measured plan of the whole study (resumed studies included; ties: the earlier trial).
    ``start=False`` does not enqueue the table's plans (pure TPE, e.g. to benchmark it).
    ``top_up=True``: ``n_trials`` is the study's total instead; only the trials it lacks run
    (a run killed and started again finishes the study instead of growing it).
    Status ``feasible``, or ``infeasible`` (with ``min_feasible``) when no plan fits.
    ``stats``: ``measured`` (best value), ``best_trial``, ``trials`` (in the study),
    ``repaired`` / ``pruned`` (over-budget samples), ``study_name``, ``storage``, ``start``
    (which enqueued plan won, or ``"search"``)."""
    import optuna

    t0 = time.perf_counter()
    validate_problem(problem)
    _check_counts(n_trials, timeout)
    if over_budget not in ("repair", "prune"):
        raise MpqError(f"over_budget={over_budget!r} is unknown; use 'repair' or 'prune'")
    if not problem.limits:
        raise MpqError("bayes needs a budget on at least one resource")
    if over_min(problem):
        return _infeasible(problem, t0, storage)
    ilp, plans = start_plans(problem)
    if ilp.status == "infeasible":
        return replace(ilp, solver="bayes", wall_time=time.perf_counter() - t0)
    score = cached(measure, problem)
    objective = _Objective(problem, score, over_budget)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    with _quiet_optuna():
        study = _open_study(problem, storage, study_name, sampler, ["minimize"], "mpq-bayes")
        _enqueue(study, objective, [c for _, c in plans] if start else [])
        n = int(n_trials)
        callbacks = []
        if top_up:
            n = max(0, n - _finished(study))
            # Several workers on one storage: stop when the study holds n_trials finished
            # trials in total, whoever ran them (at most one running trial per worker more).
            done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            callbacks.append(optuna.study.MaxTrialsCallback(int(n_trials), states=done_states))
        if n:
            study.optimize(objective, n_trials=n, timeout=timeout, catch=(), callbacks=callbacks)
    trials = _done_trials(study)
    if not trials:
        # Every trial was pruned (over budget): answer with the best start plan.
        fallback = min(plans, key=lambda p: (score(p[1]), 0))[1]
        return done(
            problem, fallback, "feasible", "bayes", t0, _stats(study, score, None, plans, storage)
        )
    best = min(trials, key=lambda t: (t.value, t.number))
    choice = np.array(best.user_attrs["choice"], dtype=np.int64)
    if not problem.feasible(choice):
        raise AssertionError("bayes: the best trial is over budget")  # every trial is checked
    return done(
        problem, choice, "feasible", "bayes", t0, _stats(study, score, best, plans, storage)
    )


def _infeasible(problem: AllocationProblem, t0: float, storage: str | None) -> Solution:
    if storage is not None:
        open_storage(storage)  # a storage that does not answer is still reported
    return infeasible(problem, "bayes", time.perf_counter() - t0)


def _stats(
    study: Any,
    score: CachedMeasure,
    best: Any,
    plans: Sequence[tuple[str, np.ndarray]],
    storage: str | None,
) -> dict[str, Any]:
    import optuna

    all_trials = study.get_trials(deepcopy=False)
    origin = "search"
    if best is not None:
        for name, c in plans:
            if [int(x) for x in c] == best.user_attrs["choice"]:
                origin = name
                break
    return {
        "measured": None if best is None else float(best.value),
        "best_trial": None if best is None else int(best.number),
        "trials": len(all_trials),
        "repaired": sum(1 for t in all_trials if "repaired" in t.user_attrs),
        "pruned": sum(1 for t in all_trials if t.state == optuna.trial.TrialState.PRUNED),
        "measure_calls": score.calls,
        "study_name": study.study_name,
        "storage": "memory" if storage is None else redact(str(storage)),
        "start": origin,
    }


@dataclass(frozen=True)
class MeasuredPoint:
    """One plan of a measured frontier: its choice, measured value and costs."""

    choice: np.ndarray
    measured: float
    costs: dict[str, float]
    trial: int


@dataclass(frozen=True)
class TablePoint:
    """A plan of the table's own Pareto frontier: its cost, predicted (table) distortion and
    measured value (it seeds the NSGA-II study, so it is measured)."""

    cost: float
    predicted: float
    measured: float
    choice: np.ndarray


@dataclass(frozen=True)
class MeasuredFrontier:
    """Plans not dominated in (measured value, cost of ``resource``), by increasing cost;
    ``table``: the table's predicted frontier points the study was seeded with (by cost)."""

    resource: str
    points: tuple[MeasuredPoint, ...]
    trials: int
    study_name: str
    table: tuple[TablePoint, ...] = ()

    def best_within(self, limit: float) -> MeasuredPoint | None:
        """The least measured point whose cost is within ``limit`` (None when none is)."""
        fits = [p for p in self.points if p.costs[self.resource] <= limit * (1 + 1e-12)]
        return min(fits, key=lambda p: (p.measured, p.costs[self.resource])) if fits else None


def bayes_frontier(
    problem: AllocationProblem,
    measure: Measure | None = None,
    *,
    resource: str | None = None,
    n_trials: int = 200,
    seed: int = 0,
    population_size: int = 20,
    storage: str | None = None,
    study_name: str | None = None,
    over_budget: OverBudget = "repair",
    timeout: float | None = None,
    table_seeds: int | None = None,
) -> MeasuredFrontier:
    """NSGA-II search of the frontier of measured quality vs the cost of ``resource`` (default:
    the first budgeted one) among plans within every budget (give the loosest budget to see the
    whole frontier). The study starts from the table's own Pareto frontier of ``resource``
    (``table_seeds`` of its points, evenly spread over its cost range within the budgets;
    default ``population_size``; :func:`mpq.solvers.pareto.pareto_frontier`), every uniform
    plan that fits and the table's ILP and greedy plans. Points are the non-dominated
    completed trials of the whole study, by increasing cost (one plan per distinct (value,
    cost)); ``table`` keeps the seeded frontier points with their predicted and measured
    values, so the two frontiers can be drawn side by side."""
    import optuna

    validate_problem(problem)
    _check_counts(n_trials, timeout)
    if not problem.limits:
        raise MpqError("bayes_frontier needs a budget on at least one resource")
    resource = resource or next(iter(problem.limits))
    if resource not in problem.costs:
        known = sorted(problem.costs)
        raise MpqError(f"resource {resource!r} has no cost table; use one of {known}")
    if population_size < 2:
        raise MpqError(f"population_size={population_size} must be at least 2")
    if over_min(problem):
        raise MpqError(f"the budget is infeasible: the smallest feasible is {problem.min_costs()}")
    ilp, plans = start_plans(problem)
    if ilp.status == "infeasible":
        raise MpqError("the budgets are jointly infeasible: no plan fits them all")
    starts = [c for _, c in plans]
    for u in uniform_choices(problem):
        if not any(np.array_equal(u, c) for c in starts):
            starts.append(u)
    table_front = _table_frontier(problem, resource, table_seeds or population_size)
    for c in table_front:
        if not any(np.array_equal(c, s) for s in starts):
            starts.append(c)
    score = cached(measure, problem)
    objective = _Objective(problem, score, over_budget, cost_resource=resource)
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    with _quiet_optuna():
        study = _open_study(
            problem, storage, study_name, sampler, ["minimize", "minimize"], "mpq-frontier"
        )
        _enqueue(study, objective, starts)
        study.optimize(objective, n_trials=int(n_trials), timeout=timeout, catch=())
    pts: dict[tuple[float, float], MeasuredPoint] = {}
    for t in sorted(_done_trials(study), key=lambda t: t.number):
        key = (float(t.values[0]), float(t.values[1]))
        if key not in pts:
            choice = np.array(t.user_attrs["choice"], dtype=np.int64)
            pts[key] = MeasuredPoint(choice, key[0], problem.cost_of(choice), int(t.number))
    ordered = sorted(pts.values(), key=lambda p: (p.costs[resource], p.measured))
    front: list[MeasuredPoint] = []
    for p in ordered:  # by cost: keep a point only when it measures better than all cheaper
        if not front or p.measured < front[-1].measured:
            front.append(p)
    table = tuple(
        TablePoint(problem.cost_of(c)[resource], problem.distortion_of(c), score(c), c)
        for c in table_front
    )
    return MeasuredFrontier(
        resource, tuple(front), len(study.get_trials(deepcopy=False)), study.study_name, table
    )


def _table_frontier(problem: AllocationProblem, resource: str, k: int) -> list[np.ndarray]:
    """Up to ``k`` plans of the table's Pareto frontier of ``resource`` that fit every budget,
    evenly spread by index from the cheapest to the least distorting (by increasing cost)."""
    from mpq.solvers.pareto import pareto_frontier

    front = pareto_frontier(problem, resource)  # the other budgets are checked below
    fits = [i for i in range(len(front)) if problem.feasible(front.choices[i].astype(np.int64))]
    if not fits or k < 1:
        return []
    picks = sorted({fits[int(round(j))] for j in np.linspace(0, len(fits) - 1, min(k, len(fits)))})
    return [front.choices[i].astype(np.int64) for i in picks]


def from_options(opts: SearchOptions, features: Features) -> Search:
    """The ``bayes`` search of :data:`mpq.registry.SEARCHES`: ``opts.trials`` TPE trials; with a
    ``storage``, a named study (default: derived from the problem) topped up on reruns."""

    def search(problem: AllocationProblem, measure: Measure | None = None) -> Solution:
        study = opts.study
        if study is None and opts.storage is not None:
            study = f"mpq-bayes-{fingerprint(problem)}-seed{opts.seed}"
        return solve_bayes(
            problem,
            measure,
            n_trials=opts.trials,
            seed=opts.seed,
            storage=opts.storage,
            study_name=study,
            top_up=opts.storage is not None,
        )

    return search
