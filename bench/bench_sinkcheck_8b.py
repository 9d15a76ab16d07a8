"""Benchmark: sinkcheck's peak memory and speed on Llama-3-8B-shaped checkpoints, at several depths.

For each layer count it writes a checkpoint shaped like Llama-3.1-8B (hidden 4096, 32 query and 8 key/value
heads of 128, intermediate 14336, vocabulary 128256, untied LM head, rope_theta 500000 with llama3 scaling
factor 8 / low 1 / high 4 / original 8192, as in meta-llama/Llama-3.1-8B's config.json) with random bf16 weights
(normal, std 0.02; norm weights 1), sharded as transformers' save_pretrained shards (model-0000X-of-0000N
.safetensors of at most --shard-gb each + model.safetensors.index.json). Shards are written one at a time and
tensors generated one at a time, so making a 32-layer checkpoint (16 GB on disk) needs about one shard of RAM.

Then it runs the sinkcheck command line on it in a child process, once per --threads value, with token-id probes
(random ids after a shared 8-token prefix, as a chat template makes), and reads its peak resident set (ru_maxrss
from os.wait4 in a small launcher process, see LAUNCHER; file-backed pages of the mapped checkpoint count too)
and wall time.
tokens/s = probe tokens / wall time of the whole command (start-up, checkpoint checks, conversion and compute).

With --baseline REF, the sinkcheck of that git revision (built once into build/baseline/, see
bench_sinkcheck.build_baseline) is measured too, at the smallest layer count only: it converts every weight to
fp32 when it opens a checkpoint, so its memory grows about 1.2 GB per layer (39 GB at 32 layers).

The checkpoint is deleted after its measurements unless --keep is given.

    .venv/bin/python bench/bench_sinkcheck_8b.py [--layers 4,32] [--threads 1,2] [--dir /tmp/sinkcheck-8b]
        [--probes 4] [--probe-len 24] [--shard-gb 5] [--baseline REF] [--keep]
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SINKCHECK = str(Path(sys.executable).with_name("sinkcheck"))

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256


def config(n_layers):
    """meta-llama/Llama-3.1-8B's config.json, with num_hidden_layers changed."""
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": HEAD_DIM, "hidden_act": "silu",
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": HEADS, "num_hidden_layers": n_layers, "num_key_value_heads": KV_HEADS,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": VOCAB,
    }


