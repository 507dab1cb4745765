"""Test helpers shipped with mpq: the solver conformance suite (numpy only at import)."""

from mpq.testing.conformance import (
    SolverConformance,
    SolverSpec,
    brute_force,
    check_solution,
    check_tie_groups,
    measure_ratios,
    random_problem,
)

__all__ = [
    "SolverConformance",
    "SolverSpec",
    "brute_force",
    "check_solution",
    "check_tie_groups",
    "measure_ratios",
    "random_problem",
]
