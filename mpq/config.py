"""Comparison configs (TOML) as frozen dataclasses, validated with clear errors."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpq.cost import parse_budget
from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.registry import ESTIMATORS, solver_names
from mpq.tasks import CalibSpec


@dataclass(frozen=True)
class DataSpec:
    """A config's ``[calibration]`` or ``[evaluation]``: data sets sharing one split, size and
    batch size; :meth:`spec` is one of them as a step's :class:`mpq.tasks.CalibSpec`."""

    data: tuple[str, ...]
    split: str
    n: int | None
    seq_len: int | None
    batch_size: int | None
    # Calibration only: each seed draws its own disjoint sample (True), or every seed uses the
    # first sample and only the stochastic parts (estimator and search seeds) vary (False).
    resample: bool = True

    def spec(self, data_id: str | None = None) -> CalibSpec:
        """The data of one step: ``data_id`` (default: the first data set) at this split, size
        and batch size (:class:`mpq.tasks.CalibSpec`, the type every step's data has)."""
        return CalibSpec(data_id or self.data[0], self.split, self.n, self.seq_len, self.batch_size)


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
class ReferencePoint:
    """A ``[[reference]]`` entry: another tool's measured point (e.g. llama.cpp's IQ4_XS +
    imatrix), drawn and tabled in the report next to this run's plans. ``ratios``: per data
    set, its perplexity over *its own* fp32 perplexity, with an optional 95% half-width; that
    ratio is what is comparable across evaluators, never the raw perplexity."""

    label: str
    bits: float
    ratios: tuple[tuple[str, float, float | None], ...]
    source: str = ""

    def on(self, data: str) -> tuple[float, float | None] | None:
        """(ratio, 95% half-width or None) on data set ``data``; None when not measured."""
        return next(((r, ci) for d, r, ci in self.ratios if d == data), None)


@dataclass(frozen=True)
class CompareConfig:
    name: str
    model: str
    formats: tuple[QuantFormat, ...]
    uniform: tuple[QuantFormat, ...]
    calibration: DataSpec
    evaluation: DataSpec
    solves: tuple[SolveSpec, ...]
    # Where the input statistics of mse / gptq formats (importance, Hessians) come from: one
    # forward pass, so it can be far larger than the measured table's calibration (None: the
    # [calibration] windows themselves).
    statistics: DataSpec | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] | None = None
    ties: bool = True
    estimators: tuple[EstimatorSpec, ...] = ()
    seeds: tuple[int, ...] = (0,)
    preconditions: tuple[str, ...] = ("none",)
    frontier: FrontierSpec | None = None
    references: tuple[ReferencePoint, ...] = ()
    source: str = field(default="", compare=False)


# Every solver name (mpq.registry; no torch import here).
SOLVERS = tuple(solver_names())
# Search settings a [[solve]] entry may set (SearchOptions fields; the seed is the config's).
SOLVE_OPTIONS = {"trials": int, "generations": int, "offspring": int, "timesteps": int,
                 "rounds": int, "probes": int, "metric": str}  # fmt: skip
_TOP = {
    "name",
    "model",
    "formats",
    "uniform",
    "calibration",
    "statistics",
    "evaluation",
    "solve",
    "include",
    "exclude",
    "default_exclude",
    "ties",
    "estimators",
    "seeds",
    "preconditions",
    "frontier",
    "reference",
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


def _references(items: Any, source: str) -> tuple[ReferencePoint, ...]:
    where = f"config {source}: [[reference]]"
    example = 'label = "llama.cpp IQ4_XS", bits = 4.44, ratio = {wiki = 1.07, bbc = 1.08}'
    if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
        raise MpqError(f"{where} must be tables, e.g. [[reference]] {example}")
    out = []
    for r in items:
        _unknown(r, {"label", "bits", "ratio", "ci", "source"}, where)
        label, bits, ratio, ci = r.get("label"), r.get("bits"), r.get("ratio"), r.get("ci", {})
        ok = (
            isinstance(label, str) and label
            and isinstance(bits, int | float) and not isinstance(bits, bool) and bits > 0
            and isinstance(ratio, dict) and ratio and isinstance(ci, dict)
            and all(isinstance(v, int | float) and v > 0 for v in ratio.values())
            and all(isinstance(v, int | float) and v >= 0 for v in ci.values())
            and set(ci) <= set(ratio)
            and isinstance(r.get("source", ""), str)
        )  # fmt: skip
        if not ok:
            raise MpqError(
                f"{where} {label!r}: needs a `label`, positive `bits`, `ratio` = a table of "
                f"positive ppl ratios per data set, and optionally `ci` (95% half-widths of the "
                f"same data sets) and `source`, e.g. {example}"
            )
        ratios = tuple(
            (d, float(v), None if d not in ci else float(ci[d])) for d, v in ratio.items()
        )
        out.append(ReferencePoint(label, float(bits), ratios, str(r.get("source", ""))))
    return tuple(out)


def _unknown(keys: Any, allowed: set[str], where: str) -> None:
    """MpqError naming each unknown key with its closest allowed spelling."""
    unknown = sorted(str(k) for k in set(keys) - allowed)
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, sorted(allowed), n=1)
        hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
    raise MpqError(f"{where}: unknown keys {', '.join(hints)}; allowed: {sorted(allowed)}")


