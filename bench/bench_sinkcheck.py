"""Benchmark: sinkcheck against transformers' eager attention, the correctness oracle, on the default model.

Both compute the same per-head sink divergence on the same probes (chat-formatted harmful and harmless
reference pairs from the offline data, tokenized as surgery.py does), in fp32, on the same number of threads.
transformers runs the base model without the LM head (which the statistic does not need; sinkcheck skips it
too), one unpadded sequence at a time with output_attentions=True. Prints tokens per second of each and the
ratio, and the largest difference between the two divergences.

    .venv/bin/python bench/bench_sinkcheck.py [--threads 2] [--probes 32] [--max-len 256] [--model DIR]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def probe_ids(model_dir, n, max_len):
    import offline
    from sinkcheck.probes import tokenize_records
    splits = offline.build_splits(0)
    pick = lambda records: [(r["instruction"], r["output"], None) for r in records[:n]]
    harmful = [ids[:max_len] for ids in tokenize_records(pick(splits.harmful_ref), model_dir, "harmful_ref")]
    harmless = [ids[:max_len] for ids in tokenize_records(pick(splits.harmless_ref), model_dir, "harmless_ref")]
    return harmful, harmless


def eager_divergence(model, harmful, harmless):
    def means(sequences):
        total = None
        for seq in sequences:
            attentions = model.model(torch.tensor([seq]), output_attentions=True).attentions
            per_seq = np.stack([a[0, :, 1:, 0].double().mean(-1).numpy() for a in attentions])
            total = per_seq if total is None else total + per_seq
        return total / len(sequences)
    with torch.inference_mode():
        return means(harmful) - means(harmless)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads for both torch and sinkcheck (default 2)")
    parser.add_argument("--probes", type=int, default=32, help="harmful and harmless probes each (default 32)")
    parser.add_argument("--max-len", type=int, default=256, help="truncate probes to this many tokens")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved timing rounds; the best per side counts (default 2)")
    parser.add_argument("--model", help="model folder (default: offline.default_model_dir(), SmolLM2-135M)")
    args = parser.parse_args()

    import sinkcheck
    from transformers import AutoModelForCausalLM
    if args.model:
        model_dir = Path(args.model)
    else:
        import offline
        model_dir = offline.default_model_dir()
    torch.set_num_threads(args.threads)
    harmful, harmless = probe_ids(model_dir, args.probes, args.max_len)
    tokens = sum(map(len, harmful)) + sum(map(len, harmless))
    print(f"model {model_dir.name}; {len(harmful)} harmful + {len(harmless)} harmless probes, {tokens} tokens; "
          f"{args.threads} threads; torch {torch.__version__}")

    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager",
                                                     dtype=torch.float32).eval()
    start = time.perf_counter()
    checker = sinkcheck.Model(str(model_dir), threads=args.threads)
    load_seconds = time.perf_counter() - start
    eager_divergence(reference, harmful[:1], harmless[:1])  # warm-up
    checker.sink_divergence(harmful[:1], harmless[:1])

    # The three measurements take turns in each round, so background load hits them alike; the best round counts.
    timings = {"eager": [], "plain": [], "default": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        seconds, want = timed(lambda: eager_divergence(reference, harmful, harmless))
        timings["eager"].append(seconds)
        seconds, plain = timed(lambda: checker.sink_divergence(harmful, harmless, 0, reuse_prefixes=False))
        timings["plain"].append(seconds)
        seconds, got = timed(lambda: checker.sink_divergence(harmful, harmless, 0))
        timings["default"].append(seconds)
    eager_seconds, plain_seconds, check_seconds = (min(timings[k]) for k in ("eager", "plain", "default"))

    diff = max(np.abs(np.asarray(got["divergence"]) - want).max(), np.abs(np.asarray(plain["divergence"]) - want).max())
    eager_rate, plain_rate, check_rate = tokens / eager_seconds, tokens / plain_seconds, tokens / check_seconds
    print(f"transformers eager (fp32)          {eager_rate:8.0f} tokens/s  ({eager_seconds:.2f} s)")
    print(f"sinkcheck, no prefix reuse         {plain_rate:8.0f} tokens/s  ({plain_seconds:.2f} s)  "
          f"ratio {plain_rate / eager_rate:.2f}x")
    print(f"sinkcheck (default)                {check_rate:8.0f} tokens/s  ({check_seconds:.2f} s)  "
          f"ratio {check_rate / eager_rate:.2f}x")
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (the machine has {os.cpu_count()} "
          f"CPUs); best of {args.repeats} interleaved rounds")
    print(f"sinkcheck load {load_seconds:.2f} s; positive heads {got['positive']} (eager {int((want > 0).sum())}); "
          f"max |d_sinkcheck - d_eager| = {diff:.2e}")


if __name__ == "__main__":
    main()
