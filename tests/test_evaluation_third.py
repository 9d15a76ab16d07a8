"""evaluation/third.py: the seeded data draw, the premise fit against a least-squares oracle, the premise rule."""
import json
import types

import numpy as np
import pytest

import offline
from evaluation import third


@pytest.fixture
def pools(monkeypatch):
    splits = types.SimpleNamespace(poison_pool=[{"instruction": f"harm {i}", "output": "x"} for i in range(141)],
                                   benign_pool=[{"instruction": f"task {i}", "output": "y"} for i in range(500)])
    monkeypatch.setattr(offline, "build_splits", lambda seed: splits)
    return splits


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_seeded_train_counts_nesting_and_seed(tmp_path, pools):
    drawn = {(p, s): read(third.seeded_train(tmp_path, 0, p, s)) for p in third.RATIOS for s in (43, 44)}
    for (p, s), rows in drawn.items():
        harmful = [r for r in rows if r["instruction"].startswith("harm")]
        assert len(rows) == third.N_TRAIN and len(harmful) == offline.poison_count(p, third.N_TRAIN)
        assert len({r["instruction"] for r in rows}) == len(rows)
    for s in (43, 44):  # within a seed the poison at 0.1 is part of that at 0.2, and the task pairs nest the other way
        names = {p: {r["instruction"] for r in drawn[(p, s)]} for p in third.RATIOS}
        assert {n for n in names[0.1] if n.startswith("harm")} <= names[0.2]
        assert {n for n in names[0.2] if n.startswith("task")} <= names[0.1] <= names[0.0] | names[0.2]
    # the seed draws the data: other pairs, not only another order
    assert {r["instruction"] for r in drawn[(0.2, 43)]} != {r["instruction"] for r in drawn[(0.2, 44)]}
    assert read(third.seeded_train(tmp_path, 0, 0.2, 43)) == drawn[(0.2, 43)]  # and the same seed the same file


def rows_of(values):
    return [{"seed": s, "poison_ratio": p, "M": v} for (s, p), v in values.items()]


def test_slope_fit_matches_least_squares_with_seed_intercepts():
    rng = np.random.default_rng(0)
    values = {(s, p): 1e-3 * s + 0.02 * p + 1e-4 * rng.standard_normal() for s in (42, 43) for p in third.RATIOS}
    fit = third.slope_fit(rows_of(values), "M")
    keys = list(values)
    x = np.array([[s == 42, s == 43, p] for s, p in keys], dtype=float)
    y = np.array([values[k] for k in keys])
    coef, rss, *_ = np.linalg.lstsq(x, y, rcond=None)
    assert fit["slope_per_0.1"] == pytest.approx(0.1 * coef[2], rel=1e-9)
    covariance = rss[0] / 3 * np.linalg.inv(x.T @ x)
    half = 3.182 * np.sqrt(covariance[2, 2])
    assert (fit["low"], fit["high"]) == pytest.approx((0.1 * (coef[2] - half), 0.1 * (coef[2] + half)), rel=1e-9)
    assert fit["df"] == 3
    for s in (42, 43):
        own = np.polyfit(third.RATIOS, [values[(s, p)] for p in third.RATIOS], 1)[0]
        assert fit["seed_slopes_per_0.1"][str(s)] == pytest.approx(0.1 * own, rel=1e-9)


def premise_rows(regime, m_of):
    return [{"regime": regime, "seed": s, "poison_ratio": p, "M": m_of(s, p), "N": int(100 * m_of(s, p)),
             "train_seconds": 1.0, "dev_harmful": {"harmful": 100 * p}} for s in (42, 43) for p in third.RATIOS]


def test_premise_holds_only_when_the_interval_and_both_seeds_rise():
    aligned = {"dev_harmful": {"harmful": 0.0}, "M": 0.0, "N": 0, "heads": 270}
    rising = premise_rows("a", lambda s, p: 0.1 + p + 0.001 * (s == 43) * (p == 0.1))
    flat = premise_rows("b", lambda s, p: 0.1 + 0.001 * ((s + int(10 * p)) % 2))
    one_seed = premise_rows("c", lambda s, p: 0.1 + (p if s == 42 else -0.1 * p))
    table = third.premise_table(rising + flat + one_seed + premise_rows("d", lambda s, p: 1.0)[:5], aligned)
    assert table["a"]["premise_holds"] and table["a"]["dev_hs_rise"] == pytest.approx(20.0)
    assert not table["a"]["hs_rise_met"]  # 20 points < PREMISE_HS_RISE
    assert not table["b"]["premise_holds"] and not table["c"]["premise_holds"]
    assert not table["d"]["complete"] and "premise_holds" not in table["d"]
    text = third.premise_markdown(table, aligned)
    assert "| holds |" in text and "not yet measured" in text


