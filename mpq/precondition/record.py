"""The precondition record every plan solved from a transformed model carries (versioned JSON)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mpq.errors import MpqError
from mpq.plan import BitPlan
from mpq.precondition.spec import PreconditionSpec
from mpq.tasks import CalibSpec

RECORD_VERSION = 1


@dataclass(frozen=True)
class PreconditionRecord:
    """What a transform did to the fp model, as every plan solved from it carries it in
    ``meta["precondition"]`` (:meth:`to_dict`; :meth:`from_dict` reads it back and refuses other
    versions). ``calib``: the data it was fitted on (tokens, data id, split, task key);
    ``scales_sha256``: a digest of the scales it folded (a refit must reproduce it);
    ``not_folded``: (layer, reason) pairs; ``calib_args``: the :class:`CalibSpec` to refit it
    (:func:`prepared_for_plan`); ``seconds``: its calibration cost (comparisons report it);
    ``report``: the fold report of the ``none`` transform."""

    spec: PreconditionSpec = field(default_factory=lambda: PreconditionSpec())
    calib: Mapping[str, Any] | None = None
    scales_sha256: str | None = None
    not_folded: tuple[tuple[str, str], ...] | None = None
    report: Mapping[str, Any] | None = None
    calib_args: CalibSpec | None = None
    seconds: float | None = None

    @property
    def method(self) -> str:
        return self.spec.method

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the record (the keys that are set, and ``version``)."""
        out: dict[str, Any] = self.spec.to_dict()
        if self.report is not None:
            out["report"] = self.report
        if self.calib is not None:
            out["calib"] = dict(self.calib)
        if self.scales_sha256 is not None:
            out["scales_sha256"] = self.scales_sha256
        if self.not_folded is not None:
            out["not_folded"] = [list(x) for x in self.not_folded]
        if self.calib_args is not None:
            out["calib_args"] = dataclasses.asdict(self.calib_args)
        if self.seconds is not None:
            out["seconds"] = self.seconds
        out["version"] = RECORD_VERSION
        return json.loads(json.dumps(out))

    def tag(self) -> str:
        """A digest of what the transform computed (spec, data, scales): names the model."""
        body = {k: v for k, v in self.to_dict().items() if k not in _UNTAGGED}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]

    @classmethod
    def from_dict(cls, obj: Any) -> PreconditionRecord:
        """Read a record written by :meth:`to_dict` (a record without ``version`` is a plan
        from before versioning, with the same layout)."""
        spec = PreconditionSpec.from_dict(obj)
        version = obj.get("version", RECORD_VERSION)
        if version != RECORD_VERSION:
            raise MpqError(
                f"the plan's precondition record has version {version!r}; this mpq reads "
                f"version {RECORD_VERSION}: solve the plan again with this mpq"
            )
        args = obj.get("calib_args")
        if args is not None and not isinstance(args, Mapping):
            raise MpqError(f"the plan's precondition calib_args {args!r} is not an object")
        try:
            calib_args = CalibSpec(**args) if args is not None else None
        except TypeError as exc:
            raise MpqError(f"the plan's precondition calib_args are malformed ({exc})") from None
        raw = obj.get("not_folded")
        not_folded = None if raw is None else tuple((str(a), str(b)) for a, b in raw)
        return cls(
            spec=spec,
            calib=obj.get("calib"),
            scales_sha256=obj.get("scales_sha256"),
            not_folded=not_folded,
            report=obj.get("report"),
            calib_args=calib_args,
            seconds=obj.get("seconds"),
        )


# Keys that do not change what the transform computed (left out of the model's tag).
_UNTAGGED = ("not_folded", "version", "calib_args", "seconds")


def record_of(plan: BitPlan) -> PreconditionRecord:
    """The record in ``plan.meta["precondition"]`` (the ``none`` record when absent)."""
    rec = plan.meta.get("precondition")
    if rec is None:
        return PreconditionRecord()
    return PreconditionRecord.from_dict(rec)


def spec_from_plan(plan: BitPlan) -> PreconditionSpec:
    """The spec recorded in ``plan.meta["precondition"]`` (``none`` when absent)."""
    return record_of(plan).spec
