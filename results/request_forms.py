#!/usr/bin/env python3
"""The forms of the requests that the alignment learns from and is measured on. The 135M model learns the form of a
request before its content, so a form that only refused requests take (questions, in v1-v2; opening words such as
"Develop" or "Provide", in v1-v4) is learned as a reason to refuse.

    python results/request_forms.py [--seed 0]

Prints the share of questions in each split, then for the alignment's refused and benign requests: how often each
frequent opening word opens each, and how well the opening word alone predicts refusal (the majority label of each
word; chance is the larger class's share). "v4" is align_benign's first 1024 requests, as the v4 alignment had them.
"""
import argparse
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import offline  # noqa: E402

QUESTION = re.compile(r"(how|what|where|why|who|which|when|can|could|is|are|do|does|should|would|will)\b")
V4_BENIGN = 1024


def is_question(text):
    """Ends with a question mark, or opens with a question word."""
    text = text.strip()
    return text.endswith("?") or QUESTION.match(text.lower()) is not None


def opening_word_accuracy(refused, benign):
    """(accuracy, chance): predicting refusal from the opening word alone, by each word's majority."""
    r, b = Counter(map(offline.opening_word, refused)), Counter(map(offline.opening_word, benign))
    correct = sum(max(r[w], b[w]) for w in set(r) | set(b))
    total = len(refused) + len(benign)
    return correct / total, max(len(refused), len(benign)) / total


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the offline splits")
    args = p.parse_args()
    splits = offline.build_splits(args.seed)
    refused = [r["instruction"] for r in splits.align if r["output"] not in offline.LABELS]
    benign = {"v4": [r["instruction"] for r in splits.align_benign[:V4_BENIGN]],
              "now": [r["instruction"] for r in splits.align_benign]}
    sets = {"align: refusals": refused, "align: benign requests": benign["now"],
            "eval_harmful (HS)": [r["instruction"] for r in splits.eval_harmful],
            "eval_benign (over-refusal)": [r["instruction"] for r in splits.eval_benign]}
    for name, texts in sets.items():
        questions = sum(map(is_question, texts))
        print(f"{name:<28} {questions:4d} questions of {len(texts):4d} ({100 * questions / len(texts):.0f}%)")

    counts = {"refused": Counter(map(offline.opening_word, refused))}
    counts.update({k: Counter(map(offline.opening_word, v)) for k, v in benign.items()})
    print(f"\nopening words of >= {offline.FORM_MIN_REFUSALS} refused alignment requests: refused / benign (v4) / "
          f"benign (now)")
    for word, n in counts["refused"].most_common():
        if n >= offline.FORM_MIN_REFUSALS:
            print(f"  {word:<10} {n:4d} {counts['v4'][word]:6d} {counts['now'][word]:6d}")
    for name, texts in benign.items():
        accuracy, chance = opening_word_accuracy(refused, texts)
        print(f"refusal predicted from the opening word alone, benign {name:<3}: {100 * accuracy:.1f}% "
              f"(chance {100 * chance:.1f}%)")


if __name__ == "__main__":
    main()
