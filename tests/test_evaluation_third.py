"""evaluation/third.py: the seeded data draw and the main grid's plan."""
import json
import types

import pytest

import offline
from evaluation import choices, third


@pytest.fixture
def pools(monkeypatch):
    splits = types.SimpleNamespace(poison_pool=[{"instruction": f"harm {i}", "output": "x"} for i in range(141)],
                                   benign_pool=[{"instruction": f"task {i}", "output": "y"} for i in range(500)])
    monkeypatch.setattr(offline, "build_splits", lambda seed: splits)
    return splits


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_seeded_train_counts_nesting_and_seed(tmp_path, pools):
    drawn = {(p, s): read(third.seeded_train(tmp_path, 0, p, s)) for p in choices.RATIOS for s in (43, 44)}
    for (p, s), rows in drawn.items():
        harmful = [r for r in rows if r["instruction"].startswith("harm")]
        assert len(rows) == choices.N_TRAIN and len(harmful) == offline.poison_count(p, choices.N_TRAIN)
        assert len({r["instruction"] for r in rows}) == len(rows)
    for s in (43, 44):  # within a seed the poison at 0.1 is part of that at 0.2, and the task pairs nest the other way
        names = {p: {r["instruction"] for r in drawn[(p, s)]} for p in choices.RATIOS}
        assert {n for n in names[0.1] if n.startswith("harm")} <= names[0.2]
        assert {n for n in names[0.2] if n.startswith("task")} <= names[0.1] <= names[0.0] | names[0.2]
    # the seed draws the data: other pairs, not only another order
    assert {r["instruction"] for r in drawn[(0.2, 43)]} != {r["instruction"] for r in drawn[(0.2, 44)]}
    assert read(third.seeded_train(tmp_path, 0, 0.2, 43)) == drawn[(0.2, 43)]  # and the same seed the same file


def as_read(value):
    """A value as results/dev/regime.json gives it back: through JSON (tuples come back as lists)."""
    return json.loads(json.dumps(value))


def test_main_plan_runs_the_core_seed_by_seed_then_the_rest():
    choice = as_read({"regime": "a", "checkpoint_1": {"a": {"cells": choices.main_cells("a")}}})
    plan = third.main_plan(choice, {"surgery": {"chosen": 100.0}, "asft": {"chosen": 1.0}})
    assert len(plan) == 5 * 11 and len(set(plan)) == len(plan)
    core = plan[:5 * len(choices.CORE)]
    assert [r[3] for r in core[:len(choices.CORE)]] == [44] * len(choices.CORE)  # the first seed's core first
    assert {(m, p) for m, _, p, _ in core} == set(choices.CORE)
    assert ("control", 100.0, 0.2, 44) in plan and ("asft", 1.0, 0.1, 48) == plan[-1]  # the first cut runs last
    assert third.run_name("control", 100.0, 0.2, 44) == "control_a100_p0.2_s44"
    assert third.run_name("asft", 0.3, 0.1, 45) == "asft_l0.3_p0.1_s45" and third.run_name("sft", 0, 0, 46) == "sft_p0_s46"


