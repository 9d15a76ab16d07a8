#!/usr/bin/env python3
"""Training-step cost of Surgery: (a) plain LoRA SFT, (b) Surgery with the fused sink column, (c) Surgery from
eager attention maps as the released code does. Same model, batch and sequence length; each variant runs in its
own process so its peak memory is its own. Prints the ratios (b)/(a) and (c)/(a).

    python bench/bench_train.py [--model M] [--batch-size 8] [--seq-len 256] [--steps 8]

Peak memory is the process's peak resident set on CPU (model, optimizer and activations together) and
torch.cuda.max_memory_allocated on a GPU.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import surgery  # noqa: E402

VARIANTS = {"a": "plain LoRA SFT", "b": "Surgery, fused sink column", "c": "Surgery, eager attention maps"}


def long_records(records, tokenizer, seq_len):
    """Each record's prompt with an answer made of the following records' text, longer than seq_len tokens, so
    every sequence is cut to exactly seq_len and most of it is supervised (long-answer SFT)."""
    out, i = [], 0
    while i < len(records):
        answer, j = "", i + 1
        while j < len(records) and len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= seq_len:
            answer += records[j]["instruction"] + " " + records[j]["output"] + "\n"
            j += 1
        out.append({"instruction": records[i]["instruction"], "output": answer})
        i = j
    return out


def run_variant(variant, args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = surgery.load_model(args.model, device)
    import offline
    data = offline.default_data()
    n = args.batch_size * (args.steps + args.warmup)
    task = long_records(surgery.read_records(data["train"]) * 20, tokenizer, args.seq_len)[:n]
    harmful = long_records(surgery.read_records(data["harmful_ref"]), tokenizer, args.seq_len)
    harmless = long_records(surgery.read_records(data["harmless_ref"]) * 5, tokenizer, args.seq_len)
    examples = [surgery.encode(tokenizer, r, args.seq_len) for r in task]
    assert len(examples) == n and all(len(ids) == args.seq_len for ids, _ in examples), "not enough bench data"
    refs = tuple([surgery.encode(tokenizer, r, args.seq_len)[0] for r in recs] for recs in (harmful, harmless))
    run = surgery.parse_args(["--batch-size", str(args.batch_size), "--alpha", "0" if variant == "a" else "300",
                              "--sink-impl", "eager" if variant == "c" else "fused", "--max-len", str(args.seq_len),
                              "--log-every", str(10 ** 9)])
    run.pad_id, run.total_steps = tokenizer.pad_token_id, args.steps + args.warmup
    if variant == "c":  # the released code keeps every attention map: eager attention throughout
        model.set_attn_implementation("eager")
    surgery.add_lora(model, set(run.lora_targets), run.lora_rank, run.lora_alpha, run.lora_dropout)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=run.lr)
    model.train()
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        surgery.train_step(model, optimizer, step, examples, refs, run, (0, 1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "step_seconds": statistics.median(times), "peak_bytes": peak,
            "tokens_per_step": sum(len(examples[i][0]) for i in range(args.batch_size)), "device": str(device)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=8, help="task sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per task and reference sequence")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one variant, in a child
    args = p.parse_args()
    if args.model is None:
        import offline
        args.model = str(offline.default_model_dir())
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--batch-size",
               str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench: variant {variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"({variant}) {VARIANTS[variant]:32s} step {r['step_seconds']:.3f} s   "
              f"peak memory {r['peak_bytes'] / 2**20:8.0f} MiB   ({r['device']})", flush=True)
    base = results["a"]
    for variant in ("b", "c"):
        r = results[variant]
        print(f"({variant})/(a): step time {r['step_seconds'] / base['step_seconds']:.3f}   "
              f"peak memory {r['peak_bytes'] / base['peak_bytes']:.3f}")


if __name__ == "__main__":
    main()