def _type_name(value: Any) -> str:
    return {str: "a string", bool: "true/false", int: "an integer", float: "a number",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)  # fmt: skip


def _list(obj: dict[str, Any], key: str, where: str, item: type, example: str) -> list[Any]:
    """``obj[key]`` as a non-empty list of ``item`` (a lone string is an error, not a list of
    its characters)."""
    value = obj[key]
    if not isinstance(value, list):
        raise MpqError(
            f"{where}: `{key}` must be a list, got {_type_name(value)} {value!r}; write "
            f"{key} = {example}"
        )
    if not value:
        raise MpqError(f"{where}: `{key}` is empty; write {key} = {example}")
    for x in value:
        if not isinstance(x, item) or isinstance(x, bool) and item is not bool:
            raise MpqError(
                f"{where}: `{key}` items must be {_type_name(item())}, got {x!r}; write "
                f"{key} = {example}"
            )
    return value


def _scalar(obj: dict[str, Any], key: str, where: str, kind: type, example: str) -> Any:
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MpqError(
            f"{where}: `{key}` must be {_type_name(kind())}, got {_type_name(value)} {value!r}; "
            f"write {key} = {example}"
        )
    return value


def _optional_int(d: dict[str, Any], key: str, where: str, low: int) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise MpqError(
            f"[{where}] {key} must be an integer >= {low}, got {_type_name(value)} {value!r}"
        )
    return value


def _report_name(name: Any, where: str) -> str:
    """A report name is a plain file name: never a path out of --out."""
    if not isinstance(name, str):
        raise MpqError(f'{where}: `name` must be a string, e.g. name = "smollm2"')
    bad = (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\:\0")
        or Path(name).is_absolute()
    )
    if bad:
        raise MpqError(
            f"{where}: name {name!r} is not a plain file name (the report goes to "
            f"<--out>/<name>/); use letters, digits, '-' and '_', e.g. name = \"smollm2\""
        )
    return name


def _data(d: Any, where: str, default_split: str) -> DataSpec:
    if not isinstance(d, dict):
        raise MpqError(f"[{where}] must be a table with at least `data = ...`")
    keys = {"data", "split", "n", "seq_len", "batch_size"} | (
        {"resample"} if where == "calibration" else set()
    )
    _unknown(d, keys, f"[{where}]")
    resample = d.get("resample", True)
    if not isinstance(resample, bool):
        raise MpqError(f"[{where}] resample must be true or false, got {resample!r}")
    data = d.get("data")
    if isinstance(data, str):
        data = [data]
    if not data:
        raise MpqError(f'[{where}] needs `data` (e.g. "wiki" or ["wiki", "bbc"])')
    if not isinstance(data, list) or not all(isinstance(x, str) and x for x in data):
        raise MpqError(f'[{where}] data must be a name or a list of names, e.g. ["wiki", "bbc"]')
    n = d.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise MpqError(f"[{where}] n must be a positive integer, got {n!r}")
    split = d.get("split", default_split)
    if not isinstance(split, str) or not split:
        raise MpqError(f'[{where}] split must be a string, e.g. split = "{default_split}"')
    seq_len = _optional_int(d, "seq_len", where, 2)
    batch_size = _optional_int(d, "batch_size", where, 1)
    return DataSpec(tuple(data), split, n, seq_len, batch_size, resample)