def tensor_shapes(n_layers):
    """(name, shape) in the order transformers writes a LlamaForCausalLM."""
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for l in range(n_layers):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (HIDDEN,)),
                (p + "self_attn.q_proj.weight", (q, HIDDEN)), (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
                (p + "self_attn.v_proj.weight", (kv, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, q)),
                (p + "post_attention_layernorm.weight", (HIDDEN,)),
                (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def random_bf16(shape, generator):
    """Normal(0, 0.02) in bf16 for matrices, ones for norm weights; made in row blocks so the fp32 temporary
    stays small."""
    import torch
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    step = max(1, (1 << 24) // shape[1])
    for start in range(0, shape[0], step):
        rows = min(step, shape[0] - start)
        out[start:start + rows] = (torch.randn((rows, shape[1]), generator=generator) * 0.02).to(torch.bfloat16)
    return out


def write_checkpoint(folder, n_layers, shard_gb, seed=0):
    """A sharded Llama-3-8B-shaped bf16 checkpoint; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    limit = int(shard_gb * 1e9)
    shards, current, size = [], [], 0
    for name, shape in tensor_shapes(n_layers):
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_bf16(shape, generator) for name, shape in shard}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config(n_layers), indent=2))
    return total


def write_probes(path, n, length, seed=0):
    import random
    rng = random.Random(seed)
    prefix = [128000, 128006, 882, 128007, 271, 40, 1097, 264]  # shared, like a chat template's opening
    make = lambda: [prefix + [rng.randrange(VOCAB) for _ in range(length - len(prefix))] for _ in range(n)]
    probes = {"sink_position": 0, "harmful": make(), "harmless": make()}
    path.write_text(json.dumps(probes))
    return sum(map(len, probes["harmful"])) + sum(map(len, probes["harmless"]))


# Runs the command in a grandchild and prints its wait4 rusage. A process's ru_maxrss starts from the RSS of the
# process that forked it (Linux keeps the pre-exec high-water mark), and this benchmark's own process holds
# gigabytes after writing a checkpoint, so the command is started from this small launcher instead.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


def measure(command, env=None):
    """(wall seconds, peak RSS bytes, exit status, stderr) of one run of `command`."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, result["maxrss_kb"] * 1024, result["code"], done.stderr


def main():
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="4,32", help="comma-separated layer counts (default 4,32)")
    parser.add_argument("--threads", default="1,2", help="comma-separated sinkcheck --threads values (default 1,2)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sinkcheck-8b"), help="where checkpoints are written")
    parser.add_argument("--probes", type=int, default=4, help="harmful and harmless probes each (default 4)")
    parser.add_argument("--probe-len", type=int, default=24, help="tokens per probe (default 24)")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GB (default 5, as save_pretrained)")
    parser.add_argument("--baseline", metavar="REF", help="also measure this git revision's sinkcheck (smallest depth)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    layer_counts = [int(x) for x in args.layers.split(",")]
    thread_counts = [int(x) for x in args.threads.split(",")]

    baseline_env = None
    if args.baseline:
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_sinkcheck import build_baseline
        baseline_dir, sha = build_baseline(args.baseline)
        baseline_env = dict(os.environ, PYTHONPATH=str(baseline_dir))
        print(f"baseline: {args.baseline} = {sha[:12]}, built in {baseline_dir}")

    args.dir.mkdir(parents=True, exist_ok=True)
    probes = args.dir / "probes.json"
    tokens = write_probes(probes, args.probes, args.probe_len)
    print(f"probes: {args.probes} harmful + {args.probes} harmless, {tokens} tokens; machine: {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for n_layers in layer_counts:
        folder = args.dir / f"llama3-8b-shaped-{n_layers}l"
        start = time.perf_counter()
        if not (folder / "model.safetensors.index.json").exists():
            size = write_checkpoint(folder, n_layers, args.shard_gb)
            made = f"written in {time.perf_counter() - start:.0f} s"
        else:
            size = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
            made = "kept from an earlier run"
        n_shards = len(list(folder.glob("model-*.safetensors")))
        print(f"{n_layers} layers: {size / 1e9:.2f} GB in {n_shards} shards ({made})", flush=True)
        runs = [("sinkcheck", t, None) for t in thread_counts]
        if baseline_env and n_layers == min(layer_counts):
            runs += [(f"baseline {args.baseline}", t, baseline_env) for t in thread_counts[:1]]
        for label, threads, env in runs:
            command = ([sys.executable, "-m", "sinkcheck.cli"] if env else [SINKCHECK]) + [
                str(folder), "--probes", str(probes), "--threads", str(threads), "--json", str(args.dir / "out.json")]
            seconds, rss, code, stderr = measure(command, env)
            if code != 0:
                print(f"  {label} failed (exit {code}): {stderr.strip()[-500:]}")
                continue
            positive = json.loads((args.dir / "out.json").read_text())["positive"]
            rows.append((n_layers, label, threads, rss, tokens / seconds))
            print(f"  {label:<22} --threads {threads}: peak RSS {rss / 2**30:6.2f} GiB, {seconds:7.1f} s, "
                  f"{tokens / seconds:6.2f} tokens/s (positive heads {positive})", flush=True)
        if not args.keep:
            shutil.rmtree(folder)

    ours = {(n, t): rss for n, label, t, rss, _ in rows if label == "sinkcheck"}
    if len(layer_counts) >= 2:
        low, high = min(layer_counts), max(layer_counts)
        for t in thread_counts:
            if (low, t) in ours and (high, t) in ours:
                ratio = ours[high, t] / ours[low, t]
                print(f"peak RSS {high} layers / {low} layers at --threads {t}: {ratio:.3f} "
                      f"({ours[high, t] / 2**30:.2f} GiB vs {ours[low, t] / 2**30:.2f} GiB)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if not args.keep:
        for name in ("probes.json", "out.json"):
            (args.dir / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
