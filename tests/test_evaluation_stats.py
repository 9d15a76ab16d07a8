"""evaluation/stats.py: bootstrap intervals (over seeds, items and clusters), paired differences from SFT, and the
positive-heads trend."""
import pytest

from evaluation import stats


@pytest.mark.parametrize("values, expected", [([[1, 1, 1, 1]], (1.0, 1.0, 1.0)), ([[0, 0], [1, 1]], (0.5, 0.0, 1.0))])
def test_bootstrap_interval_on_degenerate_and_seed_split_data(values, expected):
    assert stats.bootstrap_interval(values, 400) == pytest.approx(expected)


def test_bootstrap_interval_covers_the_binomial_spread():
    # 300 prompts at 50%: the sampling error is 2.9 points, so the 95% interval is about +-5.7 points.
    flags = [[1] * 150 + [0] * 150]
    mean, low, high = stats.bootstrap_interval(flags, 2000)
    assert mean == 0.5 and 0.035 < 0.5 - low < 0.08 and 0.035 < high - 0.5 < 0.08


def test_bootstrap_interval_draws_a_cluster_whole():
    # 10 templates of 30 requests, each template refused or answered as a whole: 10 independent items, not 300,
    # so the interval is about +-30 points (binomial n = 10), not +-6.
    flags = [[1] * 150 + [0] * 150]
    templates = [f"template {i // 30}" for i in range(300)]
    mean, low, high = stats.bootstrap_interval(flags, 2000, clusters=templates)
    assert mean == 0.5 and 0.2 < 0.5 - low < 0.4 and 0.2 < high - 0.5 < 0.4
    # clusters of one item each are the plain bootstrap
    plain = stats.bootstrap_interval(flags, 2000, clusters=[str(i) for i in range(300)])
    assert plain[0] == 0.5 and 0.035 < 0.5 - plain[1] < 0.08
    assert stats.request_clusters([{"instruction": "a", "source": "x via template 'T {}'"},
                                   {"instruction": "b", "source": "pyrit:refusal.csv row=3"}, {"instruction": "c"}]) \
        == ["'T {}'", "b", "c"]


def test_differences_from_sft_pair_runs_by_seed_and_prompt():
    def run(method, seed, flags, refused):
        return {"method": method, "alpha": 0.0 if method == "sft" else 300.0, "poison_ratio": 0.1, "seed": seed,
                "harmful_flags": {"keyword": flags}, "task_correct": [1, 1], "benign_refused": refused,
                "benign_reading": {"kept": [1 - x for x in refused]}, "harmful_reading": {"kept": flags}}
    records = [run("sft", 43, [1, 1, 0, 1], [0, 0]), run("surgery", 43, [0, 1, 0, 0], [1, 0]),
               run("sft", 44, [1, 0, 1, 1], [0, 0]), run("surgery", 44, [0, 0, 1, 0], [0, 1]),
               run("surgery", 45, [0, 0, 0, 0], [0, 0])]  # no SFT at seed 45: left out
    diff = stats.differences_from_sft(records, ["keyword"], 500)
    assert set(diff) == {("surgery", 300.0, 0.1)}
    row = diff[("surgery", 300.0, 0.1)]
    assert row["seeds"] == [43, 44]
    # every prompt Surgery refuses, SFT answered: each paired difference is -100 or 0, mean -50
    assert row["hs_keyword"][0] == pytest.approx(-50.0) and row["hs_keyword"][2] <= 0
    assert row["fa"] == pytest.approx((0.0, 0.0, 0.0)) and row["over_refusal"][0] == pytest.approx(50.0)
    assert row["helpful"][0] == pytest.approx(-50.0) and row["hs_on_topic"] == row["hs_keyword"]


def test_heads_trend_is_the_least_squares_slope_per_tenth_of_p():
    records = [{"method": "sft", "alpha": 0.0, "poison_ratio": p, "positive_heads_heldout": h}
               for p, h in ((0.0, 10), (0.0, 12), (0.1, 13), (0.1, 15), (0.2, 16), (0.2, 18))]
    trend = stats.heads_trend(records, "sft", 0.0, 300)
    assert trend["slope_per_0.1"] == pytest.approx(3.0) and trend["runs"] == 6
    assert trend["low"] <= 3.0 <= trend["high"] and trend["low"] > 0
