"""Solvers: one `AllocationProblem` in, one `Solution` out. Numpy only, no torch.

SciPy (HiGHS), PuLP (CBC) and cvxpy are imported inside the functions that use them, so
importing this package stays numpy-only.
"""

from mpq.solvers.base import AllocationProblem, Solution
from mpq.solvers.bounds import Headroom, headroom
from mpq.solvers.closed_form import solve_closed_form, solve_relaxation, solve_relaxation_cvxpy
from mpq.solvers.greedy import solve_greedy
from mpq.solvers.ilp import solve_ilp, solve_ilp_cbc
from mpq.solvers.pareto import ParetoFrontier, pareto_frontier, solve_pareto
from mpq.solvers.uniform import solve_uniform
from mpq.solvers.validate import check_problem_data, validate_problem

__all__ = [
    "AllocationProblem",
    "Headroom",
    "ParetoFrontier",
    "Solution",
    "check_problem_data",
    "headroom",
    "pareto_frontier",
    "solve_closed_form",
    "solve_greedy",
    "solve_ilp",
    "solve_ilp_cbc",
    "solve_pareto",
    "solve_relaxation",
    "solve_relaxation_cvxpy",
    "solve_uniform",
    "validate_problem",
]
