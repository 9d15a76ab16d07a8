#!/usr/bin/env python3
"""Training-step cost of Surgery: (a) plain SFT, (b) Surgery with the fused sink column, (c) Surgery from eager
attention maps as the released code does; with --variants, also (d) AsFT and (e) SAP in the same loop
(defenses/), and the Trainer path: (f) transformers' Trainer, plain, (g) SurgeryTrainer (surgery_trainer.py) and
(h) the plain Trainer on 2 more task rows per batch (the measured floor of (g)), each one `Trainer.training_step`
(forward, backward) plus clipping and the optimizer step. With --kinds, the same variants for several kinds of
training: LoRA or full fine-tuning, fp32 or bf16 weights, with or without activation checkpointing. Same model, batch
and sequence length throughout. Prints each variant's ratio of median step time and of peak memory to plain SFT of
the same kind.

    python bench/bench_train.py [--model M | --config llama3-8b] [--batch-size 8] [--seq-len 256] [--rounds 6]
                                [--variants abc] [--kinds lora,lora-bf16,full,full-bf16,full-bf16-ckpt]
    python bench/bench_train.py --variants fgh    # SurgeryTrainer vs Trainer, against the floor of its extra rows

--config times a randomly initialised model of a shape (a config.json, or llama3-8b: meta-llama/Llama-3.1-8B's)
on random token ids, built directly on the device: the paper's 8B setting on a GPU without its weights or data.

A kind is `lora` or `full`, then optionally `-bf16`, then optionally `-ckpt`, as surgery.py trains with the same
flags: `lora` (LoRA adapters, fp32 weights: the default), `lora-bf16` (--dtype bf16: frozen weights in bf16,
adapters and their AdamW state in fp32), `full` (--full: every weight trained in fp32), `full-bf16` (--full
--dtype bf16: pure bf16 weights, gradients and AdamW state, as the released code), and `-ckpt`
(--grad-checkpointing: each decoder layer's activations recomputed in backward). AsFT (d) and SAP (e) are LoRA
methods here: LoRA kinds only. (f), (g) and (h) train the same model with the Trainer's own step; (g)/(f) is compared
with the arithmetic floor of one forward over the task rows and the reference pair, (batch + 2 ref rows) / batch in
tokens (every sequence is --seq-len long), and with (h)/(f), what the plain Trainer's step costs on as many rows.

Step time: one process runs every (kind, variant) pair interleaved (a round is one step of each, in rotating
order), so load from other processes falls on all of them alike; the median over rounds is compared. Peak memory:
each pair runs a few steps in a process of its own, so its peak is its own: on CPU, the process's peak resident set
over the training steps (model, optimizer state and activations together; the peak is reset through
/proc/self/clear_refs after the model is set up, so loading transients do not count; where that file is missing,
the peak since the process started), torch.cuda.max_memory_allocated on a GPU.
"""
import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import scale  # noqa: E402
import surgery  # noqa: E402
from common import ArgumentParser  # noqa: E402
from defenses.asft import AsFT  # noqa: E402
from defenses.sap import SAP  # noqa: E402

VARIANTS = {"a": "plain SFT", "b": "Surgery, fused sink column", "c": "Surgery, eager attention maps",
            "d": "AsFT (lambda 1)", "e": "SAP (rho 2e-5)", "f": "Trainer (transformers), plain",
            "g": "SurgeryTrainer (alpha 300)", "h": "Trainer, plain, batch + 2 rows"}
TRAINER_VARIANTS = "fgh"
LORA_ONLY = "de"
KIND_PATTERN = re.compile(r"^(lora|full)(-bf16)?(-ckpt)?$")


def parse_kind(kind):
    """surgery.py flags of a kind name: lora|full, then -bf16, then -ckpt."""
    match = KIND_PATTERN.match(kind)
    if match is None:
        raise ValueError(kind)
    return {"full": match[1] == "full", "dtype": "bf16" if match[2] else "fp32", "grad_checkpointing": bool(match[3])}


def describe_kind(kind):
    spec = parse_kind(kind)
    what = ("full fine-tuning" if spec["full"] else "LoRA r8 q,k,v,o") + (
        ", pure bf16" if spec["full"] and spec["dtype"] == "bf16" else
        ", bf16 frozen weights" if spec["dtype"] == "bf16" else ", fp32")
    return what + (", activation checkpointing" if spec["grad_checkpointing"] else "")


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


