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
