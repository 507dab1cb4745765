"""Comparison configs (TOML) as frozen dataclasses, validated with clear errors."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpq.cost import parse_budget
from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.registry import ESTIMATORS, solver_names


@dataclass(frozen=True)
class DataSpec:
    data: tuple[str, ...]
    split: str
    n: int | None
    seq_len: int | None
    batch_size: int | None
    # Calibration only: each seed draws its own disjoint sample (True), or every seed uses the
    # first sample and only the stochastic parts (estimator and search seeds) vary (False).
    resample: bool = True


@dataclass(frozen=True)
class SolveSpec:
    """One ``[[solve]]`` entry: a solver, its budgets, and the search settings
    (:class:`mpq.pipeline.SearchOptions` fields) and ``guard`` it runs with."""

    solver: str
    budgets: tuple[dict[str, float], ...]
    options: tuple[tuple[str, Any], ...] = ()
    guard: bool = False

    @property
    def policy(self) -> str:
        return self.solver + ("+guard" if self.guard else "")


@dataclass(frozen=True)
class EstimatorSpec:
    """``"hessian_trace"`` or ``"hessian_trace:tol=0.1,max_samples=50"`` in a config."""

    name: str
    params: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)

    @classmethod
    def parse(cls, text: str) -> EstimatorSpec:
        from mpq.sensitivity.runner import parse_params

        name, _, rest = str(text).partition(":")
        ESTIMATORS.check(name)
        return cls(name, tuple(parse_params([rest]).items()) if rest else ())


@dataclass(frozen=True)
class FrontierSpec:
    """``[frontier]``: an NSGA-II search of the measured-quality vs bits frontier on the
    calibration data (``trials`` measured plans, ``population`` per generation), seeded from
    the table's own Pareto frontier, drawn next to the table's predicted frontier."""

    trials: int
    population: int = 10


@dataclass(frozen=True)
class CompareConfig:
    name: str
    model: str
    formats: tuple[QuantFormat, ...]
    uniform: tuple[QuantFormat, ...]
    calibration: DataSpec
    evaluation: DataSpec
    solves: tuple[SolveSpec, ...]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] | None = None
    ties: bool = True
    estimators: tuple[EstimatorSpec, ...] = ()
    seeds: tuple[int, ...] = (0,)
    preconditions: tuple[str, ...] = ("none",)
    frontier: FrontierSpec | None = None
    source: str = field(default="", compare=False)


# Every solver name (mpq.registry; no torch import here).
SOLVERS = tuple(solver_names())
# Search settings a [[solve]] entry may set (SearchOptions fields; the seed is the config's).
SOLVE_OPTIONS = {"trials": int, "generations": int, "offspring": int, "timesteps": int,
                 "rounds": int, "metric": str}  # fmt: skip
_TOP = {
    "name",
    "model",
    "formats",
    "uniform",
    "calibration",
    "evaluation",
    "solve",
    "include",
    "exclude",
    "ties",
    "estimators",
    "seeds",
    "preconditions",
    "frontier",
}


def _frontier(obj: Any, source: str) -> FrontierSpec | None:
    if obj is None:
        return None
    if not isinstance(obj, dict) or set(obj) - {"trials", "population"} or "trials" not in obj:
        raise MpqError(
            f"config {source}: [frontier] takes `trials` (and optionally `population`), e.g. "
            f"trials = 60"
        )
    trials, population = obj["trials"], obj.get("population", 10)
    for key, v, least in (("trials", trials, 1), ("population", population, 2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise MpqError(f"config {source}: [frontier] {key} must be an integer >= {least}")
    return FrontierSpec(trials, population)


def _data(d: Any, where: str, default_split: str) -> DataSpec:
    if not isinstance(d, dict):
        raise MpqError(f"[{where}] must be a table with at least `data = ...`")
    keys = {"data", "split", "n", "seq_len", "batch_size"} | (
        {"resample"} if where == "calibration" else set()
    )
    unknown = set(d) - keys
    if unknown:
        raise MpqError(f"[{where}] has unknown keys {sorted(unknown)}; allowed: {sorted(keys)}")
    resample = d.get("resample", True)
    if not isinstance(resample, bool):
        raise MpqError(f"[{where}] resample must be true or false, got {resample!r}")
    data = d.get("data")
    if isinstance(data, str):
        data = [data]
    if not data:
        raise MpqError(f'[{where}] needs `data` (e.g. "wiki" or ["wiki", "bbc"])')
    n = d.get("n")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise MpqError(f"[{where}] n must be a positive integer, got {n!r}")
    split = str(d.get("split", default_split))
    return DataSpec(tuple(data), split, n, d.get("seq_len"), d.get("batch_size"), resample)


def _preconditions(items: Any, source: str) -> tuple[str, ...]:
    from mpq.precondition import PreconditionSpec

    if not isinstance(items, list) or not items:
        raise MpqError(f'config {source}: preconditions must be a list, e.g. ["none", "awq"]')
    out = tuple(str(x) for x in items)
    for text in out:
        PreconditionSpec.parse(text)  # validates, with a clear error
    if len(set(out)) != len(out):
        raise MpqError(f"config {source}: preconditions repeat: {list(out)}")
    return out


def _solve_spec(
    s: dict[str, Any], solver: str, budgets: tuple[dict[str, float], ...], source: str
) -> SolveSpec:
    allowed = {"solver", "budgets", "guard", *SOLVE_OPTIONS}
    unknown = set(s) - allowed
    if unknown:
        raise MpqError(
            f"config {source}: [[solve]] {solver!r} has unknown keys {sorted(unknown)}; "
            f"allowed: {sorted(allowed)}"
        )
    options = []
    for key, kind in SOLVE_OPTIONS.items():
        if key not in s:
            continue
        value = s[key]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        least = 0 if key == "timesteps" else 1  # sac: 0 = the shipped policy, zero-shot
        if not ok or (kind is int and value < least):
            what = ("a positive integer" if least else "an integer >= 0") if kind is int else (
                "a string"
            )
            raise MpqError(f"config {source}: [[solve]] {solver!r}: {key} must be {what}")
        options.append((key, value))
    guard = s.get("guard", False)
    if not isinstance(guard, bool):
        raise MpqError(f"config {source}: [[solve]] {solver!r}: guard must be true or false")
    return SolveSpec(solver, budgets, tuple(options), guard)


def parse_config(obj: dict[str, Any], source: str = "") -> CompareConfig:
    unknown = set(obj) - _TOP
    if unknown:
        raise MpqError(f"config {source}: unknown keys {sorted(unknown)}; allowed: {sorted(_TOP)}")
    for key in ("name", "model", "formats", "calibration", "evaluation"):
        if key not in obj:
            raise MpqError(f"config {source}: missing `{key}`")
    formats = tuple(QuantFormat.parse(str(f)) for f in obj["formats"])
    uniform = tuple(QuantFormat.parse(str(f)) for f in obj.get("uniform", []))
    solves = []
    for s in obj.get("solve", []):
        solver = s.get("solver")
        if solver not in SOLVERS:
            raise MpqError(f"config {source}: solver {solver!r} is unknown; use one of {SOLVERS}")
        budgets = tuple(parse_budget(str(b)) for b in s.get("budgets", []))
        if not budgets:
            raise MpqError(f"config {source}: solver {solver!r} needs `budgets`")
        solves.append(_solve_spec(s, solver, budgets, source))
    exclude = obj.get("exclude")
    estimators = tuple(EstimatorSpec.parse(e) for e in obj.get("estimators", ["measured"]))
    if len({e.label for e in estimators}) != len(estimators):
        raise MpqError(f"config {source}: estimators repeat: {[e.label for e in estimators]}")
    seeds = obj.get("seeds", [0])
    valid = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)
    if not seeds or not valid or len(set(seeds)) != len(seeds):
        raise MpqError(
            f"config {source}: seeds must be distinct non-negative integers, got {seeds}"
        )
    frontier = _frontier(obj.get("frontier"), source)
    if frontier is not None and not solves:
        raise MpqError(
            f"config {source}: [frontier] searches on the table of the [[solve]] entries; add one"
        )
    return CompareConfig(
        name=str(obj["name"]),
        model=str(obj["model"]),
        formats=formats,
        uniform=uniform,
        calibration=_data(obj["calibration"], "calibration", "calib"),
        evaluation=_data(obj["evaluation"], "evaluation", "heldout"),
        solves=tuple(solves),
        include=tuple(obj.get("include", ())),
        exclude=tuple(exclude) if exclude is not None else None,
        ties=bool(obj.get("ties", True)),
        estimators=estimators,
        seeds=tuple(seeds),
        preconditions=_preconditions(obj.get("preconditions", ["none"]), source),
        frontier=frontier,
        source=source,
    )


def load_config(path: str | Path) -> CompareConfig:
    p = Path(path)
    if not p.is_file():
        raise MpqError(f"config file {str(p)!r} does not exist")
    try:
        obj = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MpqError(f"config {str(p)!r} is not valid TOML: {exc}") from exc
    return parse_config(obj, str(p))