def random_config(spec):
    """A transformers config from a config.json path, or llama3-8b."""
    from transformers import AutoConfig
    if spec == "llama3-8b":
        from bench_sinkcheck_8b import config
        values = config(32)
    else:
        values = json.loads(Path(spec).read_text())
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_data(vocab_size, seq_len, batch_size, seed=0):
    """Task examples (every token supervised) and references of random ids, each seq_len long."""
    draw = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(vocab_size, (n, seq_len), generator=draw).tolist()  # noqa: E731
    examples = [(row, list(row)) for row in ids(4 * batch_size)]
    return examples, (ids(16), ids(16))


def bench_data(tokenizer, seq_len, batch_size):
    """Task examples and references, every one exactly seq_len tokens long."""
    import offline
    data = offline.default_data()
    task = long_records(surgery.read_records(data["train"]) * 20, tokenizer, seq_len)
    harmful = long_records(surgery.read_records(data["harmful_ref"]), tokenizer, seq_len)
    harmless = long_records(surgery.read_records(data["harmless_ref"]) * 5, tokenizer, seq_len)
    # Only full-length sequences (the last joined record of a list can fall short).
    examples = [e for e in (surgery.encode(tokenizer, r, seq_len) for r in task) if len(e[0]) == seq_len]
    refs = tuple([ids for ids in (surgery.encode(tokenizer, r, seq_len)[0] for r in recs) if len(ids) == seq_len]
                 for recs in (harmful, harmless))
    assert len(examples) >= batch_size and all(refs), "not enough bench data at --seq-len"
    return examples, refs


class Bench:
    """One kind: the model set up as surgery.py's train() sets it up for that kind, the task examples and the
    references, and the defenses of the variants asked for."""

    def __init__(self, args, kind, variants, data=None):
        spec = parse_kind(kind)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.run = surgery.parse_args(["--batch-size", str(args.batch_size), "--max-len", str(args.seq_len),
                                       "--log-every", str(10 ** 9), "--dtype", spec["dtype"]] +
                                      ["--full"] * spec["full"] + ["--grad-checkpointing"] * spec["grad_checkpointing"])
        # As surgery.train: --full loads the weights in --dtype; LoRA loads fp32 and casts the frozen weights.
        dtype = surgery.DTYPES[self.run.dtype] if self.run.full else torch.float32
        if args.config:
            from transformers import AutoModelForCausalLM
            config = random_config(args.config)
            with self.device:  # initialised where it runs: an 8B model never passes through host memory
                self.model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              attn_implementation=surgery.SINK_ATTENTION)
            tokenizer, pad_id = None, config.pad_token_id or 0
            data = data or random_data(config.vocab_size, args.seq_len, args.batch_size)
        else:
            self.model, tokenizer = surgery.load_model(args.model, self.device, dtype)
            pad_id = tokenizer.pad_token_id
        if not self.run.full and self.run.dtype == "bf16":
            self.model.to(torch.bfloat16)
        self.examples, self.refs = data or bench_data(tokenizer, args.seq_len, args.batch_size)
        self.run.pad_id, self.run.total_steps = pad_id, 10 ** 6
        torch.manual_seed(self.run.seed)
        if self.run.full:
            self.model.requires_grad_(True)
        else:
            surgery.add_lora(self.model, set(self.run.lora_targets), self.run.lora_rank, self.run.lora_alpha,
                             self.run.lora_dropout)
        if self.run.grad_checkpointing:
            scale.enable_activation_checkpointing(self.model, surgery.sink_replay_contexts)
        # SAP's probe hooks stay on the model for every variant; between SAP's steps the probe is zero.
        self.defenses = {"d": RandomDirectionAsFT() if "d" in variants else None,
                         "e": SAP() if "e" in variants else None}
        for defense in filter(None, self.defenses.values()):
            defense.setup(self.model, tokenizer, self.run)
        # One Objective per variant (its defense term differs); they share the model and self.run.
        self.objectives = {v: surgery.Objective(self.model, self.run, self.defenses.get(v)) for v in variants
                           if v not in TRAINER_VARIANTS}
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        # The Trainer path: a Trainer per variant on the same model, each with its own AdamW (lr 1e-5 as above).
        self.trainers = {v: self.make_trainer(v, tokenizer) for v in variants if v in TRAINER_VARIANTS}
        self.model.train()
        self.tokenizer = tokenizer
        self.step_index = 0

    def make_trainer(self, variant, tokenizer):
        import tempfile

        import transformers
        from surgery_trainer import SurgeryTrainer
        cuda = self.device.type == "cuda"
        if not hasattr(self, "trainer_dir"):  # the Trainer's output_dir: nothing is written there, removed at exit
            self.trainer_dir = tempfile.TemporaryDirectory(prefix="bench_trainer.")
        # As surgery.py (scale.step_autocast): fp32 weights compute in bf16 autocast on a GPU.
        args = transformers.TrainingArguments(
            output_dir=self.trainer_dir.name, use_cpu=not cuda, report_to=[], learning_rate=1e-5,
            max_grad_norm=self.run.grad_clip, per_device_train_batch_size=self.run.batch_size, seed=self.run.seed,
            bf16=cuda and self.run.dtype == "fp32", disable_tqdm=True)
        common = dict(model=self.model, args=args, processing_class=tokenizer)
        if variant in "fh":
            trainer = transformers.Trainer(**common)
        else:  # the same token ids as (b): references passed as token-id lists
            trainer = SurgeryTrainer(**common, harmful_refs=self.refs[0], harmless_refs=self.refs[1], alpha=300.0,
                                     ref_batch=self.run.ref_batch, max_ref_len=self.run.max_len)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1
        return trainer

    def trainer_step(self, variant):
        """The Trainer's step without its outer loop: training_step (forward and backward of compute_loss),
        clipping, the optimizer step. (h): as many more task rows as (g) has reference rows."""
        trainer = self.trainers[variant]
        rows = self.run.batch_size + (2 * self.run.ref_batch if variant == "h" else 0)
        indices = surgery.batch_indices(self.step_index, len(self.examples), rows, self.run.seed)
        batch = surgery.to_device(surgery.pad_batch([self.examples[i][0] for i in indices], self.run.pad_id,
                                                    [self.examples[i][1] for i in indices]), self.device)
        n_items = (batch["labels"][:, 1:] != -100).sum()  # as Trainer.get_batch_samples counts them
        trainer.state.global_step = self.step_index
        trainer.training_step(self.model, batch, n_items)
        if self.run.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.run.grad_clip)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    def step(self, variant):
        """One training step of a variant; returns its seconds."""
        self.run.alpha = 300.0 if variant in "bc" else 0.0
        self.run.sink_impl = "eager" if variant == "c" else "fused"
        # The released code keeps every attention map: eager attention for the whole step.
        self.model.set_attn_implementation("eager" if variant == "c" else surgery.SINK_ATTENTION)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if variant in TRAINER_VARIANTS:
            self.trainer_step(variant)
        else:
            surgery.train_step(self.objectives[variant], self.optimizer, self.step_index, self.examples, self.refs,
                               self.run, scale.World(0, 1), self.defenses.get(variant))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step_index += 1
        return time.perf_counter() - start


