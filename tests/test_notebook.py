"""The exploration notebook runs top to bottom (on a tiny local model, so it never rots)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "notebooks" / "explore.ipynb"


def test_explore_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from conftest import build_tiny_folder

    folder = build_tiny_folder(tmp_path / "llama")
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPQ_NOTEBOOK_MODEL", str(folder))
    monkeypatch.setenv("MPQ_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPQ_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    root = str(NOTEBOOK.parents[2])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    # The notebook printed every plan with its bits and perplexity, and the fp32 row.
    for name in ("uniform:3:asym", "uniform:8:asym", "fp32 ppl"):
        assert name in outputs, name
    assert outputs.count(": optimal, effective bits") == 3  # three ILP budgets solved
    assert "Traceback" not in outputs
