"""results/labels/: sample 2 drawn from the third sweep's main grid (draw_sample.py --sample 2) and read against
its labels (agreement.py --sample 2), whose calibration the verdict's calibrated reading uses."""
import collections
import importlib.util
import json
from pathlib import Path

import pytest

from evaluation import agreement, verdict

LABELS = Path(__file__).resolve().parents[1] / "results" / "labels"
CELLS = [(m, p) for m in ("sft", "surgery", "control") for p in (0.0, 0.1, 0.2)] + [("asft", 0.1), ("asft", 0.2)]
SEEDS = (44, 45, 46, 47, 48)


def script(name):
    spec = importlib.util.spec_from_file_location(name, LABELS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CUT_CELLS = [("sft", 0.0), ("surgery", 0.0), ("sft", 0.2), ("surgery", 0.2), ("control", 0.2)]  # the core


def third_sweep(cells=CELLS):
    """Run JSONs of a main grid of these cells plus the two references; answers name their run and index."""
    runs = {}
    for m, p in [("aligned", None), ("base", None)] + cells:
        for s in ([None] if p is None else SEEDS):
            name = m if p is None else f"{m}_p{p:g}_s{s}"
            runs[name] = {"method": m, "poison_ratio": p, "seed": s, "sweep": "third",
                          "harmful_answers": [f"{name} h{i}" for i in range(300)],
                          "benign_answers": [f"{name} b{i}" for i in range(160)],
                          "harmful_categories": ["refusal", "harmful", "harmless", "broken"] * 75,
                          "benign_categories": ["helpful", "helpful", "refusal", "broken"] * 40,
                          "harmful_flags": {"keyword": [i % 4 != 0 for i in range(300)],
                                            "embedding": [i % 4 == 1 for i in range(300)]}}
    return runs


@pytest.mark.parametrize("cells, per_stratum, harmful_turns, benign_turns", [
    (CELLS, (23, 8), [4, 4, 5, 5, 5], [1, 1, 2, 2, 2]),  # nothing cut: 13 strata, 403 answers
    (CUT_CELLS, (42, 16), [8, 8, 8, 9, 9], [3, 3, 3, 3, 4]),  # only the core: 7 strata, 406 answers
])
def test_sample_2_has_at_least_400_answers_with_the_seeds_taking_turns(cells, per_stratum, harmful_turns,
                                                                       benign_turns):
    draw = script("draw_sample")
    runs = third_sweep(cells)
    groups = draw.strata(runs)
    assert len(groups) == len(cells) + 2 and list(groups)[:2] == [("base", None), ("aligned", None)]
    assert draw.sized(len(groups)) == per_stratum
    items = draw.draw(groups, runs, draw.SAMPLES[2]["salt"], per_stratum)
    n = len(groups) * sum(per_stratum)
    assert len(items) == n >= 400 and len({i["id"] for i in items}) == n
    per = collections.Counter((runs[i["run"]]["method"], runs[i["run"]]["poison_ratio"], i["kind"]) for i in items)
    assert set(per.values()) == set(per_stratum) and len(per) == 2 * len(groups)
    for (m, p) in cells:  # the five seeds share each stratum's answers in turn
        runs_of = collections.Counter((i["run"], i["kind"]) for i in items if i["run"].startswith(f"{m}_p{p:g}_"))
        assert sorted(runs_of[(f"{m}_p{p:g}_s{s}", "harmful")] for s in SEEDS) == harmful_turns
        assert sorted(runs_of[(f"{m}_p{p:g}_s{s}", "benign")] for s in SEEDS) == benign_turns
    for kind in ("harmful", "benign"):  # no prompt or request is drawn twice
        indices = [i["index"] for i in items if i["kind"] == kind]
        assert len(set(indices)) == len(indices)
    again = draw.draw(groups, runs, draw.SAMPLES[2]["salt"], per_stratum)
    assert again == items
    second = draw.second_annotator(items, draw.SAMPLES[2]["salt"], 60)
    assert len(second) == 60 and len({i["id"] for i in second}) == 60 and second != items[:60]


def test_agreement_on_sample_2_writes_the_calibration_the_verdict_reads(tmp_path, capsys):
    draw, ag = script("draw_sample"), script("agreement")
    runs = third_sweep()
    folder, runs_dir = tmp_path / "sample2", tmp_path / "json"
    folder.mkdir()
    runs_dir.mkdir()
    for name, run in runs.items():
        (runs_dir / f"{name}.json").write_text(json.dumps(run))
    items = draw.draw(draw.strata(runs), runs, "labels-v2", (18, 6))
    draw.write_jsonl(folder / "sample_key.jsonl", [{k: i[k] for k in ("id", "run", "kind", "index")} for i in items])
    # labels: the automatic category, except Surgery's automatic "harmful" which the labeller calls broken
    labels = []
    for i in items:
        auto = runs[i["run"]][f"{i['kind']}_categories"][i["index"]]
        wrong = runs[i["run"]]["method"] == "surgery" and auto == "harmful"
        labels.append({"id": i["id"], "label": "broken" if wrong else auto, "note": ""})
    draw.write_jsonl(folder / "labels.jsonl", labels)
    draw.write_jsonl(folder / "labels_second.jsonl", labels[:60])
    ag.sample_2(folder, runs_dir)
    text = capsys.readouterr().out
    assert "| harmful vs not (answers to harmful prompts) | 234 |" in text and "Inter-rater agreement, 60 answers" in text
    saved = json.loads((folder / "calibration.json").read_text())
    assert saved["labelled"] == 312 and saved["inter_rater"]["all"] == pytest.approx(1.0)
    assert not saved["targets"]["harmful"]["met"] or saved["targets"]["harmful"]["kappa"] >= 0.8
    surgery_hs = saved["calibration"]["hs"]["Surgery"]
    # Surgery's labelled-harmful answers: none (all called broken), so its own Se is undefined: pooled
    assert surgery_hs["pooled"] and surgery_hs["own_n_in"] == 0
    assert saved["calibration"]["hs"]["SFT"]["se"] == 1.0 and saved["calibration"]["hs"]["SFT"]["sp"] == 1.0
    record = dict(runs["surgery_p0.2_s44"], task_correct=[1] * 10, divergence_heldout=[[0.0]])
    m = verdict.run_metrics(record, saved["calibration"])
    pooled = saved["calibration"]["hs"]["pooled"]
    assert m["hs"] == verdict.corrected_share(25.0, pooled["se"], pooled["sp"])
    assert agreement.FAMILIES["control"] == "control"


def test_stratum_table_gives_label_shares_with_wilson_intervals_beside_the_automatic_shares(capsys):
    ag = script("agreement")
    found = [("sft", 0.2, "refusal", "refusal")] * 3 + [("sft", 0.2, "broken", "harmful"), ("aligned", None, "harmful",
                                                                                            "harmful")]
    ag.stratum_table(found, "harmful")
    lines = capsys.readouterr().out.splitlines()
    # 3 of 4: Wilson [0.30, 0.95] by hand (centre 0.6275, half-width 0.3269); 1 of 4 labelled broken, 0 called broken
    assert "| sft | 0.2 | 4 | 75% [30, 95] / 75% | 0% [0, 49] / 25% | 0% [0, 49] / 0% | 25% [5, 70] / 0% |" in lines
    assert lines.index("| aligned | - | 1 | 0% [0, 79] / 0% | 100% [21, 100] / 100% | 0% [0, 79] / 0% | "
                       "0% [0, 79] / 0% |") < lines.index(next(x for x in lines if x.startswith("| sft |")))
