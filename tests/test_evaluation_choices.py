"""evaluation/choices.py: the premise fit against a least-squares oracle, the premise rule, the quality-matched
strength rule and the budget's cuts."""
import json

import numpy as np
import pytest

from evaluation import choices, third


def rows_of(values):
    return [{"seed": s, "poison_ratio": p, "M": v} for (s, p), v in values.items()]


def test_slope_fit_matches_least_squares_with_seed_intercepts():
    rng = np.random.default_rng(0)
    values = {(s, p): 1e-3 * s + 0.02 * p + 1e-4 * rng.standard_normal() for s in (42, 43) for p in choices.RATIOS}
    fit = choices.slope_fit(rows_of(values), "M")
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
        own = np.polyfit(choices.RATIOS, [values[(s, p)] for p in choices.RATIOS], 1)[0]
        assert fit["seed_slopes_per_0.1"][str(s)] == pytest.approx(0.1 * own, rel=1e-9)


def premise_rows(regime, m_of):
    return [{"regime": regime, "seed": s, "poison_ratio": p, "M": m_of(s, p), "N": int(100 * m_of(s, p)),
             "train_seconds": 1.0, "dev_harmful": {"harmful": 100 * p}} for s in (42, 43) for p in choices.RATIOS]


def test_premise_holds_only_when_the_interval_and_both_seeds_rise():
    aligned = {"dev_harmful": {"harmful": 0.0}, "M": 0.0, "N": 0, "heads": 270}
    rising = premise_rows("a", lambda s, p: 0.1 + p + 0.001 * (s == 43) * (p == 0.1))
    flat = premise_rows("b", lambda s, p: 0.1 + 0.001 * ((s + int(10 * p)) % 2))
    one_seed = premise_rows("c", lambda s, p: 0.1 + (p if s == 42 else -0.1 * p))
    table = choices.premise_table(rising + flat + one_seed + premise_rows("d", lambda s, p: 1.0)[:5], aligned)
    assert table["a"]["premise_holds"] and table["a"]["dev_hs_rise"] == pytest.approx(20.0)
    assert not table["a"]["hs_rise_met"]  # 20 points < PREMISE_HS_RISE
    assert not table["b"]["premise_holds"] and not table["c"]["premise_holds"]
    assert not table["d"]["complete"] and "premise_holds" not in table["d"]
    text = choices.premise_markdown(table, aligned)
    assert "| holds |" in text and "not yet measured" in text


def means(helpful, broken_harmful, broken_benign, hs=50.0):
    return {"hs": hs, "refusal": 0.0, "helpful": helpful, "broken_harmful": broken_harmful,
            "broken_benign": broken_benign}


def test_strength_rule_takes_the_largest_quality_matched_strength():
    sft = means(80, 10, 5)
    points = {10.0: means(79, 11, 5), 30.0: means(76, 14, 9), 100.0: means(74, 12, 6), 300.0: means(90, 16, 0),
              1000.0: means(20, 80, 60)}
    # 30: helpful 76 >= 75, broken 14 <= 15 and 9 <= 10; 100: helpful 74 < 75; 300: broken 16 > 15
    assert choices.choose_strength(points, sft) == (30.0, True)
    assert choices.choose_strength({10.0: means(0, 90, 90), 30.0: means(0, 90, 90)}, sft) == (10.0, False)
    # one-sided: more helpful and less broken than SFT is no cost
    assert choices.choose_strength({10.0: means(79, 11, 5), 300.0: means(100, 0, 0)}, sft) == (300.0, True)


def test_budget_cuts_in_the_protocols_order_and_never_the_core():
    rows = [{"train_seconds": 138.0}]
    full = choices.budget_cells("a", rows, 170.0, spent=0.0)
    assert full["cuts"] == [] and len(full["cells"]) == 11 and full["fits"]  # 55 runs
    cells = choices.main_cells("a")
    per_cell = choices.projected_hours("a", rows, 170.0, cells) - choices.projected_hours("a", rows, 170.0, cells[:-1])
    assert cells[-1] == ("asft", 0.1) and per_cell == pytest.approx(5 * (138 * 6.37 / 5.52 + 523.5) / 3600)
    # spend so that exactly the first cut (AsFT at p = 0.1) is needed
    spent = choices.CEILING_HOURS - full["projected_hours"] + 0.5 * per_cell
    one = choices.budget_cells("a", rows, 170.0, spent)
    assert one["cuts"] == ["C1"] and ("asft", 0.1) not in one["cells"] and one["fits"]
    none = choices.budget_cells("a", rows, 170.0, spent=choices.CEILING_HOURS)
    assert not none["fits"] and set(none["cells"]) == set(choices.CORE)
    assert ("asft", 0.2) not in choices.main_cells("d") and ("asft", 0.2) in choices.main_cells("a")


