"""`mpq cache`: sizes by kind, clearing one kind and only that one, a clear error for a kind
that does not exist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpq.cli import main


def _fill(root: Path) -> None:
    for kind, n in (("quant", 3), ("evals", 2), ("sensitivity", 1)):
        folder = root / kind / "sub"
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i}.bin").write_bytes(os.urandom(1000 * (i + 1)))


@pytest.mark.usefixtures("mpq_env")
def test_cache_shows_each_kind_and_clears_only_the_one_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MPQ_MODELS", raising=False)  # the default layout: models in the cache
    root = tmp_path / "cache"
    _fill(root)
    assert main(["cache"]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()}
    assert rows["quant"][0] == "3" and float(rows["quant"][1]) == round(6000 / 2**20, 1)
    assert rows["evals"][0] == "2" and rows["sensitivity"][0] == "1" and rows["models"][0] == "0"
    assert main(["cache", "--clear", "quant"]) == 0
    out = capsys.readouterr().out
    assert "(cleared)" in out
    assert not (root / "quant").exists()
    assert len(list((root / "evals").rglob("*.bin"))) == 2
    assert len(list((root / "sensitivity").rglob("*.bin"))) == 1
    assert main(["cache", "--clear", "all"]) == 0
    assert not any(root.iterdir())


@pytest.mark.usefixtures("mpq_env")
def test_an_unknown_kind_is_named_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "--clear", "weights"]) == 2
    err = capsys.readouterr().err
    assert "'weights' is not a kind of cache" in err and "quant" in err and "all" in err


@pytest.mark.usefixtures("mpq_env")
def test_models_elsewhere_are_counted_and_cleared_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``$MPQ_MODELS`` moves the converted checkpoints out of the cache: the loader, ``mpq
    cache`` and ``--clear models`` all go there, and a models folder left in the cache is not
    the one they mean."""
    from mpq.models import models_root

    root, elsewhere = tmp_path / "cache", tmp_path / "shared-models"
    monkeypatch.setenv("MPQ_MODELS", str(elsewhere))
    assert models_root() == elsewhere
    for folder, n in ((elsewhere / "m", 2), (root / "models" / "old", 1)):
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{i}.bin").write_bytes(b"x" * 10)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()}
    assert rows["models"][0] == "2" and str(elsewhere) in out
    assert main(["cache", "--clear", "models"]) == 0
    assert not elsewhere.exists() and (root / "models" / "old" / "0.bin").exists()
    monkeypatch.delenv("MPQ_MODELS")
    assert models_root() == root / "models"