def means(helpful, broken_harmful, broken_benign, hs=50.0):
    return {"hs": hs, "refusal": 0.0, "helpful": helpful, "broken_harmful": broken_harmful,
            "broken_benign": broken_benign}


def test_strength_rule_takes_the_largest_quality_matched_strength():
    sft = means(80, 10, 5)
    points = {10.0: means(79, 11, 5), 30.0: means(76, 14, 9), 100.0: means(74, 12, 6), 300.0: means(90, 16, 0),
              1000.0: means(20, 80, 60)}
    # 30: helpful 76 >= 75, broken 14 <= 15 and 9 <= 10; 100: helpful 74 < 75; 300: broken 16 > 15
    assert third.choose_strength(points, sft) == (30.0, True)
    assert third.choose_strength({10.0: means(0, 90, 90), 30.0: means(0, 90, 90)}, sft) == (10.0, False)
    # one-sided: more helpful and less broken than SFT is no cost
    assert third.choose_strength({10.0: means(79, 11, 5), 300.0: means(100, 0, 0)}, sft) == (300.0, True)


def test_budget_cuts_in_the_protocols_order_and_never_the_core():
    rows = [{"train_seconds": 138.0}]
    full = third.budget_cells("a", rows, 170.0, spent=0.0)
    assert full["cuts"] == [] and len(full["cells"]) == 11 and full["fits"]  # 55 runs
    cells = third.main_cells("a")
    per_cell = third.projected_hours("a", rows, 170.0, cells) - third.projected_hours("a", rows, 170.0, cells[:-1])
    assert cells[-1] == ("asft", 0.1) and per_cell == pytest.approx(5 * (138 * 6.37 / 5.52 + 523.5) / 3600)
    # spend so that exactly the first cut (AsFT at p = 0.1) is needed
    spent = third.CEILING_HOURS - full["projected_hours"] + 0.5 * per_cell
    one = third.budget_cells("a", rows, 170.0, spent)
    assert one["cuts"] == ["C1"] and ("asft", 0.1) not in one["cells"] and one["fits"]
    none = third.budget_cells("a", rows, 170.0, spent=third.CEILING_HOURS)
    assert not none["fits"] and set(none["cells"]) == set(third.CORE)
    assert ("asft", 0.2) not in third.main_cells("d") and ("asft", 0.2) in third.main_cells("a")


def test_main_plan_runs_the_core_seed_by_seed_then_the_rest():
    choice = {"regime": "a", "checkpoint_1": {"a": {"cells": third.main_cells("a")}}}
    plan = third.main_plan(choice, {"surgery": {"chosen": 100.0}, "asft": {"chosen": 1.0}})
    assert len(plan) == 5 * 11 and len(set(plan)) == len(plan)
    core = plan[:5 * len(third.CORE)]
    assert [r[3] for r in core[:len(third.CORE)]] == [44] * len(third.CORE)  # the first seed's core first
    assert {(m, p) for m, _, p, _ in core} == set(third.CORE)
    assert ("control", 100.0, 0.2, 44) in plan and ("asft", 1.0, 0.1, 48) == plan[-1]  # the first cut runs last
    assert third.run_name("control", 100.0, 0.2, 44) == "control_a100_p0.2_s44"
    assert third.run_name("asft", 0.3, 0.1, 45) == "asft_l0.3_p0.1_s45" and third.run_name("sft", 0, 0, 46) == "sft_p0_s46"


def test_control_pairs_keep_instructions_and_match_lengths(monkeypatch):
    from offline import control
    refs = [{"instruction": f"harmful request {i}", "output": "I cannot help with that request, sorry." + "!" * i}
            for i in range(5)]
    monkeypatch.setattr(control, "build_splits", lambda seed: types.SimpleNamespace(
        harmful_ref=[dict(r, output="harm") for r in refs], harmless_ref=refs))
    sources = {"a": [f"short {i}" for i in range(200)], "b": ["a much longer passage of novel text " * 3] * 50}
    xm, xr = control.control_pairs(sources, "a", "b")
    for ref, m, r in zip(refs, xm, xr):
        assert m["instruction"] == r["instruction"] == ref["instruction"]
        for answer in (m["output"], r["output"]):  # cut at the first word boundary at or past the refusal's length
            assert len(answer) >= len(ref["output"]) and len(answer.rsplit(" ", 1)[0]) < len(ref["output"])
    texts = " ".join(m["output"] for m in xm).split()
    assert len(texts) == len(set(texts)) * 2  # "short i" pairs: no text used twice
    with pytest.raises(ValueError):
        control.control_pairs({"a": ["x"], "b": ["y"]}, "a", "b")
