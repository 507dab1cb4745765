"""One end-to-end run on the real model (SmolLM2-135M), at small size."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import two_log_softmax_stats

from mpq.compare import run_compare
from mpq.config import parse_config
from mpq.cost import tensor_bits, unique_tensors
from mpq.evaluate import evaluate, reference
from mpq.executor import apply_plan
from mpq.formats import QuantFormat
from mpq.pipeline import Prepared, prepare, task_for
from mpq.plan import BitPlan, uniform_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    mp = pytest.MonkeyPatch()
    mp.setenv("MPQ_CACHE", str(tmp_path_factory.mktemp("mpq-cache")))
    yield prepare("smollm2-135m")
    mp.undo()


def test_targets_and_exact_bytes_on_the_real_model(prep: Prepared) -> None:
    targets = prep.targets
    assert len(targets) == 30 * 7
    assert len({t.tie for t in targets if t.tie}) == 60  # qkv and gate_up of 30 blocks
    assert prep.cost.model_numel == 134_515_008
    plan = uniform_plan(targets, QuantFormat.parse("4:asym"), "smollm2-135m")
    packed = apply_plan(prep.loaded.model, plan, targets)
    actual = sum(tensor_bits(t) for t in unique_tensors(packed.state_dict()).values())
    report = prep.cost.plan_cost(plan)
    assert report.total_bits == actual
    # Per-channel 4-bit asym: 4 bits + (16-bit scale + packed 4-bit zero) per row.
    assert 4.0 < report.effective_bits < 4.05
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = packed(ids).logits
        b = apply_plan(prep.loaded.model, plan, targets, mode="fake")(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_tied_embedding_is_one_option_away_and_costs_what_llamacpp_stores(
    prep: Prepared,
) -> None:
    """With the model's default excludes off, the tied embedding/head is one more target; the
    plan llama.cpp's Q4_0 file holds (every decoder Linear Q4_0 = 4:g32, token_embd Q8_0 =
    8:g32, norms F32) costs exactly that file's tensor bytes, 89,941,248 (read from
    llama-quantize's own output by gguf's reader, BENCHMARKS "llama.cpp side by side"), in the
    GGUF container and in mpq's."""
    from mpq.cost import build_cost_model
    from mpq.export.command import exporters
    from mpq.targets import discover

    model = prep.loaded.model
    targets = discover(model, (), ())  # what --no-default-exclude selects
    assert len(targets) == len(prep.targets) + 1
    emb = targets[0]
    assert (emb.name, emb.kind, emb.shape, emb.aliases) == (
        "model.embed_tokens", "embedding", (49152, 576), ("lm_head",)
    )  # fmt: skip
    cost = build_cost_model(model, targets, "smollm2-135m")
    formats = {t.name: QuantFormat.parse("4:g32") for t in targets}
    formats[emb.name] = QuantFormat.parse("8:g32")
    plan = BitPlan(formats, "smollm2-135m")
    assert exporters()["gguf"].predict(plan, cost).total_bytes == 89_941_248
    assert cost.plan_cost(plan).total_bytes == 89_941_248
    assert cost.model_numel == prep.cost.model_numel  # the tied head counts once
    # With the embedding left out it stays fp32: 4 bytes instead of 34/32 per weight.
    dec = uniform_plan(prep.targets, QuantFormat.parse("4:g32"), "smollm2-135m")
    assert prep.cost.plan_cost(dec).total_bytes - 89_941_248 == 49152 * 576 * (4 - 34 / 32)


def test_quality_ordering_on_heldout_text(prep: Prepared) -> None:
    task = task_for(prep, "wiki", "heldout", 1, 128, None)
    ref = reference(task, prep.loaded.model)
    fp = evaluate(task, prep.loaded.model, ref)
    assert fp["kl"] == pytest.approx(0.0, abs=1e-6) and fp["agree"] == 1.0
    assert 5 < fp["ppl"] < 80  # DATA.md measured ~23 over 512-token windows
    kls = []
    for spec in ("8:asym", "4:asym", "3:asym"):
        plan = uniform_plan(prep.targets, QuantFormat.parse(spec), "smollm2-135m")
        kls.append(
            evaluate(task, apply_plan(prep.loaded.model, plan, prep.targets, mode="fake"), ref)[
                "kl"
            ]
        )
    assert kls[0] < kls[1] < kls[2]


