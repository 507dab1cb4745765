"""The name tables: every entry loads to the right kind of object, and the CLI, the config
and the pipeline accept exactly the registry's names (with no torch import to list them)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from mpq import registry
from mpq.errors import MpqError
from mpq.testing.conformance import random_problem


def _choices(parser: argparse.ArgumentParser, command: str, option: str) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    assert action.choices is not None
    return list(action.choices)


def test_cli_and_config_choices_are_the_registry() -> None:
    from mpq.cli import build_parser
    from mpq.config import SOLVERS

    parser = build_parser()
    solvers = sorted((*registry.SOLVERS, *registry.SEARCHES))
    assert registry.solver_names() == solvers == sorted(SOLVERS)
    assert _choices(parser, "solve", "--solver") == solvers
    assert _choices(parser, "export", "--solver") == solvers
    assert _choices(parser, "sensitivity", "--estimator") == sorted(registry.ESTIMATORS)
    assert _choices(parser, "export", "--format") == list(registry.EXPORTERS)
    assert not set(registry.SOLVERS) & set(registry.SEARCHES)


def test_the_registry_imports_nothing_heavy() -> None:
    code = (
        "import sys, mpq.registry as r; r.solver_names(); list(r.ESTIMATORS); list(r.MODELS); "
        "import mpq.formats as f; f.fits((8, 64), f.QuantFormat.parse('4:g32')); "
        "heavy = [m for m in ('torch', 'numpy', 'scipy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_entry_loads_to_its_kind() -> None:
    from mpq.export.common import Exporter
    from mpq.models import ModelSpec
    from mpq.sensitivity.base import Estimator

    for name in registry.ESTIMATORS:
        cls = registry.ESTIMATORS.load(name)
        assert dataclasses.is_dataclass(cls) and cls.name == name
        assert isinstance(cls(), Estimator)
    for name in registry.EXPORTERS:
        exporter = registry.EXPORTERS.load(name)
        assert isinstance(exporter, Exporter) and exporter.name == name
    for name in registry.MODELS:
        spec = registry.MODELS.load(name)
        assert isinstance(spec, ModelSpec) and spec.model_id == name


def test_table_solvers_and_searches_solve_through_the_registry() -> None:
    """Each table solver is problem -> Solution; each search factory builds, from its options,
    a search that keeps the budget (on the problem's own additive measure)."""
    from mpq.solvers.options import SearchOptions

    problem = random_problem(1, decisions=6, options=3)
    for name in registry.SOLVERS:
        sol = registry.SOLVERS.load(name)(problem)
        assert sol.status in ("optimal", "feasible"), name
        assert problem.feasible(sol.choice), name
    opts = SearchOptions(trials=4, generations=1, offspring=2, timesteps=8)
    asked: list[str] = []

    def features(p: object) -> np.ndarray | None:
        asked.append("features")
        return None  # unknown features (sac then uses the problem's own columns)

    for name in registry.SEARCHES:
        if name == "sac":
            pytest.importorskip("stable_baselines3")
        sol = registry.SEARCHES.load(name)(opts, features)(problem, None)
        assert sol.status in ("optimal", "feasible"), name
        assert problem.feasible(sol.choice), name
    assert asked == ["features"]  # only sac asks for the layer features


def test_unknown_names_list_what_exists() -> None:
    with pytest.raises(MpqError, match=r"solver 'simplex' is unknown; use one of \['closed_form'"):
        registry.SOLVERS.load("simplex")
    with pytest.raises(MpqError, match=r"export format 'onnx' is unknown; use one of"):
        registry.EXPORTERS.check("onnx")


def test_every_backend_object_answers_for_its_name_and_matches_the_reference() -> None:
    """Each registered backend is a Backend named as its entry; every backend this machine can
    run gives the reference backend's output (the oracle) within the kernels' error bound."""
    import torch

    from mpq.formats import QuantFormat
    from mpq.kernels import backends as B
    from mpq.kernels.checks import matmul_bound, max_violation
    from mpq.kernels.modules import PackedWeight, QuantLinear

    assert registry.BACKENDS.names() == B.BACKENDS
    for name in registry.BACKENDS:
        obj = registry.BACKENDS.load(name)
        assert isinstance(obj, B.Backend) and obj.name == name
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=gen), torch.randn(3, 64, generator=gen)
    for fmt in (QuantFormat(4, group_size=32), QuantFormat(8), QuantFormat(3, symmetric=False)):
        packed = PackedWeight(w, fmt)
        ref = QuantLinear(packed, None, backend="reference")(x)
        for name in B.available_here():
            layer = QuantLinear(packed, None, backend=name)
            got = layer(x)
            bound = matmul_bound(x, packed.dequantize())
            assert max_violation(got, ref, bound) <= 1.0, (name, fmt.spec(), layer.kernel)
