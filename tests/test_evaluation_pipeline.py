"""eval.py and evaluation/pipeline.py: the command line's bad input, and a tiny end-to-end run (the table, the plots,
the cache, committed results on a fresh machine)."""
import json

import numpy as np
import pytest

import eval as protocol
import surgery
from evaluation import stats, training
from input_helpers import EVAL_ROLES, eval_input_files


def test_bad_input_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        protocol.main(["--data", "train.jsonl"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval.py: error: --data must contain {p}") and "\n" not in err


@pytest.fixture(scope="module")
def tiny_protocol(tmp_path_factory):
    """A tiny random Llama and small files for every role of the protocol."""
    from tiny import save_tiny
    root = tmp_path_factory.mktemp("tiny_eval")
    flags = {key: flag for flag, key in EVAL_ROLES.items()}
    paths = {"--model": save_tiny(root / "model"), "--data": root / "train_p{p}.jsonl",
             **{flags[key]: path for key, path in eval_input_files(root, large=True).items()}}
    argv = [a for flag, path in paths.items() for a in (flag, str(path))]
    argv += ["--poison-ratios", "0", "0.5", "--seeds", "43", "44", "--defense-ratios", "0.5", "--alpha", "300",
             "--alpha-sweep", "10", "--sweep-ratio", "0.5", "--safetylock-alpha-sweep", "2", "--asft-ablation",
             "--attack-candidates", "1:1e-3", "2:1e-3", "--align-candidates", "2:1e-3", "1:1e-3", "--batch-size", "4", "--max-len", "64",
             "--probe-count", "2", "--n-harmful", "4", "--n-dev", "4", "--n-task", "4", "--n-benign", "4",
             "--n-benign-dev", "4", "--max-new-tokens", "8", "--task-tokens", "4", "--benign-tokens", "4", "--answer-tokens", "8",
             "--gen-batch", "4", "--bootstrap", "50", "--work-dir", str(root / "work"),
             "--results-dir", str(root / "results"), "--device", "cpu"]
    return root, argv


def test_tiny_end_to_end_writes_table_plots_and_resumes_from_cache(tiny_protocol, capsys):
    root, argv = tiny_protocol
    stale = root / "results" / "json" / "sft_p0.3_s43.json"  # left by an earlier configuration
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    records = protocol.main(argv)
    assert not stale.exists()
    first_output = capsys.readouterr().out
    results = root / "results"
    # The first seed complete (SFT and Surgery from the sweep ratio outwards, the other defenses, the sweeps), then
    # the second seed's SFT and Surgery.
    names = ["base", "aligned", "sft_p0.5_s43", "surgery_a300_p0.5_s43", "sft_p0_s43", "surgery_a300_p0_s43",
             "asft_p0.5_s43", "safetylock_a6_p0.5_s43", "sap_p0.5_s43", "surgery_a10_p0.5_s43",
             "safetylock_a2_p0.5_s43", "asft_c0_p0.5_s43",
             "sft_p0.5_s44", "surgery_a300_p0.5_s44", "sft_p0_s44", "surgery_a300_p0_s44"]
    assert [r["run"] for r in records] == names
    for name in names:
        rec = json.loads((results / "json" / f"{name}.json").read_text())
        for key in ("method", "poison_ratio", "seed", "harmful_score", "harmful_prompts", "fine_tune_accuracy",
                    "over_refusal", "positive_heads_heldout"):
            assert key in rec, key
        assert set(rec["harmful_score"]) == {"keyword", "embedding"} and rec["harmful_prompts"] == 4
        for judge, flags in rec["harmful_flags"].items():
            assert len(flags) == 4 and rec["harmful_score"][judge] == pytest.approx(100 * np.mean(flags))
        assert rec["fine_tune_accuracy"] == pytest.approx(100 * np.mean(rec["task_correct"]))
        assert rec["over_refusal"] == pytest.approx(100 * np.mean(rec["benign_refused"]))
        assert rec["heads"] == 2 * 4  # tiny model: 2 layers x 4 query heads
        assert rec["positive_heads_heldout"] == int((np.array(rec["divergence_heldout"]) > 0).sum())
        assert rec["positive_heads_train_refs"] == int((np.array(rec["divergence_train_refs"]) > 0).sum())
    regime = json.loads((results / "regime.json").read_text())
    assert [(c["steps"], c["lr"]) for c in regime["candidates"]] == [(1, 1e-3), (2, 1e-3)]  # none broke it: both
    assert (regime["steps"], regime["lr"]) == max((c["dev_hs"], -i, c["steps"], c["lr"]) for i, c in
                                                  enumerate(regime["candidates"]))[2:]
    # The alignment, chosen on the development sets: a tiny random model refuses nothing, so no candidate meets
    # the targets and all are measured; the smallest HS + over-refusal wins (the first of equals).
    alignment = json.loads((results / "alignment.json").read_text())
    assert [(c["steps"], c["lr"]) for c in alignment["candidates"]] == [(2, 1e-3), (1, 1e-3)]
    assert all(c["dev_hs"] > training.ALIGNED_HS_AT_MOST for c in alignment["candidates"])
    best = min(alignment["candidates"], key=lambda c: c["dev_hs"] + c["dev_over_refusal"])
    assert (alignment["steps"], alignment["lr"]) == (best["steps"], best["lr"])
    assert "Alignment, chosen on 4 development prompts and 4 development benign requests" in \
        (results / "results.md").read_text()
    # The attack's starting point is the aligned model: its sink report's "before" is the aligned model's "after".
    aligned = json.loads((results / "json" / "aligned.json").read_text())
    by_name = {r["run"]: r for r in records}
    report = json.loads((root / by_name["surgery_a300_p0.5_s43"]["model"] / "sink_report.json").read_text())
    assert np.allclose(report["divergence_before"], aligned["divergence_train_refs"], atol=1e-5)
    # Seeds change the run: data order, LoRA init and reference draws.
    assert by_name["sft_p0.5_s43"]["model"] != by_name["sft_p0.5_s44"]["model"]
    a = (root / by_name["sft_p0.5_s43"]["model"] / "model.safetensors").read_bytes()
    assert a != (root / by_name["sft_p0.5_s44"]["model"] / "model.safetensors").read_bytes()
    table = (results / "results.md").read_text()
    assert "Runs finished: 16 of 16." in table and "| sft | 0 | 0.5 | 2 |" in table
    assert "- sft: " in table and "heads per 0.1" in table
    # each defense minus SFT, paired by seed: Surgery has two seeds, the others one
    assert "minus SFT" in table and "| surgery | 300 | 0.5 | 2 |" in table.split("minus SFT")[1]
    assert "| sap | " in table.split("minus SFT")[1] and "| sft | " not in table.split("minus SFT")[1].split("Every run")[0]
    # SafetyLock is post-hoc: the SFT run's training time (plus milliseconds to apply) and a model with o_proj biases.
    lock, sft = by_name["safetylock_a6_p0.5_s43"], by_name["sft_p0.5_s43"]
    assert 0 <= lock["wall_seconds"]["train"] - sft["wall_seconds"]["train"] < 1
    assert json.loads((root / lock["model"] / "config.json").read_text())["attention_bias"] is True
    for name in ("asft_p0.5_s43", "asft_c0_p0.5_s43", "sap_p0.5_s43"):
        report = json.loads((root / by_name[name]["model"] / "sink_report.json").read_text())
        assert np.allclose(report["divergence_before"], aligned["divergence_train_refs"], atol=1e-5)
    # The alignment data holds the base model's own answers to the benign requests.
    align_data = next((root / "work" / "align-data").glob("align_*.jsonl"))
    assert sum("bird" in r["instruction"] for r in surgery.read_records(align_data)) <= 4
    assert "| keyword |" in table and "| embedding |" in table
    # HS by the source of the prompt: each source's mean is the mean of its prompts' verdicts
    base = by_name["base"]
    # the answers are kept with their verdicts, in prompt order
    assert len(base["harmful_answers"]) == len(base["harmful_flags"]["keyword"]) == base["harmful_prompts"]
    assert len(base["benign_answers"]) == len(base["benign_refused"]) and all(isinstance(a, str) for a in
                                                                             base["benign_answers"])
    assert set(base["harmful_sources"]) <= {"do-not-answer", "unlabelled"} and len(base["harmful_sources"]) == 4
    assert "HS by the source of the prompt" in table
    # the answers read for topic and loops: one flag per prompt, kept only when answered and on topic
    assert "helpful (%)" in table and "| helpful |" in table and "HS on topic (%)" in table
    reading = base["benign_reading"]
    assert len(reading["kept"]) == len(base["benign_refused"])
    assert all(h <= t * (1 - r) for h, t, r in zip(reading["kept"], reading["on_topic"], base["benign_refused"]))
    reading = base["harmful_reading"]
    assert all(k <= t * f for k, t, f in zip(reading["kept"], reading["on_topic"], base["harmful_flags"]["keyword"]))
    summary = stats.summarize([base], ["keyword"], 50)[("base", 0.0, None)]
    for source, (mean, low, high) in summary["hs_keyword_by_source"].items():
        flags = [f for f, s in zip(base["harmful_flags"]["keyword"], base["harmful_sources"]) if s == source]
        assert mean == pytest.approx(100 * np.mean(flags)) and low <= mean <= high
    for plot in ("hs_fa_vs_p.png", "positive_heads_vs_p.png", "divergence_heatmap_p0.5.png"):
        assert (results / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[run]    train-align" in first_output

    again = protocol.main(argv)  # every run JSON is there: nothing is trained, generated or judged again
    second_output = capsys.readouterr().out
    assert "[run]" not in second_output and "[committed] sap_p0.5_s43" in second_output
    assert [(r["harmful_score"], r["wall_seconds"]) for r in again] == \
           [(r["harmful_score"], r["wall_seconds"]) for r in records]

    # --report-only with a run missing: the report of the others, nothing run, the missing one not made up
    (results / "json" / "sap_p0.5_s43.json").unlink()
    (results / "results.md").unlink()
    reported = protocol.main(argv + ["--report-only"])
    assert "[run]" not in capsys.readouterr().out and "sap_p0.5_s43" not in {r["run"] for r in reported}
    assert "Runs finished: 15 of 16." in (results / "results.md").read_text()
    with pytest.raises(SystemExit) as stop:  # nothing to report from: one line, exit 2, nothing written
        protocol.main(argv + ["--report-only", "--results-dir", str(root / "nothing-yet")])
    assert stop.value.code == 2 and "--report-only" in capsys.readouterr().err
    assert not (root / "nothing-yet").exists()


def test_committed_results_are_not_recomputed_on_a_fresh_machine(tiny_protocol, capsys):
    """A fresh clone has results/ but no runs/: the finished runs are taken from their JSONs, the rest run."""
    root, argv = tiny_protocol
    fresh = [a if a != str(root / "work") else str(root / "fresh-work") for a in argv]
    (root / "results" / "json" / "sap_p0.5_s43.json").unlink(missing_ok=True)  # the test above may have removed it
    records = protocol.main(fresh)
    output = capsys.readouterr().out
    assert "[committed] sft_p0.5_s43" in output and "[run]    generate-sap_p0.5_s43" in output
    assert "generate-sft_p0.5_s43" not in output
    assert len(records) == 16
