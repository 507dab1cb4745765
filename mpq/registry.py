"""One name table per kind: solvers, searches, estimators, export formats, kernel
backends, models.

Each entry is ``name -> "module:attr"``; nothing is imported until :meth:`Registry.load` asks
for one entry, so this module (and ``mpq --help``, which reads the names for argument choices)
imports no torch. The CLI, config validation and the pipeline read these tables and nothing
else: adding a solver, search, estimator, exporter or backend is one new file plus one line
here (see ARCHITECTURE.md, "Adding a solver, estimator, exporter or backend").

What an entry must be, per kind:

- ``SOLVERS``: a :data:`mpq.solvers.base.Solver`, ``problem -> Solution`` on the table alone;
- ``SEARCHES``: a :data:`mpq.solvers.options.SearchFactory`, ``(SearchOptions, features) ->
  Search``: a search on measured quality (``search(problem, measure) -> Solution``), built
  from its options;
- ``ESTIMATORS``: an :class:`mpq.sensitivity.base.Estimator` dataclass (its fields are its
  parameters, see :func:`mpq.sensitivity.runner.make_estimator`);
- ``EXPORTERS``: an :class:`mpq.export.common.Exporter`;
- ``BACKENDS``: a :class:`mpq.kernels.backends.Backend` (``reference`` is the oracle);
- ``MODELS``: a :class:`mpq.models.ModelSpec` (bundled, offline models).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mpq.errors import MpqError


@dataclass(frozen=True)
class Registry:
    """Names of one kind, each the ``"module:attr"`` that holds it (imported on first use)."""

    kind: str
    entries: Mapping[str, str]

    def names(self) -> tuple[str, ...]:
        """The names, in table order."""
        return tuple(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def check(self, name: str) -> None:
        """Raise :class:`MpqError` naming what exists when ``name`` is not in the table."""
        if name not in self.entries:
            raise MpqError(f"{self.kind} {name!r} is unknown; use one of {sorted(self.entries)}")

    def load(self, name: str) -> Any:
        """The object ``name`` stands for (imports its module)."""
        self.check(name)
        module, _, attr = self.entries[name].partition(":")
        return getattr(importlib.import_module(module), attr)


SOLVERS = Registry(
    "solver",
    {
        "uniform": "mpq.solvers.uniform:solve_uniform",
        "greedy": "mpq.solvers.greedy:solve_greedy",
        "ilp": "mpq.solvers.ilp:solve_ilp",
        "ilp-cbc": "mpq.solvers.ilp:solve_ilp_cbc",
        "pareto": "mpq.solvers.pareto:solve_pareto",
        "closed_form": "mpq.solvers.closed_form:solve_closed_form",
    },
)

SEARCHES = Registry(
    "search",
    {
        "bayes": "mpq.solvers.bayes:from_options",
        "evolution": "mpq.solvers.evolution:from_options",
        "refine": "mpq.solvers.refine:from_options",
        "sac": "mpq.solvers.sac:from_options",
    },
)

ESTIMATORS = Registry(
    "estimator",
    {
        "activation": "mpq.sensitivity.activations:ActivationStats",
        "correlation": "mpq.sensitivity.correlation:Correlation",
        "fisher": "mpq.sensitivity.gradient:Fisher",
        "hessian_eig": "mpq.sensitivity.hessian:HessianEigen",
        "hessian_trace": "mpq.sensitivity.hessian:HessianTrace",
        "measured": "mpq.sensitivity.measured:Measured",
        "pruning": "mpq.sensitivity.pruning:Pruning",
        "taylor": "mpq.sensitivity.gradient:Taylor",
    },
)

EXPORTERS = Registry(
    "export format",
    {
        "mpq": "mpq.export.mpq_format:MPQ_EXPORTER",
        "hf": "mpq.export.mpq_format:HF_EXPORTER",
        "gguf": "mpq.export.gguf_writer:GGUF_EXPORTER",
        "llamacpp": "mpq.export.llamacpp:LLAMACPP_EXPORTER",
        "compressed-tensors": "mpq.export.compressed:CT_EXPORTER",
    },
)

BACKENDS = Registry(
    "kernel backend",
    {
        "reference": "mpq.kernels.reference:BACKEND",
        "cpu": "mpq.kernels.cpu:BACKEND",
        "triton": "mpq.kernels.triton_backend:BACKEND",
        "cupy": "mpq.kernels.cupy_backend:BACKEND",
    },
)

MODELS = Registry(
    "model",
    {
        "smollm2-135m": "mpq.models:SMOLLM2",
        "minilm-l6": "mpq.models:MINILM",
        "mobilenet-v2": "mpq.models:MOBILENET",
    },
)


def solver_names() -> list[str]:
    """Every name ``--solver`` accepts: the table solvers and the searches, sorted."""
    return sorted((*SOLVERS, *SEARCHES))
