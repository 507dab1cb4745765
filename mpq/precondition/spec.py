"""The precondition spec: which transform, with which parameters (JSON-able)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mpq.errors import MpqError
from mpq.formats import QuantFormat
from mpq.plan import BitPlan

METHODS = ("none", "scale_folding", "awq")
_PARAMS = {
    "none": (),
    "scale_folding": ("alpha", "groups", "pow2"),
    "awq": ("fmt", "formats", "n_grid", "groups", "pow2"),
}
ALL_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "head")


@dataclass(frozen=True)
class PreconditionSpec:
    """What to do, as data. ``fmt``/``formats`` are format spec strings (``"3:asym"``);
    ``formats`` holds per-layer overrides ``((layer name, spec), ...)`` for AWQ."""

    method: str = "none"
    alpha: float = 0.5
    fmt: str = "4:asym"
    formats: tuple[tuple[str, str], ...] = ()
    n_grid: int = 20
    groups: tuple[str, ...] = ALL_GROUPS
    pow2: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MpqError(f"precondition method {self.method!r} is unknown; use one of {METHODS}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise MpqError(f"alpha={self.alpha!r} must be a number in [0, 1]")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise MpqError(f"alpha={self.alpha} must be in [0, 1]")
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, int) or self.n_grid < 1:
            raise MpqError(f"n_grid={self.n_grid!r} must be a positive integer (AWQ uses 20)")
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "formats", tuple((str(a), str(b)) for a, b in self.formats))
        bad = [g for g in self.groups if g not in ALL_GROUPS]
        if bad or not self.groups:
            raise MpqError(f"groups={list(self.groups)}: use a non-empty subset of {ALL_GROUPS}")
        QuantFormat.parse(self.fmt)
        for _, spec in self.formats:
            QuantFormat.parse(spec)

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in _PARAMS[self.method]:
            v = getattr(self, k)
            if k == "formats":
                v = dict(v)
            elif k == "groups":
                v = list(v)
            out[k] = v
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params}

    @classmethod
    def from_dict(cls, obj: Any) -> PreconditionSpec:
        if not isinstance(obj, Mapping) or "method" not in obj:
            raise MpqError(
                f'precondition must be {{"method": ..., "params": {{...}}}}, got {obj!r}'
            )
        method = str(obj["method"])
        params = dict(obj.get("params") or {})
        if method not in METHODS:
            raise MpqError(f"precondition method {method!r} is unknown; use one of {METHODS}")
        unknown = set(params) - set(_PARAMS[method])
        if unknown:
            raise MpqError(
                f"precondition {method!r} has no parameters {sorted(unknown)}; "
                f"it takes {list(_PARAMS[method])}"
            )
        if "formats" in params:
            params["formats"] = tuple(sorted(dict(params["formats"]).items()))
        if "groups" in params:
            params["groups"] = tuple(params["groups"])
        return cls(method=method, **params)

    @classmethod
    def parse(cls, text: str) -> PreconditionSpec:
        """``none``, ``scale_folding``, ``scale_folding:alpha=0.5``, ``awq``,
        ``awq:fmt=3:asym,n_grid=20``, ``awq:pow2=true`` (comma-separated ``key=value``)."""
        method, _, rest = text.strip().partition(":")
        params: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise MpqError(f"precondition {text!r}: expected key=value, got {item!r}")
            key = key.strip()
            if key in ("alpha",):
                params[key] = _number(value, text)
            elif key == "n_grid":
                params[key] = int(_number(value, text))
            elif key == "pow2":
                params[key] = value.strip().lower() in ("1", "true", "yes")
            elif key == "groups":
                params[key] = value.strip().split("+")
            else:
                params[key] = value.strip()
        return cls.from_dict({"method": method, "params": params})

    def spec(self) -> str:
        """A short label (the inverse of :meth:`parse` for the common parameters)."""
        if self.method == "none":
            return "none"
        if self.method == "scale_folding":
            return f"scale_folding:alpha={self.alpha:g}"
        return f"awq:fmt={self.fmt}" + (f"+{len(self.formats)}overrides" if self.formats else "")

    def format_for(self, name: str) -> QuantFormat:
        """The format AWQ searches layer ``name`` at (an override, else ``fmt``)."""
        spec = dict(self.formats).get(name, self.fmt)
        f = QuantFormat.parse(spec)
        return dataclasses.replace(f, method="rtn") if f.method != "rtn" else f

    @classmethod
    def for_plan(cls, plan: BitPlan, **kwargs: Any) -> PreconditionSpec:
        """AWQ at the bits ``plan`` gives each layer."""
        formats = tuple((n, f.spec()) for n, f in plan.formats.items())
        return cls(method="awq", formats=formats, **kwargs)


def _number(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise MpqError(f"precondition {text!r}: {value!r} is not a number") from None
