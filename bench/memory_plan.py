#!/usr/bin/env python3
"""Memory plan per GPU for surgery.py on 1, 2, 4 and 8 GPUs: what to ask for before renting machines.

    python bench/memory_plan.py [--config config.json] [--mode full-bf16,full-fp32,lora-bf16] [--seq-len 512]
                                [--batch-size 10] [--grad-accum 1 | --micro-batch B] [--ref-batch 1] [--ref-len 512]

Without --config it plans for Llama-3-8B (hidden 4096, 32 layers, 32 query / 8 key-value heads of 128,
intermediate 14336, vocabulary 128256, untied LM head: 8,030,261,248 parameters). Figures are bytes per GPU,
printed in GiB (2^30 bytes).

Modes (surgery.py's flags in brackets):
  full-bf16  [--full --dtype bf16]  pure bf16 as the released code: weights, gradients and both AdamW moments in
             bf16 (2 + 2 + 4 bytes per parameter), sharded with FSDP2 over N GPUs (each divided by N exactly;
             surgery.py shards only when N > 1).
  full-fp32  [--full]  fp32 weights, gradients and AdamW moments (4 + 4 + 8 bytes per parameter), FSDP2 as above;
             on CUDA surgery.py runs it under bf16 autocast, whose bf16 copies of every linear weight are saved for
             backward on every rank (not sharded; with checkpointing only one layer's at a time). Its activations
             are taken as the bf16 formula below: an approximation (under autocast the residual stream stays fp32).
  lora-bf16  [--dtype bf16]  LoRA rank --lora-rank on q,k,v,o (adapters fp32, AdamW state fp32), frozen weights in
             bf16 replicated on every GPU under DistributedDataParallel (plus its fp32 gradient buckets, N > 1).

Rows: N GPUs; micro-batch = sequences per forward on each GPU (ceil(batch / (N * grad-accum)) unless
--micro-batch); weights, gradients, AdamW state; the optimizer step's temporary ("step", below); "buffers": FSDP2's working set (N > 1: the root group (embedding,
final norm, LM head), which FSDP2 keeps unsharded from forward to backward, two decoder layers gathered at once
(the current and the prefetched next), and the root group's unsharded gradients before their reduce-scatter), or
DDP's gradient buckets; activations without and with --grad-checkpointing; totals.

Activations are the tensors autograd saves for backward, counted for transformers' Llama decoder layer in bf16
with SDPA (flash / memory-efficient kernels: no T x T attention map is stored), per token and layer, with
h = hidden, q = query heads x head_dim, k = key-value heads x head_dim, I = intermediate, n = query heads, r = LoRA
rank, T = sequence length, d = head_dim, m = bytes of a dropout mask (1 on CUDA: a bool mask):
  full fine-tuning, task batch (padded, so SDPA gets a mask and transformers repeats k, v to n heads):
      16h + 8 (two RMSNorms: fp32 input, bf16 normalised, bf16 output) + 8q (q, repeated k and v, output) + 4n
      (fp32 log-sum-exp) + 2T (SDPA's float copy of the mask) + 8I (MLP: gate, SiLU, up, product)
  full fine-tuning, reference pass without padding (grouped-query SDPA with the sink channel, d + 8 wide):
      16h + 8 + 2(n + 2n_kv + n)(d + 8) + 4n + 2q (o_proj's input, copied from the sliced output) + 8I
  LoRA (frozen weights save nothing for their own gradient), task batch with dropout:
      8h + 8 + 3(m + 2)h (q, k, v adapters: mask, dropped input) + 8q + 4n + 2T + (m + 2)q (o adapter) + 8r + 6I
  LoRA, reference pass (surgery.py turns dropout off for it): 8h + 8 + 2h + 2(n + 2n_kv + n)(d + 8) + 4n + 2q
      + 8r + 6I
  plus per layer the adapters' bf16 casts (LoRA) and, outside the layers: the final norm on every token, the LM
  head's input (full) and the fp32 log-probabilities of the answer tokens (--answer-fraction of the task tokens,
  default all: an upper bound), and the cross-entropy's transient: the bf16 logits and their fp32 copy at the end
  of the forward (6 bytes per vocabulary entry and answer token), the fp32 gradients and a bf16 cast in its
  backward (10 bytes).
  With --grad-checkpointing each layer keeps only its bf16 input (2h per token); backward recomputes one layer at a
  time, which holds that layer's full activations (counted for the largest pass).
Surgery forwards the task micro-batch, then its reference draw (--ref-batch harmful and --ref-batch harmless
sequences of --ref-len tokens, in one batch: counted as padded, since drawn sequences differ in length) on every
rank, and backpropagates both in one backward. Autograd runs the references' backward first (recorded last, their
nodes come first) and frees them before the task loss's: the peak is the task's saved tensors plus the larger of
the references' activations and the cross-entropy's transient.
The optimizer step ("step"): AdamW as torch picks it on CUDA (foreach) computes the square root of every second
moment at once, a temporary the size of one moment (measured on an H200: an 8B full-bf16 run with checkpointing
peaks there, 74.9 GiB, not in backward). The activations are freed by then: a total is the static part plus the
larger of the activations and this temporary.
Not counted: autograd's temporary gradients, allocator fragmentation, the CUDA context (about 0.5-1 GiB): keep
10-20% of the GPU free. tests/test_memory_plan.py checks the parameter counts against real models and the
per-layer formulas against the tensors autograd saves in a tiny bf16 Llama on CPU (exact there, with
m = 2: the CPU's dropout keeps its mask in the activations' dtype); GPU kernels may pad a little.
"""
import argparse
import json
import math
import sys
from pathlib import Path

