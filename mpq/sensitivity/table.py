"""`SensitivityTable`: the output of every estimator, as versioned JSON.

Per target a ``score`` and, where the estimator measures it, a ``distortion`` per format spec
(e.g. ``{"4": 0.012, "3": 0.081}``), with standard errors where the estimator is stochastic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mpq.envelope import loads, unwrap
from mpq.errors import MpqError

TABLE_TYPE = "SensitivityTable"
TABLE_VERSION = 1
# Estimators whose per-target score is a non-negative quantity (a negative one is a bad file).
NON_NEGATIVE_SCORES = ("measured", "fisher")


@dataclass(frozen=True)
class SensitivityTable:
    estimator: str
    model_id: str
    data_id: str
    distortions: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    scores: Mapping[str, float] = field(default_factory=dict)
    stderr: Mapping[str, float] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    # Standard error of each measured distortion (target -> spec -> se); empty where the
    # estimator does not measure one. Two distortions closer than a few se are not ordered.
    distortion_se: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [
            f"{name}@{spec}"
            for name, row in self.distortions.items()
            for spec, v in row.items()
            if not math.isfinite(v)
        ] + [name for name, v in self.scores.items() if not math.isfinite(v)]
        if bad:
            raise MpqError(
                f"sensitivity table from {self.estimator!r} has NaN/inf values for {bad[:5]}"
                f"{' ...' if len(bad) > 5 else ''}; recompute it (check the calibration data "
                f"and that the model's fp outputs are finite)"
            )
        for name in ("distortions", "distortion_se"):
            rows = getattr(self, name)
            frozen = {k: MappingProxyType(dict(v)) for k, v in rows.items()}
            object.__setattr__(self, name, MappingProxyType(frozen))
        for name in ("scores", "stderr", "params"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def distortion(self, target: str, spec: str) -> float:
        try:
            return self.distortions[target][spec]
        except KeyError:
            raise MpqError(
                f"the sensitivity table has no distortion for {target!r} at format {spec!r}; "
                f"measure it with the candidate formats you solve over"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": TABLE_TYPE,
            "_version": TABLE_VERSION,
            "_data": {
                "estimator": self.estimator,
                "model_id": self.model_id,
                "data_id": self.data_id,
                "params": dict(self.params),
                "scores": dict(self.scores),
                "stderr": dict(self.stderr),
                "distortions": {k: dict(v) for k, v in self.distortions.items()},
                **(
                    {"distortion_se": {k: dict(v) for k, v in self.distortion_se.items()}}
                    if self.distortion_se
                    else {}
                ),
            },
        }

    def save(self, path: str | Path) -> Path:
        from mpq.plan import atomic_write_text

        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, obj: Any) -> SensitivityTable:
        d = unwrap(obj, TABLE_TYPE, TABLE_VERSION, "sensitivity table",
                   "recompute it with `mpq sensitivity`")  # fmt: skip
        return cls(
            estimator=str(d.get("estimator")),
            model_id=str(d.get("model_id")),
            data_id=str(d.get("data_id")),
            distortions={
                k: {s: float(x) for s, x in v.items()} for k, v in d["distortions"].items()
            },
            scores={k: float(v) for k, v in d.get("scores", {}).items()},
            stderr={k: float(v) for k, v in d.get("stderr", {}).items()},
            params=dict(d.get("params", {})),
            distortion_se={
                k: {s: float(x) for s, x in v.items()}
                for k, v in d.get("distortion_se", {}).items()
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        p = Path(path)
        if p.is_dir():
            raise MpqError(f"sensitivity table {str(p)!r} is a folder; give the table's JSON file")
        if not p.is_file():
            raise MpqError(f"sensitivity table {str(p)!r} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MpqError(
                f"sensitivity table {str(p)!r} is not text (a binary or pickle file?); give a "
                f"table JSON written by `mpq sensitivity`"
            ) from None
        table = cls.from_dict(loads(text, f"sensitivity table {str(p)!r}"))
        problem = table.problem()
        if problem:
            raise MpqError(
                f"sensitivity table {str(p)!r} {problem}; recompute it with `mpq sensitivity`"
            )
        return table

    def problem(self) -> str | None:
        """What makes a (read) table impossible: negative distortions or standard errors
        (losses and their errors are >= 0), or negative scores of estimators whose score is
        a non-negative quantity (measured KL, Fisher)."""
        neg = [f"{n}@{s}" for n, row in self.distortions.items() for s, v in row.items() if v < 0]
        if neg:
            return f"has negative distortions ({neg[:3]}): distortions are losses >= 0"
        neg = [n for n, v in self.stderr.items() if v < 0] + [
            f"{n}@{s}" for n, row in self.distortion_se.items() for s, v in row.items() if v < 0
        ]
        if neg:
            return f"has negative standard errors ({neg[:3]})"
        base = self.estimator.split(":")[0]
        if base in NON_NEGATIVE_SCORES:
            neg = [n for n, v in self.scores.items() if v < 0]
            if neg:
                return f"has negative {base} scores ({neg[:3]}), which are >= 0 by definition"
        return None
