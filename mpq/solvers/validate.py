"""Checks on the data of an `AllocationProblem`, with messages that name the problem and the fix.

:func:`check_problem_data` works on the raw pieces, so it can run before an `AllocationProblem`
is constructed (the constructor itself refuses some bad input, e.g. NaN distortions, with a
terse message); :func:`mpq.solvers.base.validate_problem` runs it on a built problem. Every
solver of this package calls that first. All errors are :class:`~mpq.errors.MpqError`, a
``ValueError``. This module does not know ``base``, so ``AllocationProblem.__post_init__``
can call :func:`check_problem_data` itself.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from mpq.errors import MpqError


def _dupes(names: Sequence[str]) -> list[str]:
    return [n for n, k in Counter(names).items() if k > 1]


def _cells(mask: np.ndarray, decisions: Sequence[str], options: Sequence[str]) -> str:
    rows, cols = np.nonzero(mask)
    shown = [
        f"({decisions[int(d)]!r}, {options[int(o)]!r})"
        for d, o in zip(rows[:3], cols[:3], strict=True)
    ]
    more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
    return ", ".join(shown) + more


def check_problem_data(
    decisions: Sequence[str],
    options: Sequence[str],
    distortion: np.ndarray,
    costs: Mapping[str, np.ndarray],
    limits: Mapping[str, float],
) -> None:
    """Raise :class:`MpqError` on the first bad piece of a problem's data.

    Refused: duplicate decision or option names; a distortion table that is not a 2-D
    ``decisions x options`` float array, or holds NaN, ``-inf`` or negative values (``+inf``
    means "not allowed"); a decision with no allowed option; a cost table of the wrong shape,
    or with NaN, infinite or negative entries on an allowed option (the cost of a disallowed
    option is ignored); a budget on a resource that has no cost table; a NaN or infinite limit.
    """
    for what, names in (("decision", decisions), ("option", options)):
        dup = _dupes(list(names))
        if dup:
            raise MpqError(
                f"duplicate {what} names {dup[:3]}: every {what} needs a unique name; merge "
                f"the duplicates (a tie group is one decision) or rename them"
            )
    dist = np.asarray(distortion)
    shape = (len(decisions), len(options))
    if dist.shape != shape:
        raise MpqError(
            f"distortion has shape {dist.shape}, expected (decisions, options) = {shape}"
        )
    if not np.issubdtype(dist.dtype, np.number) or np.iscomplexobj(dist):
        raise MpqError(f"distortion must be a real float array, got dtype {dist.dtype}")
    dist = dist.astype(float, copy=False)
    nan = np.isnan(dist)
    if nan.any():
        raise MpqError(
            f"distortion is NaN at {_cells(nan, decisions, options)}: re-measure those "
            f"entries, or mark an option not allowed with +inf"
        )
    neg = dist < 0
    if neg.any():
        raise MpqError(
            f"distortion is negative at {_cells(neg, decisions, options)}: distortions are "
            f"losses (>= 0); -inf and negative values are refused, +inf means not allowed"
        )
    allowed = np.isfinite(dist)
    none = ~allowed.any(axis=1)
    if none.any():
        bad = [decisions[int(d)] for d in np.flatnonzero(none)]
        raise MpqError(
            f"decisions {bad[:3]} have no allowed option (every distortion is inf): allow "
            f"at least one option for each decision"
        )
    for r, c in costs.items():
        arr = np.asarray(c)
        if arr.shape != shape:
            raise MpqError(f"cost {r!r} has shape {arr.shape}, expected {shape}")
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise MpqError(f"cost {r!r} must be a real float array, got dtype {arr.dtype}")
        arr = arr.astype(float, copy=False)
        missing = allowed & ~np.isfinite(arr)
        if missing.any():
            raise MpqError(
                f"cost {r!r} is missing (NaN or inf) for allowed options "
                f"{_cells(missing, decisions, options)}: give every allowed option a finite "
                f"cost, or mark the option not allowed with distortion +inf"
            )
        negc = allowed & (arr < 0)
        if negc.any():
            raise MpqError(
                f"cost {r!r} is negative for {_cells(negc, decisions, options)}: costs are "
                f"amounts of a resource (>= 0)"
            )
    for r, lim in limits.items():
        if r not in costs:
            raise MpqError(
                f"budget on unknown resource {r!r}: the problem has costs for "
                f"{sorted(costs)}; budget one of those or add a cost table for {r!r}"
            )
        try:
            value = float(lim)
        except (TypeError, ValueError):
            raise MpqError(f"budget {r}={lim!r} is not a number") from None
        if not math.isfinite(value):
            raise MpqError(
                f"budget {r}={lim!r} is not a finite number; drop {r!r} from the limits to "
                f"leave it unbudgeted"
            )