GiB = 2 ** 30
MODES = ("full-bf16", "full-fp32", "lora-bf16")
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
             "tie_word_embeddings": False}
SINK_EXTRA_CHANNELS = 8  # surgery.EXTRA_CHANNELS: the sink indicator, padded to a multiple of 8
FAMILIES = ("llama", "mistral", "qwen2")


class Shape:
    """The sizes of a Llama-family decoder (Llama, Mistral, Qwen2) that memory depends on."""

    def __init__(self, config):
        if config.get("model_type", "llama") not in FAMILIES:
            raise ValueError(f"model_type {config.get('model_type')!r}: this plan knows {', '.join(FAMILIES)}")
        self.h = config["hidden_size"]
        self.layers = config["num_hidden_layers"]
        self.n = config["num_attention_heads"]
        self.n_kv = config.get("num_key_value_heads") or self.n
        self.d = config.get("head_dim") or self.h // self.n
        self.inter = config["intermediate_size"]
        self.vocab = config["vocab_size"]
        self.tied = bool(config.get("tie_word_embeddings", False))
        qwen2 = config.get("model_type") == "qwen2"
        self.qkv_bias = qwen2 or bool(config.get("attention_bias", False))
        self.o_bias = not qwen2 and bool(config.get("attention_bias", False))
        self.mlp_bias = bool(config.get("mlp_bias", False))
        self.q, self.k = self.n * self.d, self.n_kv * self.d


def layer_parameters(s):
    """Parameters of one decoder layer: attention, MLP, two RMSNorm weights."""
    attention = s.h * s.q + 2 * s.h * s.k + s.q * s.h
    attention += (s.q + 2 * s.k) * s.qkv_bias + s.h * s.o_bias
    mlp = 3 * s.h * s.inter + (2 * s.inter + s.h) * s.mlp_bias
    return attention + mlp + 2 * s.h


def parameter_counts(s):
    """Parameter counts by group; `root` is what FSDP2's root group holds (not in a decoder layer)."""
    embedding = s.vocab * s.h
    lm_head = 0 if s.tied else s.vocab * s.h
    layer = layer_parameters(s)
    root = embedding + lm_head + s.h  # + the final norm
    return {"embedding": embedding, "lm_head": lm_head, "layer": layer, "layers": s.layers * layer, "root": root,
            "linear": s.layers * (layer - 2 * s.h) + lm_head, "total": root + s.layers * layer}


def lora_parameters(s, rank):
    """LoRA A (r x in) and B (out x r) on q, k, v and o of every layer."""
    return s.layers * rank * ((s.h + s.q) + 2 * (s.h + s.k) + (s.q + s.h))


