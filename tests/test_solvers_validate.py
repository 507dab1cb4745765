"""Bad allocation problems are refused with messages that name the problem and the fix."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mpq.errors import MpqError
from mpq.solvers.base import AllocationProblem, validate_problem
from mpq.solvers.closed_form import solve_closed_form
from mpq.solvers.ilp import solve_ilp
from mpq.solvers.pareto import solve_pareto
from mpq.solvers.validate import check_problem_data

DEC = ("a", "b")
OPT = ("4", "8")


def _parts(**over: Any) -> dict[str, Any]:
    parts: dict[str, Any] = {
        "decisions": DEC,
        "options": OPT,
        "distortion": np.array([[1.0, 0.5], [2.0, 0.1]]),
        "costs": {"bits": np.array([[4.0, 8.0], [4.0, 8.0]])},
        "limits": {"bits": 12.0},
    }
    parts.update(over)
    return parts


def test_good_problem_passes() -> None:
    check_problem_data(**_parts())
    p = AllocationProblem(**_parts())
    assert validate_problem(p) is p


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"distortion": np.array([[np.nan, 0.5], [2.0, 0.1]])},
            r"distortion is NaN at \('a', '4'\): re-measure",
        ),
        (
            {"distortion": np.array([[1.0, -0.5], [2.0, 0.1]])},
            r"distortion is negative at \('a', '8'\)",
        ),
        (
            {"distortion": np.array([[1.0, 0.5], [-np.inf, 0.1]])},
            r"distortion is negative at \('b', '4'\).*\+inf means not allowed",
        ),
        (
            {"distortion": np.array([[np.inf, np.inf], [2.0, 0.1]])},
            r"decisions \['a'\] have no allowed option",
        ),
        ({"distortion": np.ones((3, 2))}, r"distortion has shape \(3, 2\), expected"),
        (
            {"costs": {"bits": np.array([[4.0, np.nan], [4.0, 8.0]])}},
            r"cost 'bits' is missing \(NaN or inf\) for allowed options \('a', '8'\)",
        ),
        (
            {"costs": {"bits": np.array([[4.0, 8.0], [np.inf, 8.0]])}},
            r"cost 'bits' is missing .* \('b', '4'\)",
        ),
        (
            {"costs": {"bits": np.array([[4.0, -8.0], [4.0, 8.0]])}},
            r"cost 'bits' is negative for \('a', '8'\)",
        ),
        ({"costs": {"bits": np.ones((2, 3))}}, r"cost 'bits' has shape \(2, 3\)"),
        ({"decisions": ("a", "a")}, r"duplicate decision names \['a'\].*tie group is one"),
        ({"options": ("4", "4")}, r"duplicate option names \['4'\]"),
        (
            {"limits": {"watts": 3.0}},
            r"budget on unknown resource 'watts': the problem has costs for \['bits'\]",
        ),
        ({"limits": {"bits": float("nan")}}, r"budget bits=nan is not a finite number"),
        ({"limits": {"bits": float("inf")}}, r"drop 'bits' from the limits"),
    ],
)
def test_bad_input_is_refused(over: dict[str, Any], message: str) -> None:
    with pytest.raises(MpqError, match=message) as err:
        check_problem_data(**_parts(**over))
    assert isinstance(err.value, ValueError)


def test_cost_of_a_disallowed_option_is_ignored() -> None:
    check_problem_data(
        **_parts(
            distortion=np.array([[1.0, np.inf], [2.0, 0.1]]),
            costs={"bits": np.array([[4.0, np.nan], [4.0, 8.0]])},
        )
    )


@pytest.mark.parametrize("solve", [solve_ilp, solve_pareto, solve_closed_form])
def test_solvers_validate_their_input(solve: Any) -> None:
    bad = [
        _parts(distortion=np.array([[1.0, -0.5], [2.0, 0.1]])),
        _parts(costs={"bits": np.array([[4.0, np.nan], [4.0, 8.0]])}),
        _parts(decisions=("a", "a")),
    ]
    for parts in bad:
        with pytest.raises(MpqError):
            solve(AllocationProblem(**parts))
