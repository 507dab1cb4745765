"""Solvers against brute force over every plan of small problems."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest

from mpq.solvers.base import AllocationProblem
from mpq.solvers.greedy import solve_greedy
from mpq.solvers.uniform import solve_uniform


def _problem(
    rng: np.random.Generator, d: int, sizes: np.ndarray | None = None, frac: float = 0.5
) -> AllocationProblem:
    bits = np.array([2.0, 3.0, 4.0, 8.0])
    sizes = rng.integers(1, 10, d).astype(float) if sizes is None else sizes
    cost = sizes[:, None] * bits[None, :]
    # Convex, decreasing distortion in bits (the usual error model: s * 4^-b).
    sens = rng.uniform(0.1, 10.0, d)
    dist = sens[:, None] * sizes[:, None] * 4.0 ** (-bits[None, :])
    lo, hi = cost[:, 0].sum(), cost[:, -1].sum()
    return AllocationProblem(
        decisions=tuple(f"d{i}" for i in range(d)),
        options=("2", "3", "4", "8"),
        distortion=dist,
        costs={"bits": cost},
        limits={"bits": lo + frac * (hi - lo)},
    )


def _brute(problem: AllocationProblem) -> tuple[float, tuple[int, ...] | None]:
    best, arg = np.inf, None
    for choice in itertools.product(range(len(problem.options)), repeat=len(problem.decisions)):
        c = np.array(choice)
        if problem.feasible(c) and problem.distortion_of(c) < best:
            best, arg = problem.distortion_of(c), choice
    return best, arg


@pytest.mark.parametrize("seed", range(12))
def test_greedy_feasible_and_near_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = _problem(rng, 6, frac=rng.uniform(0.1, 0.9))
    sol = solve_greedy(p)
    best, _ = _brute(p)
    assert sol.status == "feasible"
    assert p.feasible(sol.choice)
    assert sol.objective == pytest.approx(p.distortion_of(sol.choice))
    assert sol.objective >= best - 1e-12
    assert sol.objective <= 2.0 * best  # greedy is a heuristic; bound how far it strays here


@pytest.mark.parametrize("seed", range(6))
def test_greedy_optimal_for_equal_sizes_and_uniform_steps(seed: int) -> None:
    """Separable convex problem with equal cost steps: marginal greedy is exactly optimal."""
    rng = np.random.default_rng(100 + seed)
    d = 6
    bits = np.array([2.0, 3.0, 4.0, 5.0])
    cost = np.tile(bits, (d, 1))
    dist = rng.uniform(0.1, 10.0, d)[:, None] * 4.0 ** (-bits[None, :])
    p = AllocationProblem(
        tuple(f"d{i}" for i in range(d)),
        ("2", "3", "4", "5"),
        dist,
        {"bits": cost},
        {"bits": float(rng.integers(13, 30))},
    )
    best, _ = _brute(p)
    assert solve_greedy(p).objective == pytest.approx(best, rel=1e-12)


def test_uniform_is_the_best_uniform_plan() -> None:
    rng = np.random.default_rng(7)
    p = _problem(rng, 5, frac=0.6)
    sol = solve_uniform(p)
    feasible = [o for o in range(4) if p.feasible(np.full(5, o))]
    best = min(feasible, key=lambda o: p.distortion_of(np.full(5, o)))
    assert (sol.choice == best).all()


def test_infeasible_reports_smallest_budget() -> None:
    rng = np.random.default_rng(3)
    p = _problem(rng, 4)
    least = p.costs["bits"][:, 0].sum()
    tight = AllocationProblem(p.decisions, p.options, p.distortion, p.costs, {"bits": least - 1.0})
    for solver in (solve_greedy, solve_uniform):
        sol = solver(tight)
        assert sol.status == "infeasible"
        assert sol.min_feasible == {"bits": pytest.approx(least)}
    exact = AllocationProblem(p.decisions, p.options, p.distortion, p.costs, {"bits": least})
    assert solve_greedy(exact).status == "feasible"


def test_disallowed_options_are_never_chosen() -> None:
    rng = np.random.default_rng(5)
    p = _problem(rng, 5, frac=0.3)
    dist = p.distortion.copy()
    dist[0, 0] = np.inf  # decision 0 cannot take 2 bits
    q = AllocationProblem(p.decisions, p.options, dist, p.costs, p.limits)
    sol = solve_greedy(q)
    assert sol.choice[0] != 0 and q.feasible(sol.choice)


def test_multi_resource_budget_respected() -> None:
    rng = np.random.default_rng(11)
    p = _problem(rng, 6, frac=0.7)
    lat = rng.uniform(1, 3, p.distortion.shape)
    q = AllocationProblem(
        p.decisions,
        p.options,
        p.distortion,
        {"bits": p.costs["bits"], "bops": lat},
        {"bits": p.limits["bits"], "bops": float(lat[:, 1].sum())},
    )
    sol = solve_greedy(q)
    best, _ = _brute(q)
    assert sol.status == "feasible" and q.feasible(sol.choice)
    assert sol.objective >= best - 1e-12


def test_solvers_import_no_torch() -> None:
    code = "import sys, mpq.solvers; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
