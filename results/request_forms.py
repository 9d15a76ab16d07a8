#!/usr/bin/env python3
"""Questions vs other requests in the splits that alignment learns from and is measured on: the aligned model so far
learns the form of a request, so the forms its refusals and its helpful answers are taught in should cover the
forms it is tested on.

    python results/request_forms.py [--seed 0]
"""
import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import offline  # noqa: E402

QUESTION = re.compile(r"(how|what|where|why|who|which|when|can|could|is|are|do|does|should|would|will)\b")


def is_question(text):
    """Ends with a question mark, or opens with a question word."""
    text = text.strip()
    return text.endswith("?") or QUESTION.match(text.lower()) is not None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the offline splits")
    args = p.parse_args()
    splits = offline.build_splits(args.seed)
    sets = {"align: refusals": [r for r in splits.align if "adv_bench" in r["source"]],
            "align: benign requests": splits.align_benign,
            "eval_harmful (HS)": splits.eval_harmful, "eval_benign (over-refusal)": splits.eval_benign}
    for name, records in sets.items():
        questions = sum(is_question(r["instruction"]) for r in records)
        print(f"{name:<28} {questions:4d} questions of {len(records):4d} ({100 * questions / len(records):.0f}%)")


if __name__ == "__main__":
    main()
