"""Report verdicts say plainly when a mixed plan loses; configs fail with clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mpq.config import load_config, parse_config
from mpq.errors import MpqError
from mpq.report import verdicts


def _row(plan: str, policy: str, bits: float, ppl: float) -> dict:
    return {"plan": plan, "policy": policy, "effective_bits": bits, "ppl": ppl, "kl": 0.0}


def test_verdicts_compare_with_best_uniform_within_bits() -> None:
    rows = [
        _row("fp32", "fp32", 32, 20.0),
        _row("uniform:3", "uniform", 3.03, 90.0),
        _row("uniform:4", "uniform", 4.03, 30.0),
        _row("greedy@3.5", "greedy", 3.5, 40.0),
        _row("greedy@4.0", "greedy", 4.0, 95.0),
    ]
    v = verdicts(rows)
    assert len(v) == 2
    assert "greedy@3.5" in v[0] and "beats" in v[0] and "uniform:3 " in v[0]
    assert "next uniform plan up, uniform:4" in v[0] and "is better" in v[0]
    assert "greedy@4.0" in v[1] and "LOSES to" in v[1]
    low = verdicts([_row("uniform:4", "uniform", 4.03, 30.0), _row("g", "greedy", 3.0, 50.0)])
    assert "no uniform plan fits" in low[0]


def test_bits_saved_interpolates_the_uniform_curve_in_log_ppl() -> None:
    from mpq.report import bits_saved

    rows = [
        _row("fp32", "fp32", 32, 20.0),
        _row("uniform:3", "uniform", 3.0, 90.0),
        _row("uniform:4", "uniform", 4.0, 30.0),
        _row("uniform:5", "uniform", 5.0, 22.0),
        _row("ilp@3.5", "ilp", 3.5, 30.0),  # as good as 4 bits: saves 0.5
        _row("ilp@4.5", "ilp", 4.5, 26.0),  # between 4 and 5 bits, in log ppl
        _row("ilp@4.2", "ilp", 4.2, 60.0),  # worse than uniform 4: negative
        _row("ilp@6", "ilp", 6.0, 21.0),  # better than every uniform plan
    ]
    lines = bits_saved(rows)
    by_plan = {ln.split("|")[1].strip(): ln for ln in lines if ln.startswith("| ilp")}
    assert "| +0.500 |" in by_plan["ilp@3.5"]
    at = 4.0 + (math.log(30) - math.log(26)) / (math.log(30) - math.log(22))
    assert f"| {at:.3g} |" in by_plan["ilp@4.5"]
    assert f"{at - 4.5:+.3f}" in by_plan["ilp@4.5"]
    below = 3.0 + (math.log(90) - math.log(60)) / (math.log(90) - math.log(30))
    assert f"{below - 4.2:+.3f}" in by_plan["ilp@4.2"] and below < 4.2
    assert "outside the uniform range" in by_plan["ilp@6"]


def test_equal_values_tie_and_noise_is_named() -> None:
    """Equal accuracies are a tie, not a win or a loss; a difference under 1.96 combined se is
    marked unresolved, a larger one is not (ppl through its mean NLL)."""

    def acc(plan: str, policy: str, bits: float, a: float, se: float) -> dict:
        return {"plan": plan, "policy": policy, "effective_bits": bits, "acc": a, "acc_se": se}

    rows = [
        acc("uniform:4", "uniform", 4.26, 0.9531, 0.010),
        acc("uniform:5", "uniform", 5.26, 0.9554, 0.010),
        acc("ilp@5", "ilp", 5.0, 0.9531, 0.010),
        acc("ilp@4.5", "ilp", 4.5, 0.9554, 0.010),
    ]
    tie, close = verdicts(rows)
    assert "ties with the best uniform plan within its bits, uniform:4 " in tie
    assert "is better (acc 0.9554) (within the evaluation's noise" in tie
    assert "beats" in close and "uniform:4 (4.260 bits, acc 0.9531) (within" in close
    assert "is equal (acc 0.9554)." in close
    far = [
        acc("uniform:4", "uniform", 4.26, 0.80, 0.010),
        acc("ilp@4.5", "ilp", 4.5, 0.90, 0.010),
    ]
    assert "beats" in verdicts(far)[0] and "noise" not in verdicts(far)[0]

    def nll(plan: str, policy: str, bits: float, v: float) -> dict:
        return {"plan": plan, "policy": policy, "effective_bits": bits, "ppl": math.exp(v),
                "nll": v, "nll_se": 0.05}  # fmt: skip

    near = verdicts([nll("uniform:4", "uniform", 4.0, 3.20), nll("ilp", "ilp", 4.2, 3.15)])
    apart = verdicts([nll("uniform:4", "uniform", 4.0, 3.50), nll("ilp", "ilp", 4.2, 3.15)])
    assert "beats" in near[0] and "noise" in near[0]
    assert "beats" in apart[0] and "noise" not in apart[0]


def test_accuracy_is_higher_is_better() -> None:
    rows = [
        {"plan": "uniform:4", "policy": "uniform", "effective_bits": 4.0, "acc": 0.9, "kl": 0},
        {"plan": "g", "policy": "greedy", "effective_bits": 4.0, "acc": 0.8, "kl": 0},
    ]
    assert "LOSES to" in verdicts(rows)[0]


def test_the_task_names_the_metric_plans_are_ranked_by() -> None:
    """The encoder's rows carry a probe ppl too; its report ranks by topic accuracy."""
    from mpq.report import primary_metric
    from mpq.tasks import PRIMARY

    row = {"plan": "p", "policy": "uniform", "effective_bits": 4.0, "ppl": 1.2, "acc": 0.9,
           "kl": 0.1}  # fmt: skip
    assert primary_metric([{**row, "primary": PRIMARY["encoder"]}]) == ("acc", False)
    assert primary_metric([{**row, "primary": PRIMARY["causal_lm"]}]) == ("ppl", True)
    assert primary_metric([{**row, "primary": PRIMARY["cnn"]}]) == ("kl", True)
    assert primary_metric([row]) == ("ppl", True)  # rows from before the column existed