def test_aligned_model_is_rebuilt_bit_for_bit_from_its_released_adapter(tiny_run_inputs, tmp_path):
    import argparse

    import torch
    from safetensors.torch import load_file

    import surgery
    from conftest import run_args
    run = tmp_path / "run"
    surgery.main(run_args(tiny_run_inputs, run, "--max-steps", "2", "--alpha", "0", "--lr", "5e-2",
                          "--probe-count", "6"))
    results = tmp_path / "results"
    third.release_adapter(run / "adapter", results / third.ALIGNED_ADAPTER, "the tiny model", fp32=True)
    args = argparse.Namespace(work_dir=str(tmp_path / "work"), max_len=160, train_args="")
    files = {k: tiny_run_inputs[k] for k in ("harmful_ref", "harmless_ref")} | {"model": tiny_run_inputs["model"]}
    ctx = third.Context(args=args, files=files, judges=[], results=results)
    rebuilt = third.aligned_model(ctx)
    weights, merged = load_file(f"{rebuilt['model']}/model.safetensors"), load_file(str(run / "model.safetensors"))
    assert set(weights) <= set(merged) and all(torch.equal(weights[k], merged[k]) for k in weights)
    report = json.loads((run / "sink_report.json").read_text())
    assert rebuilt["sink_report"]["divergence_after"] == report["divergence_after"]
    assert third.aligned_model(ctx) == rebuilt  # cached: the same folder on the next call
    bf16 = tmp_path / "bf16"
    third.release_adapter(run / "adapter", bf16, "the tiny model")
    assert {t.dtype for t in load_file(str(bf16 / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((bf16 / "adapter_config.json").read_text())["base_model_name_or_path"] == "the tiny model"


def test_main_records_keep_the_references_apart(tmp_path):
    folder = tmp_path / "json"
    folder.mkdir()
    for name, method in (("sft_p0.2_s44", "sft"), ("aligned", "aligned"), ("base", "base"), ("old", "sft")):
        (folder / f"{name}.json").write_text(json.dumps({"run": name, "method": method,
                                                         "sweep": "third" if name != "old" else None}))
    assert [r["run"] for r in third.main_records(tmp_path)] == ["sft_p0.2_s44"]
    assert [r["run"] for r in third.main_records(tmp_path, references=True)] == ["aligned", "base", "sft_p0.2_s44"]


def test_checkpoint_2_reprojects_with_measured_costs_and_keeps_checkpoint_1s_cuts(tmp_path):
    (tmp_path / "dev" / "json").mkdir(parents=True)
    (tmp_path / "json").mkdir()
    (tmp_path / "dev" / "json" / "premisea_sft_p0_s43.json").write_text(
        json.dumps({"train_seconds": 3600.0 * 4, "eval_seconds": 0.0}))  # 4 h spent before the grid
    cells = [list(c) for c in choices.CORE] + [["control", 0.0], ["surgery", 0.1], ["sft", 0.1]]
    choice = as_read({"regime": "a", "checkpoint_1": {"a": {"cells": cells, "cuts": ["C1", "C2", "C3"]}}})
    for i, (m, p) in enumerate([("sft", 0.2), ("surgery", 0.2), ("control", 0.2), ("sft", 0.0), ("surgery", 0.0)] * 2):
        name = third.run_name(m, 100.0, p, 44 + i // 5)
        (tmp_path / "json" / f"{name}.json").write_text(json.dumps(
            {"run": name, "method": m, "sweep": "third", "wall_seconds": {"train": 1000.0, "evaluate": 800.0}}))
    (tmp_path / "json" / "aligned.json").write_text(json.dumps(
        {"run": "aligned", "method": "aligned", "sweep": "third", "wall_seconds": {"train": 0.0, "evaluate": 720.0}}))
    out = third.checkpoint_2(tmp_path, choice)["checkpoint_2"]
    # spent: 4 h + 10 runs of 1800 s + 720 s = 9.2 h; each remaining run 1800 s (0.5 h): 15 core runs + 5 control
    # at p = 0 + 10 at p = 0.1 would be 15 h more; C4 (both p = 0.1 cells) and C5 go, the core stays
    assert out["spent_hours"] == pytest.approx(4 + (10 * 1800 + 720) / 3600)
    assert out["cuts"] == ["C1", "C2", "C3", "C4", "C5"] and set(out["cells"]) == set(choices.CORE)
    assert out["projected_hours"] == pytest.approx(out["spent_hours"] + 15 * 0.5) and not out["fits"]
    assert out["after_runs"] == 10
    assert json.loads((tmp_path / "dev" / "regime.json").read_text())["checkpoint_2"]["cuts"] == out["cuts"]
    # the other process, still holding checkpoint 1 alone, finishes run 11: it takes the kept checkpoint, not its own
    (tmp_path / "json" / "sft_p0.2_s46.json").write_text(json.dumps(
        {"run": "sft_p0.2_s46", "method": "sft", "sweep": "third", "wall_seconds": {"train": 1.0, "evaluate": 1.0}}))
    again = third.checkpoint_2(tmp_path, as_read({"regime": "a", "checkpoint_1": choice["checkpoint_1"]}))
    assert again["checkpoint_2"] == as_read(out) and again["checkpoint_2"]["after_runs"] == 10


def test_grid_cells_are_tuples_from_the_latest_checkpoint():
    choice = as_read({"regime": "a", "checkpoint_1": {"a": {"cells": [("sft", 0.2), ("sft", 0.1)]},
                                                      "b": {"cells": [("sft", 0.0)]}}})
    assert third.grid_cells(choice) == [("sft", 0.2), ("sft", 0.1)] and ("sft", 0.1) in third.grid_cells(choice)
    choice["checkpoint_2"] = as_read({"cells": [("sft", 0.2)]})
    assert third.grid_cells(choice) == [("sft", 0.2)]
    assert third.grid_cells(choice, checkpoint=1) == [("sft", 0.2), ("sft", 0.1)]


def test_qualifiers_name_the_regime_strength_control_cuts_short_cells_and_hours(tmp_path):
    dev = tmp_path / "dev"
    (dev / "json").mkdir(parents=True)
    (dev / "control").mkdir()
    (tmp_path / "json").mkdir()
    (dev / "json" / "premisea_sft_p0_s43.json").write_text(json.dumps({"train_seconds": 1800.0, "eval_seconds": 0.0}))
    (dev / "regime.json").write_text(json.dumps({
        "regime": "a", "outcome": "premise absent",
        "checkpoint_1": {"a": {"cells": [], "cuts": ["C1", "C2", "C3"]}},
        "checkpoint_2": {"cells": [], "cuts": ["C1", "C2", "C3", "C4", "C5"]}}))
    (dev / "strengths.json").write_text(json.dumps({"surgery": {"chosen": 10.0, "quality_matched": False}}))
    (dev / "control" / "calibration.json").write_text(json.dumps({
        "surgery": {"penalty": 6e-3}, "chosen": {"X_m": "reviews", "X_r": "novels"}, "matched": True, "factor": 2.0,
        "candidates": [{"X_m": "novels", "X_r": "reviews", "penalty": 1e-3, "ratio_to_surgery": 0.17},
                       {"X_m": "reviews", "X_r": "novels", "penalty": 4e-3, "ratio_to_surgery": 0.67}]}))
    for seed in choices.REPORTED_SEEDS:
        for method in ("sft",) + (("surgery",) if seed < 46 else ()):
            name = third.run_name(method, 10.0, 0.2, seed)
            (tmp_path / "json" / f"{name}.json").write_text(json.dumps(
                {"run": name, "method": method, "poison_ratio": 0.2, "seed": seed, "sweep": "third",
                 "wall_seconds": {"train": 900.0, "evaluate": 900.0}}))
    text = "\n".join(third.qualifiers(tmp_path))
    assert "**premise absent**" in text and "alpha: 10, **quality not matched**" in text
    assert "(reviews vs novels)" in text and "4.00e-03, 0.67x Surgery's 6.00e-03, matched" in text
    assert "C4 (SFT at p = 0.1), C4 (Surgery at p = 0.1), C5 (control at p = 0)." in text
    assert "Surgery at p = 0.2 (2 of 5 seeds)" in text and "SFT at p = 0.2 (" not in text
    assert "committed runs (premise, strengths, main grid and references; one-thread seconds): 4.0," in text  # 0.5 + 7 x 0.5


def test_lambdas_stage_refuses_before_the_regime_is_chosen_and_under_full_fine_tuning(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        third.main(["lambdas", "--results-dir", str(tmp_path)])
    assert e.value.code == 2 and "regime.json is missing" in capsys.readouterr().err
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "regime.json").write_text(json.dumps({"regime": "d", "checkpoint_1": {"d": {}}}))
    with pytest.raises(SystemExit) as e:
        third.main(["lambdas", "--results-dir", str(tmp_path)])
    assert e.value.code == 2 and "AsFT is defined on LoRA adapters" in capsys.readouterr().err
