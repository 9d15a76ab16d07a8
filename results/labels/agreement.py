#!/usr/bin/env python3
"""How far each automatic reading of the answers agrees with the blind labels (labels.jsonl, RUBRIC.md).

    python results/labels/agreement.py            # prints the tables (markdown) that results/labels/README.md quotes

Joins labels.jsonl to sample_key.jsonl, then reads each labelled answer's automatic verdicts from its run JSON:
the keyword and embedding judges' harmful flags (`harmful_flags`, the second sweep's HS) and the keyword refusal
flag of benign answers (`benign_refused`). Run JSONs that carry per-answer categories (`harmful_categories`,
`benign_categories`: issue 18's reading) are compared category by category as well. Standard library only.
"""
import collections
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "json"
CATEGORIES = {"harmful": ("refusal", "harmful", "harmless", "broken"), "benign": ("helpful", "refusal", "broken")}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cohen_kappa(pairs):
    """Cohen's kappa of (automatic, label) pairs: agreement beyond what the two marginals give by chance."""
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    auto, human = collections.Counter(a for a, _ in pairs), collections.Counter(b for _, b in pairs)
    expected = sum(auto[k] * human[k] for k in set(auto) | set(human)) / n ** 2
    return float("nan") if expected == 1 else (observed - expected) / (1 - expected)


def binary_row(name, pairs):
    """A line of the binary table: n, accuracy, kappa, and the two error counts."""
    n = len(pairs)
    accuracy = 100 * sum(a == b for a, b in pairs) / n
    false_pos = sum(a and not b for a, b in pairs)
    false_neg = sum(b and not a for a, b in pairs)
    return f"| {name} | {n} | {accuracy:.1f}% | {cohen_kappa(pairs):.2f} | {false_pos} | {false_neg} |"


def confusion(kind, pairs):
    names = CATEGORIES[kind]
    counts = collections.Counter(pairs)
    lines = [f"| automatic \\ label | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {a} | {' | '.join(str(counts[a, b]) for b in names)} |" for a in names]
    return lines


def main():
    key = {row["id"]: row for row in read_jsonl(HERE / "sample_key.jsonl")}
    labels = read_jsonl(HERE / "labels.jsonl")
    runs = {}
    rows = []
    for label in labels:
        where = key[label["id"]]
        run = runs.setdefault(where["run"], json.loads((RUNS / f"{where['run']}.json").read_text()))
        rows.append((where, label["label"], run))

    print(f"{len(rows)} labelled answers: " + ", ".join(
        f"{kind} {label} {n}" for (kind, label), n in sorted(collections.Counter(
            (w["kind"], lab) for w, lab, _ in rows).items())))
    print("\nHarmful vs not harmful (answers to harmful prompts) and refusal vs not (benign requests):\n")
    print("| reading | n | accuracy | kappa | automatic yes, label no | label yes, automatic no |")
    print("|---|---|---|---|---|---|")
    harmful = [(w, lab, r) for w, lab, r in rows if w["kind"] == "harmful"]
    for judge in ("keyword", "embedding"):
        pairs = [(bool(r["harmful_flags"][judge][w["index"]]), lab == "harmful") for w, lab, r in harmful]
        print(binary_row(f"{judge} judge: harmful", pairs))
    # The keyword judge's "not harmful" is a refusal phrase: how often is that a label refusal?
    pairs = [(not r["harmful_flags"]["keyword"][w["index"]], lab == "refusal") for w, lab, r in harmful]
    print(binary_row("keyword judge: refusal phrase = refusal", pairs))
    benign = [(w, lab, r) for w, lab, r in rows if w["kind"] == "benign"]
    pairs = [(bool(r["benign_refused"][w["index"]]), lab == "refusal") for w, lab, r in benign]
    print(binary_row("keyword judge: benign refused", pairs))

    for kind in ("harmful", "benign"):
        field = f"{kind}_categories"
        scored = [(r[field][w["index"]], lab) for w, lab, r in rows if w["kind"] == kind and field in r]
        if not scored:
            print(f"\nNo run JSON carries `{field}` yet: the category reading is compared once it does.")
            continue
        print(f"\n{kind} answers, automatic category vs label ({len(scored)} answers; kappa "
              f"{cohen_kappa(scored):.2f}):\n")
        print("\n".join(confusion(kind, scored)))
        for target in ("harmful", "broken") if kind == "harmful" else ("broken",):
            print(binary_row(f"{target} vs not", [(a == target, b == target) for a, b in scored]))

    print("\nLabels by stratum (method, p): share of each label among the stratum's answers to harmful prompts\n")
    print("| method | p | n | " + " | ".join(CATEGORIES["harmful"]) + " |")
    print("|---|---|---|" + "---|" * len(CATEGORIES["harmful"]))
    strata = collections.defaultdict(list)
    for w, lab, r in harmful:
        strata[r["method"], r.get("poison_ratio")].append(lab)
    for (method, p), labs in sorted(strata.items(), key=lambda kv: (kv[0][0], kv[0][1] if kv[0][1] is not None
                                                                   else -1)):
        counts = collections.Counter(labs)
        print(f"| {method} | {'-' if p is None else p} | {len(labs)} | " +
              " | ".join(f"{100 * counts[c] / len(labs):.0f}%" for c in CATEGORIES["harmful"]) + " |")


if __name__ == "__main__":
    main()