def profile_step(bench, kind, variant, rows):
    """torch.profiler's operators of one step, by their own time on the device (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = bench.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        seconds = bench.step(variant)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\n{kind} ({variant}) {VARIANTS[variant]}: one step, {seconds:.3f} s")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def reset_peak_rss():
    """Start the process's peak resident set afresh from its current size (Linux); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(kind, variant, args):
    """Run in a child process: a few steps of one variant of one kind, then its peak memory in bytes."""
    bench = Bench(args, kind, variant)
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset = not cuda and reset_peak_rss()
    for _ in range(2):
        bench.step(variant)
    if cuda:
        return torch.cuda.max_memory_allocated()
    if reset:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--config", help="instead of --model: a randomly initialised model of this shape, a config.json "
                                    "or llama3-8b, on random tokens (no weights or data needed)")
    p.add_argument("--batch-size", type=int, default=8, help="task sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per task and reference sequence (default 256)")
    p.add_argument("--rounds", type=int, default=6,
                   help="timed rounds, one step of each (kind, variant) per round (default 6)")
    p.add_argument("--variants", default="abc", help="which variants to run, (a) always: a plain SFT, b fused "
                                                     "Surgery, c eager Surgery, d AsFT, e SAP, f the Trainer, g "
                                                     "SurgeryTrainer, h the Trainer on 2 more rows (default abc)")
    p.add_argument("--kinds", default="lora",
                   help="comma-separated kinds of training, each measured with every variant and compared with "
                        "its own plain SFT: lora, lora-bf16, full, full-bf16, each optionally with -ckpt "
                        "(e.g. full-bf16-ckpt, the paper's setting); default lora")
    p.add_argument("--profile", type=int, metavar="ROWS",
                   help="instead of timing: profile one step of each (kind, variant) after the warm-up and print "
                        "its ROWS costliest operators (torch.profiler; device time on a GPU)")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # child process mode: KIND:VARIANT
    args = p.parse_args()
    if not set(args.variants) <= set(VARIANTS):
        p.error(f"--variants: letters among {''.join(VARIANTS)}")
    args.variants = "a" + "".join(v for v in VARIANTS if v in args.variants and v != "a")
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if not KIND_PATTERN.match(k)]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        p.error(f"--kinds: distinct names among lora, lora-bf16, full, full-bf16, each optionally with -ckpt "
                f"(got {args.kinds!r})")
    if set(args.variants) & set(LORA_ONLY) and any(parse_kind(k)["full"] for k in kinds):
        p.error("--variants d and e (AsFT, SAP) are LoRA methods: use them with LoRA kinds only")
    if args.config and args.model:
        p.error("--model and --config: one or the other")
    if args.config:
        try:
            random_config(args.config)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--config {args.config}: {e}")
    elif args.model is None:
        import offline
        args.model = str(offline.default_model_dir())
    if args.memory_of:
        kind, variant = args.memory_of.split(":")
        print(json.dumps({"peak_bytes": peak_memory(kind, variant, args)}))
        return

    pairs = [(kind, variant) for kind in kinds for variant in args.variants]
    peaks = {}
    for kind, variant in pairs if not args.profile else []:
        cmd = [sys.executable, __file__, "--memory-of", f"{kind}:{variant}", "--kinds", kind, "--variants", variant,
               *(["--config", args.config] if args.config else ["--model", args.model]), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench: {kind} variant {variant} failed:\n{done.stderr[-3000:]}")
        peaks[kind, variant] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
        print(f"peak memory {kind} ({variant}): {peaks[kind, variant] / 2**20:.0f} MiB "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    benches, data = {}, None
    for kind in kinds:
        benches[kind] = Bench(args, kind, args.variants, data)
        data = benches[kind].examples, benches[kind].refs  # the same tokens for every kind
    for kind, variant in pairs:  # warm-up: first calls pay for allocations and kernel selection
        benches[kind].step(variant)
    if args.profile:
        for kind, variant in pairs:
            profile_step(benches[kind], kind, variant, args.profile)
        return
    times = {pair: [] for pair in pairs}
    for round_index in range(args.rounds):
        shift = round_index % len(pairs)
        for kind, variant in pairs[shift:] + pairs[:shift]:
            times[kind, variant].append(benches[kind].step(variant))
        print(f"round {round_index + 1}/{args.rounds}: " + "  ".join(
            f"{k}({v}) {times[k, v][-1]:.2f} s" for k, v in pairs), file=sys.stderr, flush=True)
    median = {pair: statistics.median(t) for pair, t in times.items()}

    device = next(iter(benches.values())).device
    print(f"{args.config or Path(args.model).name} on {device}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    for kind in kinds:
        if len(kinds) > 1 or kind != "lora":
            print(f"kind {kind}: {describe_kind(kind)}")
        for variant in args.variants:
            print(f"({variant}) {VARIANTS[variant]:33s} median step {median[kind, variant]:7.3f} s   peak memory "
                  f"{peaks[kind, variant] / 2**20:7.0f} MiB")
        for variant in args.variants[1:]:
            print(f"({variant})/(a): step time {median[kind, variant] / median[kind, 'a']:.3f}   "
                  f"peak memory {peaks[kind, variant] / peaks[kind, 'a']:.3f}")
        if set("fg") <= set(args.variants):
            floor = (args.batch_size + 2 * surgery.parse_args([]).ref_batch) / args.batch_size
            ratio = median[kind, "g"] / median[kind, "f"]
            print(f"(g)/(f): step time {ratio:.3f}   peak memory {peaks[kind, 'g'] / peaks[kind, 'f']:.3f}   "
                  f"arithmetic floor {floor:.3f} (batch {args.batch_size} + 2 reference rows, in tokens): "
                  f"step time / floor {ratio / floor:.3f}")
        if set("fgh") <= set(args.variants):
            print(f"(h)/(f): step time {median[kind, 'h'] / median[kind, 'f']:.3f} (the measured floor)   "
                  f"(g)/(h): step time {median[kind, 'g'] / median[kind, 'h']:.3f}   "
                  f"peak memory {peaks[kind, 'g'] / peaks[kind, 'h']:.3f}")
    if len(kinds) > 1:
        first = kinds[0]
        print(f"plain SFT (a) of each kind vs plain SFT of {first}:")
        for kind in kinds[1:]:
            print(f"  {kind:16s} step time {median[kind, 'a'] / median[first, 'a']:.3f}   "
                  f"peak memory {peaks[kind, 'a'] / peaks[first, 'a']:.3f}")


if __name__ == "__main__":
    main()
