"""Benchmark: sinkcheck against transformers' eager attention, the correctness oracle, on the default model.

Both compute the same per-head sink divergence on the same probes (chat-formatted harmful and harmless
reference pairs from the offline data, tokenized as surgery.py does), in fp32, on the same number of threads.
transformers runs the base model without the LM head (which the statistic does not need; sinkcheck skips it
too), one unpadded sequence at a time with output_attentions=True. Prints tokens per second of each and the
ratio, and the largest difference between the two divergences.

With --family qwen3|gemma3|phi3|olmo2 the model is instead a random one of that family with the default model's
shape (30 layers, hidden 576, 9 query and 3 kv heads of 64 dims, MLP 1536, its vocabulary and tokenizer), written
to a temporary folder: the same comparison for a family that has no offline weights. Gemma 3 gets its pattern of
five local layers (128-token window, so it binds on the longer probes) to one global layer.

With --baseline REF it instead compares this sinkcheck with the one of git revision REF (built once into
build/baseline/<sha>/ from `git archive REF`), same probes, at each of --threads-list: each implementation
runs in its own worker process, and every round asks each worker in turn (the order alternating between rounds)
to open the model and audit the probes, so background load hits both alike; the best round counts. It prints
tokens/s of the audit alone (Model.sink_divergence, what this benchmark has always timed: the new sinkcheck
converts weights there, a layer at a time, the old one when the model opens) and of open + audit. Since issue 21
the audit also begins with Model.check_finite, one read of every float tensor for NaN and infinity (about 0.2 s for
SmolLM2's 538 MB in fp32): a revision from before that does not do this work.

    .venv/bin/python bench/bench_sinkcheck.py [--threads 2] [--probes 32] [--max-len 256] [--model DIR]
    .venv/bin/python bench/bench_sinkcheck.py --family gemma3 [--threads 2] [--probes 32] [--max-len 256]
    .venv/bin/python bench/bench_sinkcheck.py --baseline REF [--threads-list 1,2] [--repeats 3] [--probes 16]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import ArgumentParser  # noqa: E402


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


# Family-specific config fields of the random models --family builds; the shape comes from the default model.
FAMILY_FIELDS = {
    "qwen3": dict(model_type="qwen3"),
    "gemma3": dict(model_type="gemma3_text", query_pre_attn_scalar=64, sliding_window=128, sliding_window_pattern=6,
                   hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(model_type="phi3"),
    "olmo2": dict(model_type="olmo2"),
}


def random_family_model(family, like_dir, out_dir):
    """A random `family` model with the shape, vocabulary and tokenizer of the model in `like_dir`, saved to out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    like = json.loads((Path(like_dir) / "config.json").read_text())
    fields = dict(FAMILY_FIELDS[family])
    model_type = fields.pop("model_type")
    shape = {k: like[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                  "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                                  "tie_word_embeddings")}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape, **fields), dtype=torch.float32)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(like_dir)).save_pretrained(out_dir)
    return Path(out_dir)


def build_baseline(ref):
    """The sinkcheck package of git revision `ref`, built once into build/baseline/<sha>; (folder for
    PYTHONPATH, sha)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    target = ROOT / "build" / "baseline" / sha[:12]
    if (target / "sinkcheck" / "__init__.py").exists():
        return target, sha
    with tempfile.TemporaryDirectory() as src:
        archive = subprocess.run(["git", "archive", sha, "pyproject.toml", "CMakeLists.txt", "checker"], cwd=ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                        "--target", str(target), src], check=True)
    return target, sha


# A worker holds one sinkcheck implementation (whichever `import sinkcheck` finds on its PYTHONPATH); for each
# request it opens the model with the given threads and audits the probes.
WORKER = """
import json, sys, time
import sinkcheck
setup = json.loads(sys.stdin.readline())
for line in sys.stdin:
    request = json.loads(line)
    start = time.perf_counter()
    model = sinkcheck.Model(setup["model"], threads=request["threads"])
    opened = time.perf_counter()
    n = request.get("n")
    result = model.sink_divergence(setup["harmful"][:n], setup["harmless"][:n], 0)
    done = time.perf_counter()
    print(json.dumps({"open": opened - start, "audit": done - opened, "positive": result["positive"],
                      "divergence": result["divergence"], "module": sinkcheck.__file__}), flush=True)
"""


class Worker:
    def __init__(self, env, setup):
        self.process = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)
        self.process.stdin.write(json.dumps(setup) + "\n")

    def audit(self, threads, n=None):
        self.process.stdin.write(json.dumps({"threads": threads, "n": n}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"worker exited with status {self.process.wait()}")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def compare_with_baseline(args, model_dir, harmful, harmless, tokens):
    baseline_dir, sha = build_baseline(args.baseline)
    setup = {"model": str(model_dir), "harmful": harmful, "harmless": harmless}
    env_new = dict(os.environ, PYTHONPATH="")
    env_old = dict(os.environ, PYTHONPATH=str(baseline_dir))
    workers = {"new": Worker(env_new, setup), "old": Worker(env_old, setup)}
    threads_list = [int(t) for t in args.threads_list.split(",")]
    for name, worker in workers.items():  # warm-up: page cache, imports, first allocations
        print(f"{name}: {worker.audit(threads_list[0], n=2)['module']}")
    print(f"baseline: {args.baseline} = {sha[:12]}; current: working tree "
          f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}")
    best = {}
    results = {}
    load_before = os.getloadavg()[0]
    for round_ in range(args.repeats):
        for threads in threads_list:
            order = ["old", "new"] if (round_ + threads) % 2 == 0 else ["new", "old"]
            for name in order:
                r = workers[name].audit(threads)
                results[name, threads] = r
                key = (name, threads)
                audit, total = best.get(key, (float("inf"), float("inf")))
                best[key] = (min(audit, r["audit"]), min(total, r["open"] + r["audit"]))
                print(f"  round {round_ + 1} --threads {threads} {name}: open {r['open']:.2f} s, audit {r['audit']:.2f} s",
                      flush=True)
    for worker in workers.values():
        worker.close()
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs); "
          f"best of {args.repeats} interleaved rounds; {tokens} tokens")
    print(f"{'threads':>7}  {'old audit':>12}  {'new audit':>12}  {'new/old':>7}  {'old open+audit':>14}  "
          f"{'new open+audit':>14}  {'new/old':>7}")
    for threads in threads_list:
        old_audit, old_total = best["old", threads]
        new_audit, new_total = best["new", threads]
        print(f"{threads:>7}  {tokens / old_audit:>8.0f} t/s  {tokens / new_audit:>8.0f} t/s  "
              f"{old_audit / new_audit:>7.3f}  {tokens / old_total:>10.0f} t/s  {tokens / new_total:>10.0f} t/s  "
              f"{old_total / new_total:>7.3f}")
        diff = np.abs(np.asarray(results["old", threads]["divergence"]) -
                      np.asarray(results["new", threads]["divergence"])).max()
        print(f"         max |d_new - d_old| = {diff:.2e}; positive heads old {results['old', threads]['positive']}, "
              f"new {results['new', threads]['positive']}")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="threads for both torch and sinkcheck (default 2)")
    parser.add_argument("--probes", type=int, default=32, help="harmful and harmless probes each (default 32)")
    parser.add_argument("--max-len", type=int, default=256, help="truncate probes to this many tokens")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved timing rounds; the best per side counts (default 2)")
    parser.add_argument("--model", help="model folder (default: offline.default_model_dir(), SmolLM2-135M)")
    parser.add_argument("--family", choices=sorted(FAMILY_FIELDS),
                        help="a random model of this family with the default (or --model) model's shape instead")
    parser.add_argument("--baseline", metavar="REF",
                        help="compare with the sinkcheck of this git revision instead of transformers (see above)")
    parser.add_argument("--threads-list", default="1,2", help="with --baseline: thread counts (default 1,2)")
    args = parser.parse_args()

    import sinkcheck
    from transformers import AutoModelForCausalLM
    if args.model:
        model_dir = Path(args.model)
    else:
        import offline
        model_dir = offline.default_model_dir()
    if args.family:
        scratch = tempfile.TemporaryDirectory(prefix=f"bench_{args.family}_")
        model_dir = random_family_model(args.family, model_dir, Path(scratch.name) / args.family)
    torch.set_num_threads(args.threads)
    harmful, harmless = probe_ids(model_dir, args.probes, args.max_len)
    tokens = sum(map(len, harmful)) + sum(map(len, harmless))
    if args.baseline:
        print(f"model {model_dir.name}; {len(harmful)} harmful + {len(harmless)} harmless probes, {tokens} tokens")
        compare_with_baseline(args, model_dir, harmful, harmless, tokens)
        return
    print(f"model {model_dir.name}{' (random weights)' if args.family else ''}; {len(harmful)} harmful + "
          f"{len(harmless)} harmless probes, {tokens} tokens; {args.threads} threads; torch {torch.__version__}")

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
