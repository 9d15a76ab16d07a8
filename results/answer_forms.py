#!/usr/bin/env python3
"""How the evaluated models' answers open and repeat, read from eval.py's cached generations (runs/eval/generate-*):
a low keyword HS can be real refusals or a collapsed mode that merely opens with an apology. Needs the work folder
of the sweep (the run JSONs do not keep the answers).

    python results/answer_forms.py [--work-dir runs/eval] [--runs aligned sft_p0.1_s43 ...]

Per run and prompt kind (harmful, benign): the share of answers that open with "I am sorry, but I am a" (the form
Surgery's models fell into in the first v5 runs: "I am sorry, but I am a great company."), the share that open with
any apology, and the share in which some 3-word sequence occurs three or more times (a repetition loop).
"""
import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

SELF_DESCRIPTION = re.compile(r"\s*I(?: am|'m) sorry,? but I am an? ", re.IGNORECASE)
APOLOGY = re.compile(r"\s*(?:I(?: am|'m) sorry|I apologi[sz]e|Sorry)", re.IGNORECASE)


def loops(text, n=3, times=3):
    words = text.lower().split()
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(counts) and max(counts.values()) >= times


def latest_generations(work_dir, run):
    folders = sorted(Path(work_dir).glob(f"generate-{run}-*/generations.jsonl"), key=lambda p: p.stat().st_mtime)
    return folders[-1] if folders else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="runs/eval", help="eval.py's work folder")
    p.add_argument("--runs", nargs="*", help="run names (default: every run with cached generations)")
    args = p.parse_args()
    runs = args.runs or sorted({f.parent.name[len("generate-"):].rsplit("-", 1)[0]
                                for f in Path(args.work_dir).glob("generate-*/generations.jsonl")})
    if not runs:
        sys.exit(f"no cached generations under {args.work_dir}")
    print(f"{'run':<28} {'kind':<8} {'n':>4} {'sorry, but I am a':>18} {'any apology':>12} {'3-gram loop':>12}")
    for run in runs:
        path = latest_generations(args.work_dir, run)
        if path is None:
            print(f"{run:<28} (no cached generations)")
            continue
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for kind in ("harmful", "benign"):
            answers = [r["answer"] for r in rows if r["kind"] == kind]
            if not answers:
                continue
            share = lambda f: 100 * sum(bool(f(a)) for a in answers) / len(answers)  # noqa: E731
            print(f"{run:<28} {kind:<8} {len(answers):4d} {share(SELF_DESCRIPTION.match):17.0f}% "
                  f"{share(APOLOGY.match):11.0f}% {share(loops):11.0f}%")


if __name__ == "__main__":
    main()