def layer_activation_bytes(s, tokens, seq_len, mode, reference, padded, lora_rank=8, mask_bytes=1):
    """Bytes autograd saves in one decoder layer for `tokens` tokens in sequences of `seq_len` (bf16, SDPA).
    mode: 'full' or 'lora'; reference: the pass records the sink column (dropout off, d + 8 channels);
    padded: the batch has padding, so SDPA gets a mask and k, v are repeated to the query heads."""
    h, q, n, I, r = s.h, s.q, s.n, s.inter, lora_rank
    width = s.d + SINK_EXTRA_CHANNELS if reference else s.d
    kv_heads = s.n if padded else s.n_kv
    attention = 2 * (n + 2 * kv_heads + n) * width + 4 * n + (2 * seq_len if padded else 0)
    if reference:
        attention += 2 * q  # o_proj's input: the sliced output, copied
    full = mode == "full"
    norms = 2 * ((4 * h + 4) + (4 * h if full else 0))  # fp32 input + rsqrt; bf16 normalised and output (full)
    if full:
        per_token = norms + attention + 8 * I
        return tokens * per_token
    dropout = 0 if reference else mask_bytes
    qkv = (2 * h if reference else 3 * (dropout + 2) * h) + 3 * 2 * r  # adapters' inputs, their rank-r middles
    o = (0 if reference else (dropout + 2) * q) + 2 * r  # the reference pass's o input is saved above
    per_token = norms + qkv + attention + o + 6 * I
    casts = 2 * r * ((s.h + s.q) + 2 * (s.h + s.k) + (s.q + s.h))  # each adapter's A and B cast to bf16
    return tokens * per_token + casts


def outside_layers_bytes(s, tokens, answers, mode, reference):
    """Saved outside the decoder layers: the final norm on every token; the task pass's LM head input (full) and
    fp32 log-probabilities of its answer tokens; the reference pass's sink columns (bf16 and fp32)."""
    full = mode == "full"
    norm = tokens * (4 * s.h + 4 + (2 * s.h if full else 0))
    if reference:
        return norm + tokens * s.layers * s.n * (2 + 4)
    return norm + answers * ((2 * s.h if full else 0) + 4 * s.vocab)


def cross_entropy_transient_bytes(s, answers):
    """Held briefly by the task loss beyond its saved log-probabilities: at the end of the forward the bf16 logits
    and their fp32 copy (6 bytes per vocabulary entry), in its backward the dense fp32 gradients of the
    log-probabilities and of the logits and their bf16 cast (10 bytes)."""
    return answers * 10 * s.vocab


def activations(s, mode, micro_batch, seq_len, ref_batch, ref_len, lora_rank, answer_fraction=1.0, mask_bytes=1):
    """(without checkpointing, with checkpointing) peak bytes of the step's activations on one GPU.
    The task micro-batch is forwarded first, then the references; autograd then runs the references' backward
    first (recorded last, their nodes come first) and frees them before the task loss's backward: the peak is the
    task's saved tensors plus the larger of the references' and the cross-entropy's transient."""
    kind = "full" if mode.startswith("full") else "lora"
    tokens = micro_batch * seq_len
    answers = math.ceil(answer_fraction * tokens)
    task_layer = layer_activation_bytes(s, tokens, seq_len, kind, False, True, lora_rank, mask_bytes)  # padded
    task_outside = outside_layers_bytes(s, tokens, answers, kind, False)
    # Both reference sets in one batch (surgery.sink_divergence), padded: drawn sequences differ in length.
    refs = [(2 * ref_batch * ref_len, layer_activation_bytes(s, 2 * ref_batch * ref_len, ref_len, kind, True, True,
                                                              lora_rank, mask_bytes))] if ref_batch else []
    refs_outside = sum(outside_layers_bytes(s, t, 0, kind, True) for t, _ in refs)
    transient = cross_entropy_transient_bytes(s, answers)
    plain = s.layers * task_layer + task_outside + max(s.layers * sum(b for _, b in refs) + refs_outside, transient)
    kept = 2 * s.h * s.layers  # with checkpointing: each layer's bf16 input
    recompute = max([task_layer] + [b for _, b in refs])  # one layer at a time, the largest pass
    checkpointed = (kept * tokens + task_outside +
                    max(kept * sum(t for t, _ in refs) + refs_outside + recompute, transient))
    return plain, checkpointed


def plan_rows(s, mode, gpus, args):
    """One row per GPU count: bytes per GPU of each part."""
    counts = parameter_counts(s)
    P = counts["total"]
    rows = []
    for N in gpus:
        micro = args.micro_batch or math.ceil(args.batch_size / (N * args.grad_accum))
        plain, ckpt = activations(s, mode, micro, args.seq_len, args.ref_batch, args.ref_len, args.lora_rank,
                                  args.answer_fraction)
        if mode == "lora-bf16":
            L = lora_parameters(s, args.lora_rank)
            row = {"weights": 2 * P + 4 * L, "grads": 4 * L, "optimizer": 8 * L, "buffers": 4 * L if N > 1 else 0,
                   "step": 4 * L}
        else:
            w = 2 if mode == "full-bf16" else 4
            row = {"weights": w * P / N, "grads": w * P / N, "optimizer": 2 * w * P / N,
                   "buffers": (w * (counts["root"] + 2 * counts["layer"]) + w * counts["root"]) if N > 1 else 0,
                   "step": w * P / N}
            if mode == "full-fp32":  # autocast's bf16 weight copies, saved for backward
                plain += 2 * counts["linear"]
                ckpt += 2 * ((counts["layer"] - 2 * s.h) + counts["lm_head"])
        row.update(gpus=N, micro_batch=micro, act_plain=plain, act_ckpt=ckpt)
        static = row["weights"] + row["grads"] + row["optimizer"] + row["buffers"]
        # The activations are freed before the optimizer step, whose temporary may be the larger.
        row.update(total_plain=static + max(plain, row["step"]), total_ckpt=static + max(ckpt, row["step"]))
        rows.append(row)
    return rows