def test_importance_weighted_double_quant_beats_rtn_on_heldout_text(prep: Prepared) -> None:
    """The demo's 3-bit candidate: the mse search on double-quantized scales, weighted by the
    importance of 256 wiki calibration tokens, loses far less held-out KL than round to nearest
    in the same layout (measured 2026-12-02: about a third)."""
    calib = task_for(prep, "wiki", "calib", 2, 128, None)
    task = task_for(prep, "wiki", "heldout", 1, 128, None)
    ref = reference(task, prep.loaded.model)
    kls = {}
    for spec in ("3:g32:dq", "3:g32:dq:mse"):
        plan = uniform_plan(prep.targets, QuantFormat.parse(spec), "smollm2-135m")
        model = apply_plan(prep.loaded.model, plan, prep.targets, mode="fake", calib=calib.batches)
        kls[spec] = evaluate(task, model, ref)["kl"]
    assert kls["3:g32:dq:mse"] < 0.7 * kls["3:g32:dq"], kls


def test_evaluate_equals_two_log_softmax_on_smollm2(prep: Prepared) -> None:
    """Two batches of real windows (vocabulary 49152): evaluate() with the reference's cached
    statistics equals the two-log_softmax oracle to 1e-9 relative."""
    task = task_for(prep, "wiki", "heldout", 2, 48, 1)
    ref = reference(task, prep.loaded.model)
    plan = uniform_plan(prep.targets, QuantFormat.parse("4:asym"), "smollm2-135m")
    model = apply_plan(prep.loaded.model, plan, prep.targets, mode="fake")
    got = evaluate(task, model, ref)
    assert task.labels is not None and len(task.batches) == 2
    with torch.no_grad():
        oracle = [
            two_log_softmax_stats(task.head(model, b), r, lab)
            for b, r, lab in zip(task.batches, ref.logits, task.labels, strict=True)
        ]
    kl = torch.cat([o[0] for o in oracle])
    nll = torch.cat([o[2] for o in oracle if o[2] is not None])
    torch.testing.assert_close(
        torch.tensor(got.units["kl"], dtype=torch.float64), kl, rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(got.units["nll"], dtype=torch.float64), nll, rtol=1e-9, atol=0
    )
    assert got.units["agree"] == torch.cat([o[1] for o in oracle]).tolist()


def test_compare_grid_writes_report_and_resumes(prep: Prepared, tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "name": "e2e",
            "model": "smollm2-135m",
            "formats": ["3:asym", "4:asym", "8:asym"],
            "uniform": ["4:asym", "8:asym"],
            "include": [r"layers\.(0|29)\."],
            "estimators": ["measured", "fisher"],
            "seeds": [0, 1],
            "calibration": {"data": "wiki", "n": 1, "seq_len": 32},
            "evaluation": {"data": ["wiki"], "n": 1, "seq_len": 64},
            "solve": [{"solver": "greedy", "budgets": ["bits=4.5"]}],
        },
        "test",
    )
    folder = run_compare(cfg, tmp_path, progress=False)
    for name in (
        "report.md",
        "results.csv",
        "results_by_seed.csv",
        "quality_vs_bits.png",
        "plan_bits.png",
        "estimators_vs_measured.png",
        "sensitivity/measured~seed0.json",
        "sensitivity/fisher~seed1.json",
        "plans/greedy_measured@bits=4.5~seed1.json",
    ):
        assert (folder / name).is_file(), name
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert [r["plan"] for r in rows] == [
        "fp32", "uniform:4:asym", "uniform:8:asym",
        "greedy/measured@bits=4.5", "greedy/fisher@bits=4.5",
    ]  # fmt: skip
    by_seed = list(csv.DictReader((folder / "results_by_seed.csv").open()))
    assert len(by_seed) == 3 + 2 * 2
    # Pooled over the seeds' distinct plans (one window each); uniform is one plan.
    assert rows[3]["distinct_plans"] in ("1", "2")
    assert float(rows[3]["n_units"]) == float(rows[3]["distinct_plans"])
    assert float(rows[1]["n_units"]) == 1.0
    greedy = BitPlan.load(folder / "plans/greedy_measured@bits=4.5~seed0.json")
    assert len(greedy.formats) == 14  # the included blocks 0 and 29, 7 linears each
    assert {f.bits for f in greedy.formats.values()} <= {3, 4, 8}
    assert all(float(r["effective_bits"]) <= 4.5 for r in rows[3:])
    report = (folder / "report.md").read_text()
    assert "greedy/measured@bits=4.5" in report and ("LOSES to" in report or "beats" in report)
    assert "Spearman" in report and "| fisher |" in report
    # A second run is served from the caches: identical numbers.
    rows2 = list(
        csv.DictReader((run_compare(cfg, tmp_path, progress=False) / "results.csv").open())
    )
    assert [r["ppl"] for r in rows2] == [r["ppl"] for r in rows]