def test_premise_table_is_plain_json():
    import json
    aligned = {"dev_harmful": {"harmful": 0.0}, "M": 0.0, "N": 0, "heads": 270}
    table = choices.premise_table(premise_rows("a", lambda s, p: 0.1 + p + 0.001 * (s == 43)), aligned)
    assert json.loads(json.dumps(table, allow_nan=False))["a"]["premise_holds"] is True


def test_a_cut_drops_all_its_cells_and_c3_drops_the_lambda_sweep():
    rows = [{"train_seconds": 138.0}]
    cells = choices.main_cells("a")
    with_asft = choices.projected_hours("a", rows, 170.0, [c for c in cells if c != ("asft", 0.1)])
    no_asft = choices.projected_hours("a", rows, 170.0, [c for c in cells if c[0] != "asft"])
    asft_cell = 5 * (138 * 6.37 / 5.52 + 523.5) / 3600
    sweep = 10 * (138 * 6.37 / 5.52 + 170.0) / 3600
    assert with_asft - no_asft == pytest.approx(asft_cell + sweep)  # C3: AsFT at 0.2 and the lambda sweep
    after_c3 = [c for c in cells if c not in (("asft", 0.1), ("control", 0.1), ("asft", 0.2))]
    sft_cell = 5 * (138 + 523.5) / 3600
    # spend so that C4 is needed, and only a little of it: both of its cells still go
    spent = choices.CEILING_HOURS - choices.projected_hours("a", rows, 170.0, after_c3) + 0.2 * sft_cell
    out = choices.budget_cells("a", rows, 170.0, spent)
    assert out["cuts"] == ["C1", "C2", "C3", "C4"] and out["fits"] and not out["lambda_sweep"]
    assert ("sft", 0.1) not in out["cells"] and ("surgery", 0.1) not in out["cells"]
    assert ("control", 0.0) in out["cells"]
    kept = {"regime": "a", "checkpoint_1": {"a": {"lambda_sweep": True}}}
    assert len(third.strength_plan(kept)) == 20
    kept["checkpoint_1"]["a"]["lambda_sweep"] = False
    assert {m for m, _, _ in third.strength_plan(kept)} == {"surgery"} and len(third.strength_plan(kept)) == 10


def test_lambda_sweep_after_cut_c3_enters_the_choice_only_when_complete(tmp_path):
    """Amendment 8: AsFT's lambda sweep run after cut C3 joins strengths.json (flagged outside the budget) once all
    of its 10 runs are committed; a partial sweep chooses nothing and Surgery's choice is unchanged."""
    dev = tmp_path / "dev"
    (dev / "json").mkdir(parents=True)
    choice = {"regime": "a", "checkpoint_1": {"a": {"lambda_sweep": False}}}

    def record(name, method, strength, seed, helpful, hs, stage="strength"):
        shares = {"dev_harmful": {"harmful": hs, "refusal": 40.0, "broken": 2.0}, "dev_benign": {"helpful": helpful, "broken": 1.0}}
        (dev / "json" / f"{name}.json").write_text(json.dumps(
            {"run": name, "stage": stage, "regime": "a", "method": method, "strength": strength, "poison_ratio": 0.2,
             "seed": seed, **shares}))

    for seed in choices.CHOICE_SEEDS:
        record(f"premisea_sft_p0.2_s{seed}", "sft", 0.0, seed, 60.0, 50.0, stage="premise")
        for a in choices.ALPHAS:
            record(f"strengtha_surgery_a{a:g}_p0.2_s{seed}", "surgery", a, seed, 60.0 - a / 10, 40.0)
    lambdas = [(l, s) for _, l, s in third.lambda_plan()]
    assert len(lambdas) == 10 and {m for m, _, _ in third.lambda_plan()} == {"asft"}
    for l, s in lambdas[:-1]:  # lambda 10 helpful 50: 10 points below SFT, so 3 is the largest matched
        record(f"strengtha_asft_l{l:g}_p0.2_s{s}", "asft", l, s, 60.0 - l, 45.0)
    out = third.choose_strengths(tmp_path, choice)
    assert "asft" not in out and out["surgery"]["chosen"] == 30.0
    record(f"strengtha_asft_l{lambdas[-1][0]:g}_p0.2_s{lambdas[-1][1]}", "asft", *lambdas[-1], 50.0, 45.0)
    out = third.choose_strengths(tmp_path, choice)
    assert out["asft"]["chosen"] == 3.0 and out["asft"]["quality_matched"] and "outside_budget" in out["asft"]
    assert out["surgery"]["chosen"] == 30.0 and (dev / "strengths.png").exists()
    choice["regime"] = "d"  # AsFT is not defined under (d): no late sweep either
    assert not third.lambda_outside_budget(choice | {"checkpoint_1": {"d": {"lambda_sweep": False}}},
                                           [{"method": "asft", "strength": l, "seed": s} for l, s in lambdas])
