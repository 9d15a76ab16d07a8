"""Shared helpers for the sinkcheck tests: tiny checkpoints, the eager-attention oracle, CLI runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from tiny import tiny_model

SINKCHECK = str(Path(sys.executable).with_name("sinkcheck"))


def save_checker_model(directory, family="llama", dtype=torch.float32, seed=0, **overrides):
    """A tiny model folder like tiny.save_tiny, with biases and norm weights randomised too, so that every
    parameter the checker reads changes the result."""
    model, tokenizer = tiny_model(family, seed=seed, **overrides)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=generator) * 0.2)
    directory = Path(directory)
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_eager(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager",
                                                dtype=torch.float32).eval()


def eager_sink_means(model, sequences, sink=0):
    """a_h(X) per layer and head from transformers' eager attention in fp32: the correctness oracle.
    `model` is a loaded model or a model folder."""
    if not isinstance(model, torch.nn.Module):
        model = load_eager(model)
    total, count = None, 0
    with torch.no_grad():
        for seq in sequences:
            if len(seq) <= sink + 1:
                continue
            attentions = model(torch.tensor([seq]), output_attentions=True).attentions
            per_seq = np.stack([a[0, :, sink + 1:, sink].double().mean(-1).numpy() for a in attentions])
            total = per_seq if total is None else total + per_seq
            count += 1
    return total / count


def eager_divergence(model_dir, harmful, harmless, sink=0):
    model = load_eager(model_dir)
    return eager_sink_means(model, harmful, sink) - eager_sink_means(model, harmless, sink)


def random_sequences(n, vocab, lengths, seed=0, prefix=()):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        out.append(list(prefix) + torch.randint(0, vocab, (length,), generator=generator).tolist())
    return out


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([SINKCHECK, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def write_probes(path, harmful, harmless, sink=0):
    Path(path).write_text(json.dumps({"sink_position": sink, "harmful": harmful, "harmless": harmless}))
    return path
