"""Export folders: a missing manifest is refused, unlisted files are reported, files honour the
umask, a killed run's temporaries are removed by the next run, and two writers of one --out
never both succeed."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import mpq
from mpq.cost import build_cost_model
from mpq.errors import MpqError
from mpq.executor import apply_plan
from mpq.export.command import export as export_plan
from mpq.export.command import exporters
from mpq.export.common import MANIFEST
from mpq.export.load import load_export
from mpq.export.mpq_format import WEIGHTS
from mpq.files import atomic_write_text, clean_stale_temps, exclusive
from mpq.formats import QuantFormat
from mpq.models import LoadedModel
from mpq.pipeline import Prepared
from mpq.plan import uniform_plan
from mpq.targets import discover

IDS = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(2))


def _prep() -> Prepared:
    model = tiny_llama()
    targets = discover(model)
    loaded = LoadedModel(model_id="tiny", family="causal_lm", model=model)
    return Prepared(loaded, targets, build_cost_model(model, targets, "tiny"))


def _export(out: Path, fmt: str = "mpq", force: bool = False) -> Prepared:
    prep = _prep()
    plan = uniform_plan(prep.targets, QuantFormat(4), "tiny")
    export_plan(prep, plan, exporters()[fmt], out, force=force)
    return prep


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


@pytest.fixture
def umask022():  # type: ignore[no-untyped-def]
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_missing_manifest_is_refused_unless_verify_false(tmp_path: Path) -> None:
    out = tmp_path / "o"
    prep = _export(out)
    (out / MANIFEST).unlink()
    with pytest.raises(MpqError, match="has no mpq_manifest.json.*verify=False"):
        mpq.load(out)
    model = mpq.load(out, verify=False)
    plan = uniform_plan(prep.targets, QuantFormat(4), "tiny")
    want = apply_plan(prep.loaded.model, plan, prep.targets, mode="packed")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, want(IDS).logits)


def test_files_not_in_the_manifest_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "o"
    _export(out)
    (out / "extra.bin").write_bytes(b"\0" * 8)
    with caplog.at_level(logging.WARNING, logger="mpq.export"):
        loaded = load_export(out)
    assert loaded.unlisted == ["extra.bin"]
    assert any("extra.bin" in r.getMessage() for r in caplog.records)


def test_written_files_honour_the_umask(tmp_path: Path, umask022: None) -> None:
    out = tmp_path / "o"
    _export(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    path = atomic_write_text(tmp_path / "plan.json", "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.umask(0o077)
    path = atomic_write_text(tmp_path / "private.json", "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "o"
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".o.tmp-{dead}-abc123"
    stale.mkdir()
    (stale / WEIGHTS).write_bytes(b"\0" * 1024)  # a killed export's partial file
    old = tmp_path / f".o.old-{dead}"
    old.mkdir()
    live = tmp_path / f".o.tmp-{alive}-live"  # a running export's: never touched
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-x"  # another output's: not ours to judge here
    other.mkdir()
    stranger = tmp_path / ".o.tmp-notapid"
    stranger.mkdir()
    _export(out)
    assert not stale.exists() and not old.exists()
    assert live.exists() and other.exists() and stranger.exists()
    assert clean_stale_temps(tmp_path / "other") == [other]


def test_a_second_writer_of_the_same_out_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with exclusive(out):  # another process writing --out right now
        with pytest.raises(MpqError, match="another mpq process is writing"):
            _export(out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary, no lock left
    _export(out)  # once released: fine
    with pytest.raises(MpqError, match="already exists"):
        _export(out)  # a later writer without --force: refused, not replaced


def test_two_processes_exporting_to_one_new_out(tmp_path: Path) -> None:
    """Two real processes race for one new --out: exactly one succeeds."""
    script = (
        "import sys; sys.path.insert(0, {tests!r})\n"
        "from test_export_reliability import _export\n"
        "from mpq.errors import MpqError\n"
        "from pathlib import Path\n"
        "try:\n"
        "    _export(Path({out!r}))\n"
        "    print('ok')\n"
        "except MpqError as exc:\n"
        "    print('refused', exc)\n"
    ).format(tests=str(Path(__file__).parent), out=str(tmp_path / "o"))
    env = {**os.environ, "MPQ_THREADS": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = sorted(p.communicate(timeout=300)[0].strip() for p in procs)
    assert outs[0] == "ok" and outs[1].startswith("refused"), outs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_safetensors_writers_take_temporaries_of_their_own(tmp_path: Path, umask022: None) -> None:
    """save_packed and the input-statistics cache write through files.atomic_write: a leftover
    (or another writer's) file at the old fixed temporary name neither blocks nor corrupts them,
    and what they write gets the umask's mode (safetensors creates 0600)."""
    from safetensors.torch import load_file

    from mpq.export.safetensors import save_packed
    from mpq.layerstats import _atomic_save

    prep = _prep()
    plan = uniform_plan(prep.targets, QuantFormat(4), "tiny")
    packed = apply_plan(prep.loaded.model, plan, prep.targets, mode="packed")
    path = tmp_path / "m.safetensors"
    (tmp_path / ".m.safetensors.tmp").mkdir()  # the temporary name save_packed used to take
    save_packed(packed, plan, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert (tmp_path / ".m.safetensors.tmp").is_dir()  # someone else's: left alone
    state = packed.state_dict()
    for name, t in load_file(str(path)).items():
        assert torch.equal(t, state[name]), name
    from safetensors.torch import save_file

    stats = tmp_path / "s.diag.safetensors"
    (tmp_path / "s.diag.safetensors.tmp").mkdir()  # the statistics cache's old fixed name
    _atomic_save(save_file, {"diag": torch.arange(3.0)}, stats)
    assert torch.equal(load_file(str(stats))["diag"], torch.arange(3.0))
    assert stat.S_IMODE(stats.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".m.safetensors.tmp", "m.safetensors", "s.diag.safetensors", "s.diag.safetensors.tmp"]
    )
