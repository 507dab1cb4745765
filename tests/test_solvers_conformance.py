"""Every solver through the conformance suite (`mpq.testing`), and tie groups on a real model.

Stated ratios of the heuristics (objective / brute-force optimum) come from measuring them on
the suite's random problems with `mpq.testing.measure_ratios` over seeds 0..999, one and three
budgeted resources, 15% of options disallowed: greedy at most 2.91x (99th percentile 1.61x on
one resource, 1.79x on three; optimal on 74% / 69%), closed_form at most 2.42x (99th
percentile 1.37x / 1.41x; optimal on 81% / 79%). The suite runs 8 of those seeds.
"""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import pytest
from conftest import tiny_llama

from mpq.solvers.base import AllocationProblem, Solution
from mpq.solvers.closed_form import solve_closed_form
from mpq.solvers.greedy import solve_greedy
from mpq.solvers.ilp import solve_ilp, solve_ilp_cbc, solve_ilp_full
from mpq.solvers.pareto import solve_pareto
from mpq.solvers.uniform import solve_uniform
from mpq.testing import SolverConformance, SolverSpec, check_tie_groups


class TestUniformConformance(SolverConformance):
    # Not optimal and not complete (only uniform plans): budget, infeasible, determinism.
    spec = SolverSpec("uniform", solve_uniform, complete=False)


class TestGreedyConformance(SolverConformance):
    spec = SolverSpec("greedy", solve_greedy, max_ratio=3.0)


class TestIlpHighsConformance(SolverConformance):
    spec = SolverSpec("ilp", solve_ilp, exact=True)


class TestIlpCbcConformance(SolverConformance):
    spec = SolverSpec("ilp-cbc", solve_ilp_cbc, exact=True)


# The same backends on the whole model (no core reduction): every path against brute force.
class TestIlpHighsFullConformance(SolverConformance):
    spec = SolverSpec("ilp-full", solve_ilp_full, exact=True)


class TestIlpCbcFullConformance(SolverConformance):
    spec = SolverSpec("ilp-cbc-full", partial(solve_ilp_full, backend="cbc"), exact=True)


class TestParetoConformance(SolverConformance):
    spec = SolverSpec("pareto", solve_pareto, exact=True, multi_resource=False)


class TestClosedFormConformance(SolverConformance):
    spec = SolverSpec("closed_form", solve_closed_form, max_ratio=2.5)


SOLVERS = {
    "uniform": solve_uniform,
    "greedy": solve_greedy,
    "ilp": solve_ilp,
    "ilp-cbc": solve_ilp_cbc,
    "pareto": solve_pareto,
    "closed_form": solve_closed_form,
}


@pytest.fixture(scope="module")
def llama():  # type: ignore[no-untyped-def]
    return tiny_llama()


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_tie_groups_share_a_format(name: str, llama) -> None:  # type: ignore[no-untyped-def]
    check_tie_groups(SOLVERS[name], llama, name)


def test_suite_catches_a_solver_that_overspends() -> None:
    """The suite is not vacuous: a solver that ignores the budget fails it."""

    def reckless(problem: AllocationProblem) -> Solution:
        sol = solve_ilp(problem)
        if sol.status == "infeasible":
            return sol
        top = problem.distortion.copy()
        top[~problem.allowed] = float("inf")
        choice = top.argmin(axis=1)
        return Solution(
            choice,
            "feasible",
            problem.distortion_of(choice),
            problem.cost_of(choice),
            "reckless",
            0.0,
        )

    class Reckless(SolverConformance):
        spec = SolverSpec("reckless", reckless)

    with pytest.raises(AssertionError, match="over budget"):
        Reckless().test_budget_never_exceeded_one_resource()


def test_new_solver_modules_import_no_torch_nor_heavy_backends() -> None:
    code = (
        "import sys, mpq.solvers, mpq.solvers.ilp, mpq.solvers.pareto, mpq.solvers.bounds, "
        "mpq.solvers.closed_form, mpq.solvers.validate, mpq.solvers._reduce, mpq.testing\n"
        "bad = [m for m in ('torch', 'transformers', 'scipy', 'cvxpy', 'pulp') "
        "if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
