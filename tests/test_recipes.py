"""The model recipes (mpq.recipes): what `mpq solve` / `mpq export` use when the command line
does not say, kept equal to the main job's config, and filled in as one package."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mpq.cli.args import fill_recipe
from mpq.config import load_config
from mpq.formats import QuantFormat
from mpq.recipes import GENERIC, RECIPES, recipe_for

ROOT = Path(__file__).resolve().parents[1]


def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict(
        model="smollm2-135m", formats=None, anchor=None, stats=None, data=None, n=None,
        seq_len=None,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_smollm2_recipe_is_the_main_jobs_config() -> None:
    """`make demo` and `mpq solve --model smollm2-135m` allocate over the same palette, table
    anchor, importance windows and calibration windows."""
    cfg = load_config(ROOT / "experiments" / "configs" / "smollm2.toml")
    r = RECIPES["smollm2-135m"]
    assert [QuantFormat.parse(s) for s in r.formats.split(",")] == list(cfg.formats)
    (est,) = cfg.estimators
    assert dict(est.params) == {"anchor": r.anchor}
    assert cfg.statistics is not None and r.stats is not None
    data, split, size = r.stats.split(":")
    assert (cfg.statistics.data, cfg.statistics.split) == ((data,), split)
    assert f"{cfg.statistics.n}x{cfg.statistics.seq_len}" == size
    c = cfg.calibration
    assert (c.data, c.n, c.seq_len) == ((r.data,), r.n, r.seq_len)
    assert r.ties == cfg.ties


def test_every_recipe_parses() -> None:
    for r in [GENERIC, *RECIPES.values()]:
        fmts = [QuantFormat.parse(s) for s in r.formats.split(",")]
        assert fmts
        if r.anchor is not None:
            QuantFormat.parse(r.anchor)


def test_no_formats_takes_the_whole_package() -> None:
    a = _args()
    assert fill_recipe(a) == RECIPES["smollm2-135m"].formats
    r = RECIPES["smollm2-135m"]
    assert (a.anchor, a.stats) == (r.anchor, r.stats)
    assert (a.data, a.n, a.seq_len) == (r.data, r.n, r.seq_len)


def test_own_formats_drop_the_recipes_anchor_and_stats() -> None:
    """An anchor and importance chosen for the recipe's palette are not imposed on formats the
    user chose; what the user gives is kept."""
    a = _args(formats="4:asym,8:asym", n=1)
    assert fill_recipe(a) == "4:asym,8:asym"
    assert (a.anchor, a.stats, a.n) == (None, None, 1)
    b = _args(formats="4:g32:mse,8:g32", stats="bbc:calib:8x512", anchor="8:g32")
    fill_recipe(b)
    assert (b.anchor, b.stats) == ("8:g32", "bbc:calib:8x512")
    c = _args(formats=None)
    assert fill_recipe(c, "4:g32,8:g32") == "4:g32,8:g32"  # a container's own default
    assert (c.anchor, c.stats) == (None, None)


@pytest.mark.parametrize("name", ["anchor", "stats"])
def test_none_turns_a_choice_off(name: str) -> None:
    a = _args(**{name: "none"})
    fill_recipe(a)
    assert getattr(a, name) is None


def test_other_models_get_the_generic_recipe(tmp_path: Path) -> None:
    assert recipe_for("minilm-l6") == GENERIC
    a = _args(model=str(tmp_path))
    assert fill_recipe(a) == GENERIC.formats
    assert (a.anchor, a.stats, a.n, a.seq_len) == (None, None, GENERIC.n, GENERIC.seq_len)


def test_ties_come_from_the_command_line_else_the_recipe() -> None:
    from mpq.cli.args import ties_of
    from mpq.cli.main import build_parser

    parser = build_parser()
    for model in ("smollm2-135m", "minilm-l6"):
        base = ["solve", "--model", model, "--budget", "bits=4", "--out", "p.json"]
        assert ties_of(parser.parse_args(base)) == recipe_for(model).ties
        assert ties_of(parser.parse_args([*base, "--ties"])) is True
        assert ties_of(parser.parse_args([*base, "--no-ties"])) is False
    assert GENERIC.ties is True  # fused q/k/v stays the default for models without a recipe
