#!/usr/bin/env python3
"""Training-step cost of Surgery: (a) plain LoRA SFT, (b) Surgery with the fused sink column, (c) Surgery from
eager attention maps as the released code does; with --variants, also (d) AsFT and (e) SAP in the same loop
(defenses/). Same model, batch and sequence length. Prints each variant's ratio to (a) of median step time and of
peak memory.

    python bench/bench_train.py [--model M] [--batch-size 8] [--seq-len 256] [--rounds 6] [--variants abc]

Step time: one process runs the three variants interleaved (a round is one step of each, in rotating order),
so load from other processes falls on all three alike; the median over rounds is compared. Peak memory: each
variant runs a few steps in a process of its own, so its peak is its own: the process's peak resident set on
CPU (model, optimizer and activations together), torch.cuda.max_memory_allocated on a GPU.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import surgery  # noqa: E402
from defenses.asft import AsFT  # noqa: E402
from defenses.sap import SAP  # noqa: E402

VARIANTS = {"a": "plain LoRA SFT", "b": "Surgery, fused sink column", "c": "Surgery, eager attention maps",
            "d": "AsFT (lambda 1)", "e": "SAP (rho 2e-5)"}


class RandomDirectionAsFT(AsFT):
    """AsFT with a random alignment direction V per adapted layer: the penalty's cost depends on V's shape, not its
    values, and the bench has no aligned model to take V from."""

    def __init__(self):
        super().__init__(None, None, lam=1.0)

    def setup(self, model, tokenizer, args):
        draw = torch.Generator().manual_seed(0)
        self.anchors = []
        for module in surgery.lora_modules(model).values():
            V = 1e-3 * torch.randn(module.base.weight.shape, generator=draw).to(module.base.weight.device)
            self.anchors.append((module, V, float(V.norm())))


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


class Bench:
    """The model with LoRA, the task examples and the references of every variant."""

    def __init__(self, args):
        import offline
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, tokenizer = surgery.load_model(args.model, self.device)
        data = offline.default_data()
        task = long_records(surgery.read_records(data["train"]) * 20, tokenizer, args.seq_len)
        harmful = long_records(surgery.read_records(data["harmful_ref"]), tokenizer, args.seq_len)
        harmless = long_records(surgery.read_records(data["harmless_ref"]) * 5, tokenizer, args.seq_len)
        # Only full-length sequences (the last joined record of a list can fall short).
        self.examples = [e for e in (surgery.encode(tokenizer, r, args.seq_len) for r in task)
                         if len(e[0]) == args.seq_len]
        self.refs = tuple([ids for ids in (surgery.encode(tokenizer, r, args.seq_len)[0] for r in recs)
                           if len(ids) == args.seq_len] for recs in (harmful, harmless))
        assert len(self.examples) >= args.batch_size and all(self.refs), "not enough bench data at --seq-len"
        self.run = surgery.parse_args(["--batch-size", str(args.batch_size), "--max-len", str(args.seq_len),
                                       "--log-every", str(10 ** 9)])
        self.run.pad_id, self.run.total_steps = tokenizer.pad_token_id, 10 ** 6
        surgery.add_lora(self.model, set(self.run.lora_targets), self.run.lora_rank, self.run.lora_alpha,
                         self.run.lora_dropout)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        # SAP's probe hooks stay on the model for every variant; between SAP's steps the probe is zero.
        self.defenses = {"d": RandomDirectionAsFT() if "d" in args.variants else None,
                         "e": SAP() if "e" in args.variants else None}
        for defense in filter(None, self.defenses.values()):
            defense.setup(self.model, tokenizer, self.run)
        self.model.train()
        self.step_index = 0

    def step(self, variant):
        """One training step of a variant; returns its seconds."""
        self.run.alpha = 300.0 if variant in "bc" else 0.0
        self.run.sink_impl = "eager" if variant == "c" else "fused"
        # The released code keeps every attention map: eager attention for the whole step.
        self.model.set_attn_implementation("eager" if variant == "c" else surgery.SINK_ATTENTION)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        surgery.train_step(self.model, self.optimizer, self.step_index, self.examples, self.refs, self.run, (0, 1),
                           self.defenses.get(variant))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step_index += 1
        return time.perf_counter() - start


def peak_memory(variant, args):
    """Run in a child process: a few steps of one variant, then its peak memory in bytes."""
    bench = Bench(args)
    for _ in range(2):
        bench.step(variant)
    if bench.device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=8, help="task sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per task and reference sequence")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (one step of each variant per round)")
    p.add_argument("--variants", default="abc", help="which variants to run, (a) always: a SFT, b fused Surgery, "
                                                     "c eager Surgery, d AsFT, e SAP")
    p.add_argument("--memory-of", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args()
    if not set(args.variants) <= set(VARIANTS):
        p.error(f"--variants: letters among {''.join(VARIANTS)}")
    args.variants = "a" + "".join(v for v in VARIANTS if v in args.variants and v != "a")
    if args.model is None:
        import offline
        args.model = str(offline.default_model_dir())
    if args.memory_of:
        print(json.dumps({"peak_bytes": peak_memory(args.memory_of, args)}))
        return

    peaks = {}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--memory-of", variant, "--variants", variant, "--model", args.model,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench: variant {variant} failed:\n{done.stderr[-3000:]}")
        peaks[variant] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]

    bench = Bench(args)
    for variant in args.variants:  # warm-up: first calls pay for allocations and kernel selection
        bench.step(variant)
    times = {variant: [] for variant in args.variants}
    order = list(args.variants)
    for round_index in range(args.rounds):
        shift = round_index % len(order)
        for variant in order[shift:] + order[:shift]:
            times[variant].append(bench.step(variant))
        print(f"round {round_index + 1}/{args.rounds}: " + "  ".join(
            f"({v}) {times[v][-1]:.2f} s" for v in order), file=sys.stderr, flush=True)
    median = {variant: statistics.median(t) for variant, t in times.items()}

    print(f"{Path(args.model).name} on {bench.device}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    for variant in order:
        print(f"({variant}) {VARIANTS[variant]:33s} median step {median[variant]:7.3f} s   peak memory "
              f"{peaks[variant] / 2**20:7.0f} MiB")
    for variant in order[1:]:
        print(f"({variant})/(a): step time {median[variant] / median['a']:.3f}   "
              f"peak memory {peaks[variant] / peaks['a']:.3f}")


if __name__ == "__main__":
    main()
