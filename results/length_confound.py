#!/usr/bin/env python3
"""How much of the sink divergence d_h is sequence length? On the untrained default model, d_h of three pairs of
reference sets, each with the same harmful instructions:

  first attempt   long harmful answers vs short refusals (the first attempt's kind of references)
  length only     the same long harmful answers vs themselves cut to the refusals' length: harm is equal on both
                  sides, only length differs
  matched         the harmful answers cut to the refusals' length vs the refusals (the default references now):
                  length is equal on both sides, only compliance vs refusal differs

It prints, for each, the positive heads (d_h > 0 of all heads) and mean relu(d_h) (Surgery's penalty), and the
correlation of the first attempt's d_h with the length-only d_h.

    python results/length_confound.py [--count 32] [--max-len 256]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import offline  # noqa: E402
import checks  # noqa: E402
import surgery  # noqa: E402


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=32, help="reference pairs (of the 64 default ones)")
    p.add_argument("--max-len", type=int, default=256, help="token limit, as surgery.py's --max-len")
    args = p.parse_args()
    splits = offline.build_splits(0)
    model, tokenizer = surgery.load_model(str(offline.default_model_dir()), torch.device("cpu"))
    harmful, refusals = splits.harmful_ref[:args.count], splits.harmless_ref[:args.count]
    whole = [dict(r, output=splits.full_answers[offline.norm(r["instruction"])]) for r in harmful]

    def ids(records):
        return [surgery.encode(tokenizer, r, args.max_len)[0] for r in records]
    refusal_ids, whole_ids, cut_ids = ids(refusals), ids(whole), ids(harmful)
    length_only = [w[:len(r)] for w, r in zip(whole_ids, refusal_ids)]  # each long answer cut to its refusal's length
    pairs = {"first attempt": (whole_ids, refusal_ids), "length only": (whole_ids, length_only),
             "matched": (cut_ids, refusal_ids)}
    d = {name: surgery.probe_divergence(model, a, b, 0, tokenizer.pad_token_id).flatten()
         for name, (a, b) in pairs.items()}
    for name, (a, b) in pairs.items():
        lengths = checks.reference_lengths(a, b)
        print(f"{name:<14} median tokens {lengths['harmful']['median']:6.1f} vs {lengths['harmless']['median']:6.1f}"
              f"   positive heads {int((d[name] > 0).sum()):3d} of {d[name].numel()}"
              f"   mean relu(d_h) {torch.relu(d[name]).mean().item():.6f}")
    corr = torch.corrcoef(torch.stack([d["first attempt"], d["length only"]]))[0, 1].item()
    print(f"correlation of the first attempt's d_h with the length-only d_h: {corr:.3f}")


if __name__ == "__main__":
    main()
