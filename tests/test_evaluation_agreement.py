"""evaluation/agreement.py: kappa and its bootstrap interval, the targets, and the per-family Se and Sp."""
import json
import math

import pytest

from evaluation import agreement


def test_cohen_kappa_of_a_known_table():
    # 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no: observed 0.7, chance 0.5 -> kappa 0.4
    pairs = [(1, 1)] * 20 + [(1, 0)] * 5 + [(0, 1)] * 10 + [(0, 0)] * 15
    assert agreement.cohen_kappa(pairs) == pytest.approx(0.4)
    assert agreement.cohen_kappa([(1, 1)] * 5) != agreement.cohen_kappa([(1, 1)] * 5)  # nan: one category only
    kappa, low, high = agreement.kappa_ci(pairs)
    assert low < kappa < high and 0.1 < low and high < 0.7
    assert agreement.kappa_ci(pairs) == (kappa, low, high)  # seeded


def row(method, kind, label, auto, i=0):
    return {"id": f"x{i}", "method": method, "kind": kind, "label": label, "auto": auto, "index": i}


def test_calibration_uses_a_family_s_own_rates_only_with_enough_labels():
    rows = []
    # Surgery: 12 labelled harmful (9 read harmful), 20 not (18 read not harmful)
    rows += [row("surgery", "harmful", "harmful", "harmful")] * 9 + [row("surgery", "harmful", "harmful", "broken")] * 3
    rows += [row("surgery", "harmful", "broken", "broken")] * 18 + [row("surgery", "harmful", "refusal", "harmful")] * 2
    # SFT: 4 labelled harmful only, all read harmful; 20 not, all read refusal
    rows += [row("sft", "harmful", "harmful", "harmful")] * 4 + [row("sft", "harmful", "refusal", "refusal")] * 20
    cal = agreement.calibration(rows)
    assert cal["hs"]["Surgery"]["se"] == pytest.approx(9 / 12) and cal["hs"]["Surgery"]["sp"] == pytest.approx(18 / 20)
    assert not cal["hs"]["Surgery"]["pooled"]
    assert cal["hs"]["SFT"]["pooled"] and cal["hs"]["SFT"]["se"] == pytest.approx(13 / 16)
    assert cal["hs"]["SFT"]["sp"] == pytest.approx(38 / 40) and cal["hs"]["SFT"]["own_n_in"] == 4
    low, high = cal["hs"]["Surgery"]["se_ci"]
    assert low < 0.75 < high
    assert math.isnan(cal["helpful"]["pooled"]["se"])  # no benign answer labelled


def test_targets_pool_broken_over_both_kinds():
    rows = [row("sft", "harmful", "harmful", "harmful")] * 30 + [row("sft", "harmful", "refusal", "refusal")] * 30
    rows += [row("sft", "benign", "broken", "broken")] * 20 + [row("sft", "benign", "helpful", "helpful")] * 19
    rows += [row("sft", "benign", "helpful", "broken")]
    out = agreement.targets(rows)
    assert out["harmful"]["kappa"] == pytest.approx(1.0) and out["harmful"]["met"]
    assert out["broken"]["n"] == 100 and 0.8 < out["broken"]["kappa"] < 1.0 and out["met"]
    rows += [row("sft", "harmful", "broken", "refusal")] * 15
    assert not agreement.targets(rows)["broken"]["met"] and not agreement.targets(rows)["met"]


def test_inter_rater_kappa_on_the_answers_both_labelled():
    first = {"a1": "harmful", "a2": "refusal", "a3": "broken", "a4": "helpful", "a9": "broken"}
    second = {"a1": "harmful", "a2": "refusal", "a3": "harmful", "a4": "helpful"}
    out = agreement.inter_rater(first, second)
    assert out["n"] == 4 and out["all"] == pytest.approx(agreement.cohen_kappa(
        [("harmful", "harmful"), ("refusal", "refusal"), ("broken", "harmful"), ("helpful", "helpful")]))


def test_joined_reads_each_label_s_answer_from_its_run(tmp_path):
    sample, runs = tmp_path / "sample", tmp_path / "json"
    sample.mkdir()
    runs.mkdir()
    (runs / "sft_p0.2_s44.json").write_text(json.dumps({
        "method": "sft", "harmful_categories": ["refusal", "harmful"], "benign_categories": ["helpful"],
        "harmful_flags": {"keyword": [0, 1], "embedding": [0, 0]}}))
    (sample / "sample_key.jsonl").write_text(
        '{"id": "a001", "run": "sft_p0.2_s44", "kind": "harmful", "index": 1}\n'
        '{"id": "a002", "run": "sft_p0.2_s44", "kind": "benign", "index": 0}\n')
    (sample / "labels.jsonl").write_text('{"id": "a002", "label": "broken"}\n{"id": "a001", "label": "harmful"}\n')
    rows = agreement.joined(sample, runs)
    assert [(r["id"], r["label"], r["auto"]) for r in rows] == [("a002", "broken", "helpful"),
                                                                 ("a001", "harmful", "harmful")]
    assert rows[1]["judges"] == {"keyword": True, "embedding": False} and rows[0]["judges"] == {}
