"""Solvers: one `AllocationProblem` in, one `Solution` out. Numpy only, no torch."""

from mpq.solvers.base import AllocationProblem, Solution
from mpq.solvers.greedy import solve_greedy
from mpq.solvers.uniform import solve_uniform

__all__ = ["AllocationProblem", "Solution", "solve_greedy", "solve_uniform"]
