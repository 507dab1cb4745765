"""Solvers: one `AllocationProblem` in, one `Solution` out. Numpy only, no torch.

SciPy (HiGHS), PuLP (CBC) and cvxpy are imported inside the functions that use them, so
importing this package stays numpy-only. So are optuna (``bayes``), stable-baselines3,
gymnasium and torch (``sac``).

The searches on measured quality (``bayes``, ``evolution``, ``sac``) take a ``measure(choice)
-> float`` besides the problem (see :mod:`mpq.solvers.measure`; ``None`` = the table's own
distortion), so they are :class:`Search`-es rather than plain :class:`Solver`-s.
"""

from mpq.solvers.base import AllocationProblem, Solution, validate_problem
from mpq.solvers.bayes import MeasuredFrontier, MeasuredPoint, bayes_frontier, solve_bayes
from mpq.solvers.bounds import Headroom, headroom
from mpq.solvers.closed_form import solve_closed_form, solve_relaxation, solve_relaxation_cvxpy
from mpq.solvers.evolution import solve_evolution
from mpq.solvers.greedy import solve_greedy
from mpq.solvers.ilp import solve_ilp, solve_ilp_cbc
from mpq.solvers.measure import CachedMeasure, Measure, Search, table_measure
from mpq.solvers.pareto import ParetoFrontier, pareto_frontier, solve_pareto
from mpq.solvers.sac import solve_sac, train_sac
from mpq.solvers.uniform import solve_uniform
from mpq.solvers.validate import check_problem_data

__all__ = [
    "AllocationProblem",
    "CachedMeasure",
    "Headroom",
    "Measure",
    "MeasuredFrontier",
    "MeasuredPoint",
    "ParetoFrontier",
    "Search",
    "Solution",
    "bayes_frontier",
    "check_problem_data",
    "headroom",
    "pareto_frontier",
    "solve_bayes",
    "solve_closed_form",
    "solve_evolution",
    "solve_greedy",
    "solve_ilp",
    "solve_ilp_cbc",
    "solve_pareto",
    "solve_relaxation",
    "solve_relaxation_cvxpy",
    "solve_sac",
    "solve_uniform",
    "table_measure",
    "train_sac",
    "validate_problem",
]