def _base() -> dict:
    return {
        "name": "x",
        "model": "m",
        "formats": ["4", "8"],
        "calibration": {"data": "wiki"},
        "evaluation": {"data": ["wiki"]},
    }


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"colour": 1}, "unknown keys"),
        ({"formats": ["4", "9"]}, "bits=9"),
        ({"solve": [{"solver": "magic", "budgets": ["4"]}]}, "solver 'magic' is unknown"),
        ({"solve": [{"solver": "greedy"}]}, "needs `budgets`"),
        ({"solve": [{"solver": "greedy", "budgets": ["watts=3"]}]}, "unknown resource"),
        ({"calibration": {"data": "wiki", "n": 0}}, "positive integer"),
        ({"evaluation": {"n": 3}}, "needs `data`"),
        ({"statistics": {"n": 3}}, r"\[statistics\] needs `data`"),
        ({"statistics": {"data": "wiki", "resample": True}}, "unknown keys"),
        ({"solve": [{"solver": "bayes", "budgets": ["4"], "trails": 3}]}, "unknown keys"),
        ({"solve": [{"solver": "bayes", "budgets": ["4"], "trials": 0}]}, "positive integer"),
        ({"solve": [{"solver": "sac", "budgets": ["4"], "timesteps": 1.5}]}, "integer >= 0"),
        ({"solve": [{"solver": "sac", "budgets": ["4"], "timesteps": -1}]}, "integer >= 0"),
        ({"solve": [{"solver": "ilp", "budgets": ["4"], "guard": "yes"}]}, "true or false"),
    ],
)
def test_config_errors(patch: dict, expected: str) -> None:
    cfg = {**_base(), **patch}
    with pytest.raises(MpqError, match=expected):
        parse_config(cfg, "t")


def test_default_exclude_false_targets_what_the_model_leaves_out() -> None:
    """`default_exclude = false` is the config's --no-default-exclude: no exclude patterns
    (prepare applies the model's defaults only for None) unless `exclude` names some."""
    solve = {"solve": [{"solver": "ilp", "budgets": ["bits=4"]}]}
    assert parse_config({**_base(), **solve}, "t").exclude is None
    assert parse_config({**_base(), **solve, "default_exclude": True}, "t").exclude is None
    assert parse_config({**_base(), **solve, "default_exclude": False}, "t").exclude == ()
    cfg = parse_config({**_base(), **solve, "default_exclude": False, "exclude": ["x"]}, "t")
    assert cfg.exclude == ("x",)
    with pytest.raises(MpqError, match="default_exclude"):
        parse_config({**_base(), **solve, "default_exclude": "no"}, "t")