def _preconditions(items: Any, source: str) -> tuple[str, ...]:
    from mpq.precondition.spec import PreconditionSpec

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
    _unknown(s, allowed, f"config {source}: [[solve]] {solver!r}")
    options = []
    for key, kind in SOLVE_OPTIONS.items():
        if key not in s:
            continue
        value = s[key]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        least = 0 if key == "timesteps" else 1  # sac: 0 = the shipped policy, zero-shot
        if not ok or (kind is int and value < least):
            what = (
                ("a positive integer" if least else "an integer >= 0")
                if kind is int
                else ("a string")
            )
            raise MpqError(f"config {source}: [[solve]] {solver!r}: {key} must be {what}")
        options.append((key, value))
    guard = s.get("guard", False)
    if not isinstance(guard, bool):
        raise MpqError(f"config {source}: [[solve]] {solver!r}: guard must be true or false")
    return SolveSpec(solver, budgets, tuple(options), guard)


def parse_config(obj: dict[str, Any], source: str = "") -> CompareConfig:
    """Validate the whole config (keys, types, non-empty grids) before anything is run or
    written; every problem is an MpqError naming the key and the fix."""
    where = f"config {source}".rstrip()
    _unknown(obj, _TOP, where)
    for key in ("name", "model", "formats", "calibration", "evaluation"):
        if key not in obj:
            raise MpqError(f"config {source}: missing `{key}`")
    name = _report_name(obj["name"], where)
    model = _scalar(obj, "model", where, str, '"smollm2-135m"')
    formats = tuple(
        QuantFormat.parse(f) for f in _list(obj, "formats", where, str, '["3", "4", "8"]')
    )
    uniform = (
        tuple(QuantFormat.parse(f) for f in _list(obj, "uniform", where, str, '["4", "8"]'))
        if "uniform" in obj
        else ()
    )
    raw_solves = obj.get("solve", [])
    if not isinstance(raw_solves, list) or not all(isinstance(s, dict) for s in raw_solves):
        raise MpqError(
            f'{where}: `solve` must be [[solve]] tables (solver = "greedy", budgets = '
            f'["bits=4.0"]), got {raw_solves!r}'
        )
    solves = []
    for s in raw_solves:
        solver = s.get("solver")
        if solver not in SOLVERS:
            close = difflib.get_close_matches(str(solver), SOLVERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MpqError(
                f"config {source}: solver {solver!r} is unknown{hint}; use one of {SOLVERS}"
            )
        if not s.get("budgets"):
            raise MpqError(f"config {source}: solver {solver!r} needs `budgets`")
        budgets = tuple(
            parse_budget(b)
            for b in _list(s, "budgets", f"{where}: [[solve]] {solver!r}", str, '["bits=4.0"]')
        )
        solves.append(_solve_spec(s, solver, budgets, source))
    include = tuple(_list(obj, "include", where, str, '["mlp"]')) if "include" in obj else ()
    exclude = tuple(_list(obj, "exclude", where, str, '["lm_head"]')) if "exclude" in obj else None
    if "default_exclude" in obj and not _scalar(obj, "default_exclude", where, bool, "false"):
        exclude = exclude or ()  # the model's default excludes off (CLI --no-default-exclude)
    ties = _scalar(obj, "ties", where, bool, "true") if "ties" in obj else True
    raw_est = (
        _list(obj, "estimators", where, str, '["measured", "fisher"]')
        if "estimators" in obj
        else ["measured"]
    )
    estimators = tuple(EstimatorSpec.parse(e) for e in raw_est)
    if len({e.label for e in estimators}) != len(estimators):
        raise MpqError(f"config {source}: estimators repeat: {[e.label for e in estimators]}")
    seeds = _list(obj, "seeds", where, int, "[0, 1, 2]") if "seeds" in obj else [0]
    if any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise MpqError(
            f"config {source}: seeds must be distinct non-negative integers, got {seeds}"
        )
    frontier = _frontier(obj.get("frontier"), source)
    if frontier is not None and not solves:
        raise MpqError(
            f"config {source}: [frontier] searches on the table of the [[solve]] entries; add one"
        )
    return CompareConfig(
        name=name,
        model=model,
        formats=formats,
        uniform=uniform,
        calibration=_data(obj["calibration"], "calibration", "calib"),
        statistics=(
            _data(obj["statistics"], "statistics", "calib") if "statistics" in obj else None
        ),
        evaluation=_data(obj["evaluation"], "evaluation", "heldout"),
        solves=tuple(solves),
        include=include,
        exclude=exclude,
        ties=ties,
        estimators=estimators,
        seeds=tuple(seeds),
        preconditions=_preconditions(obj.get("preconditions", ["none"]), source),
        frontier=frontier,
        references=_references(obj.get("reference", []), source),
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