def load_config(path):
    """A config.json, or the one in a model folder (a multimodal config's text_config if it has one)."""
    path = Path(path)
    config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    return config.get("text_config", config)


def build_parser():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a model's config.json or model folder (Llama, Mistral, Qwen2); default: Llama-3-8B's numbers")
    p.add_argument("--mode", default=",".join(MODES),
                   help=f"comma-separated modes among {', '.join(MODES)} (default: all)")
    p.add_argument("--gpus", default="1,2,4,8", help="comma-separated GPU counts (default 1,2,4,8)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per task sequence, surgery.py's --max-len (default 512; every sequence taken at "
                        "full length)")
    p.add_argument("--batch-size", type=int, default=10, help="global batch, surgery.py's --batch-size (default 10, "
                                                              "the released code's)")
    p.add_argument("--grad-accum", type=int, default=1, help="surgery.py's --grad-accum (default 1)")
    p.add_argument("--micro-batch", type=int,
                   help="sequences per forward on each GPU, for every GPU count (default: ceil(batch-size / "
                        "(GPUs x grad-accum)))")
    p.add_argument("--ref-batch", type=int, default=1,
                   help="harmful and harmless reference sequences per step, each (surgery.py's --ref-batch; "
                        "default 1 as the released code; 0: plain SFT, no reference passes)")
    p.add_argument("--ref-len", type=int, default=512,
                   help="tokens per reference sequence (default 512: the released code's truncation)")
    p.add_argument("--answer-fraction", type=float, default=1.0,
                   help="share of task tokens that are answer tokens (the loss and the LM head cover only those; "
                        "default 1: an upper bound)")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank for lora-bf16 (default 8)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    modes = [m for m in args.mode.split(",") if m]
    if not modes or not set(modes) <= set(MODES):
        p.error(f"--mode: among {', '.join(MODES)}")
    try:
        gpus = [int(g) for g in args.gpus.split(",")]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 1:
        p.error("--gpus: comma-separated positive integers")
    for flag in ("seq_len", "batch_size", "grad_accum", "ref_len", "lora_rank"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.answer_fraction <= 1:
        p.error("--answer-fraction must be in [0, 1]")
    if args.ref_batch < 0 or (args.micro_batch is not None and args.micro_batch < 1):
        p.error("--ref-batch must be >= 0 and --micro-batch >= 1")
    try:
        s = Shape(load_config(args.config) if args.config else LLAMA3_8B)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"memory_plan.py: error: {args.config}: {e}")
    counts = parameter_counts(s)
    name = args.config or "Llama-3-8B"
    print(f"{name}: {counts['total']:,} parameters ({counts['layers']:,} in {s.layers} decoder layers, "
          f"{counts['root']:,} in embedding, final norm and LM head{', tied' if s.tied else ''})")
    print(f"task {args.seq_len} tokens, batch {args.batch_size}, grad-accum {args.grad_accum}; "
          + (f"references 2 x {args.ref_batch} x {args.ref_len} tokens per step" if args.ref_batch else
             "no references (plain SFT)"))
    head = (f"{'GPUs':>4} {'micro':>5} {'weights':>8} {'grads':>8} {'AdamW':>8} {'buffers':>8} {'step':>8} "
            f"{'act':>8} {'act ckpt':>8} {'total':>8} {'total ckpt':>10}")
    for mode in modes:
        print(f"\n{mode} (GiB per GPU)")
        print(head)
        for row in plan_rows(s, mode, gpus, args):
            print(f"{row['gpus']:>4} {row['micro_batch']:>5} " + " ".join(
                f"{row[k] / GiB:>8.1f}" for k in ("weights", "grads", "optimizer", "buffers", "step", "act_plain",
                                                  "act_ckpt", "total_plain")) + f" {row['total_ckpt'] / GiB:>10.1f}")


if __name__ == "__main__":
    main()