def test_missing_keys_and_files(tmp_path: Path) -> None:
    cfg = _base()
    del cfg["model"]
    with pytest.raises(MpqError, match="missing `model`"):
        parse_config(cfg)
    with pytest.raises(MpqError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(MpqError, match="not valid TOML"):
        load_config(bad)


def test_shipped_configs_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "experiments" / "configs"
    configs = sorted(root.glob("*.toml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        assert cfg.formats and cfg.evaluation.data


def test_a_report_folder_is_never_shared_by_two_configs(tmp_path: Path) -> None:
    from mpq.compare import CONFIG_FILE, claim_folder

    cfg = parse_config({**_base(), "solve": [{"solver": "ilp", "budgets": ["bits=4"]}]}, "a")
    folder = tmp_path / "x"
    claim_folder(folder, cfg)
    assert (folder / CONFIG_FILE).is_file()
    claim_folder(folder, parse_config({**_base(), "solve": [{"solver": "ilp",
                 "budgets": ["bits=4"]}]}, "renamed.toml"))  # fmt: skip
    # Reference points of other tools are drawn, not computed: adding one re-renders the report.
    claim_folder(folder, parse_config({**_base(), "solve": [{"solver": "ilp",
                 "budgets": ["bits=4"]}], "reference": [REF]}, "a"))  # fmt: skip
    other = parse_config({**_base(), "solve": [{"solver": "ilp", "budgets": ["bits=5"]}]}, "b")
    with pytest.raises(MpqError, match=r"another config \(differs in \['solves'\]\)"):
        claim_folder(folder, other)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "report.md").write_text("old")
    with pytest.raises(MpqError, match="was not written by `mpq compare`"):
        claim_folder(stray, cfg)


def test_quality_plot_caps_the_axis_at_four_times_the_worst_uniform_plan(tmp_path: Path) -> None:
    from mpq.report import _ppl_cap, plot_quality

    def row(policy: str, bits: float, ppl: float) -> dict:
        return {"data": "wiki", "policy": policy, "plan": f"{policy}:{bits:g}",
                "effective_bits": bits, "ppl": ppl, "ppl_lo": ppl * 0.9, "ppl_hi": ppl * 1.1,
                "kl": 0.1}  # fmt: skip

    rows = [row("uniform", 3, 500.0), row("uniform", 4, 40.0), row("sac", 3.5, 1e6),
            row("ilp", 3.5, 60.0)]  # fmt: skip
    assert _ppl_cap(rows) == 2000.0
    assert _ppl_cap([row("ilp", 3.5, 60.0)]) == float("inf")
    out = plot_quality(rows, tmp_path / "q.png")
    assert out.stat().st_size > 1000


REF = {"label": "llama.cpp IQ4_XS + imatrix", "bits": 4.44, "ratio": {"wiki": 1.073, "bbc": 1.08},
       "ci": {"wiki": 0.03}, "source": "bench_llamacpp.py"}  # fmt: skip


def test_reference_points_parse() -> None:
    cfg = parse_config({**_base(), "reference": [REF]}, "t")
    (ref,) = cfg.references
    assert (ref.label, ref.bits, ref.source) == (REF["label"], 4.44, "bench_llamacpp.py")
    assert ref.ratios == (("wiki", 1.073, 0.03), ("bbc", 1.08, None))
    assert parse_config(_base(), "t").references == ()


@pytest.mark.parametrize(
    "bad",
    [
        {"bits": -1},
        {"ratio": {}},
        {"ratio": {"wiki": 0}},
        {"ci": {"imagenet": 0.1}},  # an interval for a data set with no ratio
        {"label": ""},
        {"colour": "red"},
    ],
)
def test_bad_reference_points_name_the_fix(bad: dict) -> None:
    with pytest.raises(MpqError, match=r"\[\[reference\]\]"):
        parse_config({**_base(), "reference": [{**REF, **bad}]}, "t")


def test_reference_table_takes_the_best_plan_within_the_references_bits(tmp_path: Path) -> None:
    """Each reference is set against this run's best plan at equal or fewer bits, in ratio to
    this run's fp32 (the only comparable quantity across evaluators)."""
    from mpq.config import ReferencePoint
    from mpq.report import plot_quality, reference_table

    def row(plan: str, policy: str, bits: float, ppl: float) -> dict:
        return {"data": "wiki", "plan": plan, "policy": policy, "effective_bits": bits,
                "ppl": ppl, "ppl_lo": ppl * 0.9, "ppl_hi": ppl * 1.1, "kl": 0.1,
                "kl_se": 0.01}  # fmt: skip

    rows = [row("fp32", "fp32", 32, 20.0), row("uniform:4", "uniform", 4.0, 22.0),
            row("ilp@4.5", "ilp", 4.5, 21.0), row("ilp@4.2", "ilp", 4.2, 23.0)]  # fmt: skip
    refs = [
        ReferencePoint("A", 4.44, (("wiki", 1.073, 0.03), ("bbc", 1.0, None))),
        ReferencePoint("B", 4.6, (("wiki", 1.073, None),)),
        ReferencePoint("C", 3.0, (("wiki", 1.5, None),)),
        ReferencePoint("D", 4.6, (("bbc", 1.0, None),)),  # no wiki figure: no line
    ]
    lines = reference_table(rows, refs)
    by_ref = {
        ln.split("|")[1].strip(): ln for ln in lines if ln.startswith("| ") and "---" not in ln
    }
    # A: at <= 4.44 bits the best plan is uniform:4 (22/20 = 1.100 > 1.073)
    assert "| uniform:4 | 4.000 | 1.100 | 0.1000 ± 0.0196 | higher |" in by_ref["A"]
    assert "1.073 ± 0.030" in by_ref["A"]
    # B: at <= 4.6 bits, ilp@4.5 (1.050 < 1.073)
    assert "| ilp@4.5 | 4.500 | 1.050 | 0.1000 ± 0.0196 | lower |" in by_ref["B"]
    assert "none at these bits" in by_ref["C"]
    assert "D" not in by_ref
    out = plot_quality(rows, tmp_path / "q.png", refs)
    assert out.stat().st_size > 1000


def test_bits_saved_also_in_kl_when_ranked_by_ppl() -> None:
    """With a KL per uniform plan the table states the saving in log KL too; the two readings
    can disagree, and each is interpolated on its own curve."""
    from mpq.report import bits_saved

    def row(plan: str, policy: str, bits: float, ppl: float, kl: float) -> dict:
        return {"plan": plan, "policy": policy, "effective_bits": bits, "ppl": ppl, "kl": kl}

    rows = [
        row("fp32", "fp32", 32, 20.0, 0.0),
        row("uniform:3", "uniform", 3.0, 90.0, 0.8),
        row("uniform:4", "uniform", 4.0, 30.0, 0.2),
        row("uniform:5", "uniform", 5.0, 22.0, 0.05),
        row("ilp@3.5", "ilp", 3.5, 30.0, 0.4),  # ppl of 4 bits (+0.5), KL of 3.5 bits (0)
    ]
    lines = bits_saved(rows)
    assert "bits saved (KL)" in lines[2] and "log KL" in lines[0]
    cols = [c.strip() for c in next(ln for ln in lines if ln.startswith("| ilp")).split("|")]
    kl_at = 3.0 + (math.log(0.8) - math.log(0.4)) / (math.log(0.8) - math.log(0.2))
    assert cols[5] == "+0.500" and cols[6] == "0.4"
    assert cols[7] == f"{kl_at:.3g}" and cols[8] == f"{kl_at - 3.5:+.3f}"
    # without a KL curve (every uniform KL 0, as from an older run) only the primary metric
    flat = [{**r, "kl": 0.0} for r in rows]
    assert "KL" not in bits_saved(flat)[2]


def test_bits_saved_in_kl_beside_a_saturated_accuracy() -> None:
    """An encoder's probe accuracy saturates at the fp32 level: the KL columns still rank the
    plans, each on its own curve (accuracy interpolated linearly, KL in log)."""
    from mpq.report import bits_saved

    def row(plan: str, policy: str, bits: float, acc: float, kl: float) -> dict:
        return {"plan": plan, "policy": policy, "effective_bits": bits, "acc": acc, "kl": kl,
                "primary": "acc"}  # fmt: skip

    rows = [
        row("uniform:3", "uniform", 3.0, 0.90, 0.04),
        row("uniform:4", "uniform", 4.0, 0.95, 0.01),
        row("uniform:5", "uniform", 5.0, 0.95, 0.0025),
        row("ilp@4.5", "ilp", 4.5, 0.95, 0.0025**0.5 * 0.01**0.5),  # KL of 4.5 bits: 0
        row("ilp@3.5", "ilp", 3.5, 0.95, 0.01),  # acc and KL of 4 bits: +0.5 both
    ]
    lines = bits_saved(rows)
    assert "uniform bits at equal acc" in lines[2] and "bits saved (KL)" in lines[2]
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")] for ln in lines
             if ln.startswith("| ilp")}  # fmt: skip
    assert cells["ilp@3.5"][5] == "+0.500" and cells["ilp@3.5"][8] == "+0.500"
    assert cells["ilp@4.5"][8] == "+0.000"
