"""The import graph of mpq/ (every import that runs: module level and inside functions; imports
under ``if TYPE_CHECKING:`` are left out) has no cycle but the deliberate lazy splits named
here, so each module can be read, tested and replaced below the ones that use it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mpq"

# Deliberate lazy splits: the second module is imported only inside a function of the first.
ALLOWED = {
    # gymnasium/stable-baselines3 load only when a SAC agent trains.
    frozenset({"mpq.solvers.sac", "mpq.solvers._sac_env"}),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imported(node: ast.AST, types: bool = False) -> set[str]:
    """Names imported anywhere under ``node`` that run (``if TYPE_CHECKING:`` bodies skipped
    unless ``types``)."""
    out: set[str] = set()
    for child in ast.iter_child_nodes(node):
        if not types and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for other in child.orelse:
                out |= _imported(other)
            continue
        if isinstance(child, ast.Import):
            out |= {a.name for a in child.names}
        elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
            out |= {child.module} | {f"{child.module}.{a.name}" for a in child.names}
        out |= _imported(child, types)
    return out


def _graph(mods: dict[str, Path], types: bool = False) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        for name in _imported(ast.parse(path.read_text(encoding="utf-8")), types):
            target = resolve(name) if name.startswith("mpq.") else None
            if target and target not in (mod, "mpq"):
                graph[mod].add(target)
    return graph


def _cycles(mods: dict[str, Path], graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(mods):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle_but_the_deliberate_lazy_splits() -> None:
    mods = _modules()
    cycles = _cycles(mods, _graph(mods))
    unexpected = [sorted(c) for c in cycles if c not in ALLOWED]
    assert not unexpected, f"import cycles: {unexpected}"


# Type-only references back (annotations, never run): the Backend signatures name the operand
# and module types of the kernels that implement them.
TYPE_ONLY = {
    frozenset(
        {
            "mpq.kernels.backends",
            "mpq.kernels.checks",
            "mpq.kernels.modules",
            "mpq.kernels.reference",
        }
    ),
}


def test_type_only_imports_close_no_other_cycle() -> None:
    mods = _modules()
    cycles = _cycles(mods, _graph(mods, types=True))
    unexpected = [sorted(c) for c in cycles if c not in ALLOWED | TYPE_ONLY]
    assert not unexpected, f"import cycles through type-only imports: {unexpected}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    mods = {"mpq.a": Path("a"), "mpq.b": Path("b"), "mpq.c": Path("c")}
    graph = {"mpq.a": {"mpq.b"}, "mpq.b": {"mpq.a"}, "mpq.c": {"mpq.a"}}
    assert _cycles(mods, graph) == [frozenset({"mpq.a", "mpq.b"})]


def test_plans_costs_and_problems_load_without_torch() -> None:
    """Formats, targets, plans, the cost model's arithmetic and the problem builder are integer
    and numpy work: importing them must not import torch (or transformers)."""
    code = (
        "import sys, mpq.formats, mpq.targets, mpq.plan, mpq.cost, mpq.problem\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT.parent, env=env)
