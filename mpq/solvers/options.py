"""Settings of the searches on measured quality, and how a search is built from them (numpy only).

A search is registered in :data:`mpq.registry.SEARCHES` as a :data:`SearchFactory`:
``factory(options, features) -> Search``, where the :class:`~mpq.solvers.measure.Search` is then
called as ``search(problem, measure)``. ``features(problem)`` gives per-decision features computed
on the torch side (RAMP's layer embedding, :func:`mpq.calib_measure.decision_features`), only for a
search that asks for them. Adding a search = one file with its ``from_options`` + one registry line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mpq.solvers.base import AllocationProblem
from mpq.solvers.measure import Search

__all__ = ["Features", "Search", "SearchFactory", "SearchOptions"]


@dataclass(frozen=True)
class SearchOptions:
    """Settings of the searches on measured quality and of the uniform guard.

    ``bayes`` runs optuna TPE until its study has ``trials`` trials (``storage``: None in
    memory, a ``.db`` path or an SQLAlchemy URL; a rerun on the same storage and study resumes
    a killed search and runs only the trials it lacks; ``study`` defaults to a name derived
    from the problem).
    ``evolution`` runs ``generations`` x ``offspring`` measured mutants from the ILP plan.
    ``sac`` uses the shipped policy zero-shot (``timesteps=0``) or fine-tunes it for
    ``timesteps`` steps. ``refine`` runs ``rounds`` rounds of coordinate descent on measured
    quality from the ILP plan (:mod:`mpq.solvers.refine`), probing every decision, or only the
    ``probes`` decisions whose table damage changes most per unit of cost (two measured plans
    per probed decision and round: the cost knob on a large model). ``metric``: what is
    minimized, a key of the calibration task's metrics (``kl``: mean KL to the fp model)."""

    seed: int = 0
    trials: int = 40
    generations: int = 10
    offspring: int = 8
    timesteps: int = 0
    rounds: int = 2
    probes: int | None = None
    storage: str | None = None
    study: str | None = None
    metric: str = "kl"


Features = Callable[[AllocationProblem], np.ndarray | None]
"""Per-decision features ``[decisions, k]`` of a problem (computed on the torch side; None when
unknown)."""

SearchFactory = Callable[[SearchOptions, Features], Search]
"""What :data:`mpq.registry.SEARCHES` holds: builds a search from its options."""
