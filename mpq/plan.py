"""`BitPlan`: the per-target formats a solver chose, as frozen, versioned JSON.

File layout (``_version`` 1)::

    {"_type": "BitPlan", "_version": 1,
     "_data": {"model_id": ..., "solver": ..., "objective": ..., "budget": {...},
               "mpq_version": ..., "meta": {...},
               "formats": {"<target name>": {"bits": 4, "group_size": null, ...}, ...}}}

A saved plan names every target explicitly (no patterns), so it is complete and auditable.
Loading refuses unknown versions; :meth:`BitPlan.validate` checks it against a model's targets.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mpq.envelope import loads, unwrap
from mpq.errors import MpqError
from mpq.files import atomic_write_text
from mpq.formats import QuantFormat, check_format
from mpq.targets import Target, unknown_name_message

PLAN_TYPE = "BitPlan"
PLAN_VERSION = 1


def _freeze(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class BitPlan:
    """``{target name -> QuantFormat}`` in model order, plus provenance metadata."""

    formats: Mapping[str, QuantFormat]
    model_id: str
    solver: str = "manual"
    objective: str = ""
    budget: Mapping[str, float] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    mpq_version: str = ""

    def __post_init__(self) -> None:
        from mpq import __version__

        for name, fmt in self.formats.items():
            if not isinstance(fmt, QuantFormat):
                raise MpqError(f"plan entry {name!r} is not a QuantFormat: {fmt!r}")
        for k, v in self.budget.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise MpqError(f"budget {k!r} must be a finite number, got {v!r}")
        object.__setattr__(self, "formats", _freeze(self.formats))
        object.__setattr__(self, "budget", _freeze(self.budget))
        object.__setattr__(self, "meta", _freeze(self.meta))
        if not self.mpq_version:
            object.__setattr__(self, "mpq_version", __version__)

    def __getitem__(self, name: str) -> QuantFormat:
        return self.formats[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": PLAN_TYPE,
            "_version": PLAN_VERSION,
            "_data": {
                "model_id": self.model_id,
                "solver": self.solver,
                "objective": self.objective,
                "budget": dict(self.budget),
                "mpq_version": self.mpq_version,
                "meta": dict(self.meta),
                "formats": {n: f.to_dict() for n, f in self.formats.items()},
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, obj: Any) -> BitPlan:
        data = unwrap(obj, PLAN_TYPE, PLAN_VERSION, "plan",
                      "write plans with `mpq solve` or BitPlan.save")  # fmt: skip
        if not isinstance(data.get("formats"), dict):
            raise MpqError('plan file has no "_data.formats" object; the file is malformed')
        if not isinstance(data.get("model_id"), str):
            raise MpqError('plan file has no "_data.model_id" string; the file is malformed')
        for key in ("budget", "meta"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise MpqError(
                    f'plan file "_data.{key}" must be a JSON object; the file is malformed'
                )
        formats = {}
        for name, f in data["formats"].items():
            try:
                formats[name] = QuantFormat.from_dict(f)
            except (MpqError, TypeError) as exc:
                raise MpqError(f"plan entry {name!r}: {exc}") from exc
        return cls(
            formats=formats,
            model_id=data["model_id"],
            solver=str(data.get("solver", "")),
            objective=str(data.get("objective", "")),
            budget=dict(data.get("budget") or {}),
            meta=dict(data.get("meta") or {}),
            mpq_version=str(data.get("mpq_version", "")),
        )

    @classmethod
    def from_json(cls, text: str) -> BitPlan:
        return cls.from_dict(loads(text, "plan"))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a temp file renamed into place): never a half-written plan."""
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BitPlan:
        p = Path(path)
        if not p.is_file():
            raise MpqError(f"plan file {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MpqError(f"plan file {str(p)!r} is not text; give a plan JSON file") from None
        return cls.from_json(text)

    def validate(self, targets: Sequence[Target]) -> None:
        """Check names, formats and tie groups against a model's targets; list every problem."""
        problems: list[str] = []
        known = {t.name: t for t in targets}
        for name in self.formats:
            if name not in known:
                problems.append(unknown_name_message(name, list(known)))
        missing = [n for n in known if n not in self.formats]
        if missing:
            problems.append(
                f"the plan has no format for {len(missing)} target(s) of the model, e.g. "
                f"{missing[:3]}; give every target a format (16 keeps it in high precision)"
            )
        groups: dict[str, set[QuantFormat]] = {}
        for name, fmt in self.formats.items():
            t = known.get(name)
            if t is None:
                continue
            try:
                check_format(t.shape, fmt, name)
            except MpqError as exc:
                problems.append(str(exc))
            if t.tie is not None:
                groups.setdefault(t.tie, set()).add(fmt)
        for tie, fmts in groups.items():
            if len(fmts) > 1:
                problems.append(
                    f"tie group {tie!r} must share one format but the plan gives it "
                    f"{sorted(f.spec() for f in fmts)}"
                )
        if problems:
            raise MpqError(
                f"plan for {self.model_id!r} does not fit this model:\n  - "
                + "\n  - ".join(problems)
            )


def uniform_plan(
    targets: Sequence[Target], fmt: QuantFormat, model_id: str, **meta: Any
) -> BitPlan:
    """Every target at ``fmt``."""
    return BitPlan(
        formats={t.name: fmt for t in targets},
        model_id=model_id,
        solver="uniform",
        meta=meta,
    )


def parse_plan_arg(arg: str, targets: Sequence[Target], model_id: str) -> BitPlan:
    """A plan from the command line: ``uniform:<format spec>`` or a plan JSON file."""
    if arg.startswith("uniform:"):
        fmt = QuantFormat.parse(arg[len("uniform:") :])
        plan = uniform_plan(targets, fmt, model_id)
    elif arg in ("fp", "fp32"):
        raise MpqError("'fp' is the unquantized model, not a plan; use uniform:16 to keep weights")
    else:
        if Path(arg).is_dir():
            hint = (
                f" (an export folder: its plan is {str(Path(arg) / 'plan.json')!r})"
                if (Path(arg) / "plan.json").is_file()
                else ""
            )
            raise MpqError(f"plan {arg!r} is a folder{hint}; give a plan JSON file")
        if not Path(arg).exists():
            raise MpqError(
                f"plan {arg!r} is neither a file nor a uniform spec like 'uniform:4' "
                f"or 'uniform:4:g128:asym'"
            )
        plan = BitPlan.load(arg)
        if plan.model_id != model_id:
            raise MpqError(
                f"plan {arg!r} was made for model {plan.model_id!r}, not {model_id!r}; "
                f"pass --model {plan.model_id} or solve a plan for this model"
            )
    plan.validate(targets)
    return plan
