"""sinkcheck command line: audit the attention-sink divergence of a checkpoint (exit 0 ok, 1 gate failed, 2 bad input)."""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

EXIT_OK, EXIT_GATE, EXIT_BAD_INPUT = 0, 1, 2

DESCRIPTION = """\
Audit the attention-sink divergence of a Llama-family checkpoint (Llama incl. SmolLM2, Mistral, Qwen2).

For every layer and query head h, a_h(X) is the mean over probe sequences of the mean attention weight
that queries after the sink position put on the sink; the divergence is d_h = a_h(harmful) - a_h(harmless),
computed in fp32 by an independent C++ forward pass. Heads with d_h > 0 are "positive"."""

EPILOG = """\
probes, in order of preference:
  --probes FILE       a JSON object {"sink_position": s, "harmful": [[ids]...], "harmless": [[ids]...]}, or
                      JSONL text records {"instruction": ..., "output": ..., "harmful": true|false}, tokenized
                      with the model folder's tokenizer and chat template (prompt, then answer), sink at 0
  PATH's metadata     the probes surgery.py stores under "sinkcheck.probes" in the safetensors __metadata__
  OTHER's metadata    with --compare, when PATH has none (e.g. PATH is the model before fine-tuning)

exit status: 0 done, 1 more positive heads than --max-positive, 2 bad input (one line on stderr)."""


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit 2, like every other bad input.
        raise UsageError(f"{message} (see sinkcheck --help)")


def build_parser():
    p = Parser(prog="sinkcheck", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="PATH",
                   help="the checkpoint: a .safetensors file, a model folder, or a model.safetensors.index.json; "
                        "config.json (and for text probes the tokenizer files) must sit beside the weights")
    p.add_argument("--probes", metavar="FILE", help="probe file (token ids as JSON, or JSONL text records; see below)")
    p.add_argument("--json", metavar="OUT", help='write {"sink_position", "divergence": [[d per head] per layer], '
                                                 '"positive"} (and "compare" with --compare) to OUT, atomically')
    p.add_argument("--max-positive", metavar="N", type=int,
                   help="exit with status 1 when PATH has more than N positive-divergence heads (a release gate)")
    p.add_argument("--compare", metavar="OTHER_PATH",
                   help="also audit OTHER_PATH with the same probes and show both side by side, with the heads "
                        "whose sign flipped (A = PATH, B = OTHER_PATH); the gate still applies to PATH")
    p.add_argument("--threads", metavar="N", type=int, default=0,
                   help="compute threads (default: one per CPU core)")
    p.add_argument("--top", metavar="K", type=int, default=10, help="how many of the largest divergences to list")
    return p


class ProgressLine:
    """A single updating progress line on stderr, only when stderr is a terminal."""

    def __init__(self, label):
        self.label = label
        self.enabled = sys.stderr.isatty()
        self.start = time.monotonic()

    def __call__(self, done, total):
        if self.enabled:
            rate = done / max(time.monotonic() - self.start, 1e-9)
            print(f"\r{self.label}: {done}/{total} tokens ({rate:.0f} tokens/s)", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled:
            print(file=sys.stderr, flush=True)


def write_json_atomically(path, obj):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_probes(args, core, probes_mod):
    if args.probes:
        return probes_mod.from_file(args.probes, core.checkpoint_directory(args.path))
    for candidate in [args.path] + ([args.compare] if args.compare else []):
        found = probes_mod.from_metadata(candidate)
        if found is not None:
            return found
    raise probes_mod.ProbeError(f"no probes found: {args.path} has no '{probes_mod.METADATA_KEY}' metadata"
                                + (f" and neither has {args.compare}" if args.compare else "")
                                + "; pass --probes FILE")


def audit(path, probes, threads, core):
    label = Path(path).name or str(path)
    model = core.Model(str(path), threads=threads)
    progress = ProgressLine(f"sinkcheck {label}")
    try:
        return model.sink_divergence(probes.harmful, probes.harmless, probes.sink_position, progress=progress)
    finally:
        progress.close()


def run(argv):
    args = build_parser().parse_args(argv)
    if args.max_positive is not None and args.max_positive < 0:
        raise UsageError("--max-positive must be non-negative")
    if args.threads < 0:
        raise UsageError("--threads must be non-negative")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UsageError(f"--json {args.json}: folder {Path(args.json).resolve().parent} does not exist")

    from . import _core as core
    from . import probes as probes_mod
    from . import report

    probes = load_probes(args, core, probes_mod)
    print(f"probes: {probes.source}: {len(probes.harmful)} harmful, {len(probes.harmless)} harmless, "
          f"sink position {probes.sink_position}", file=sys.stderr)
    result = audit(args.path, probes, args.threads, core)
    out = {"sink_position": probes.sink_position, "divergence": result["divergence"], "positive": result["positive"]}
    if args.compare:
        other = audit(args.compare, probes, args.threads, core)
        if [len(r) for r in other["divergence"]] != [len(r) for r in result["divergence"]]:
            print("note: the two checkpoints have different layer/head counts; showing each alone", file=sys.stderr)
            print(report.single_table(result, args.top))
            print(report.single_table(other, args.top))
        else:
            print(report.compare_table(result, other, args.path, args.compare, args.top))
        flips = report.sign_flips(result["divergence"], other["divergence"]) if len(
            other["divergence"]) == len(result["divergence"]) else []
        out["compare"] = {"path": str(args.compare), "divergence": other["divergence"], "positive": other["positive"],
                          "sign_flips": [{"layer": l, "head": h, "d": a, "d_compare": b} for l, h, a, b in flips]}
    else:
        print(report.single_table(result, args.top))
    if args.json:
        write_json_atomically(args.json, out)
    if args.max_positive is not None and result["positive"] > args.max_positive:
        print(f"sinkcheck: {result['positive']} positive-divergence heads exceed --max-positive {args.max_positive}",
              file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        from . import _core
        from .probes import ProbeError
        known = (UsageError, ProbeError, _core.CheckError)
    except ImportError as e:
        print(f"sinkcheck: error: the C++ extension is not built ({e}); run pip install .", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return run(argv)
    except known as e:
        message = str(e)
    except OSError as e:
        message = f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    except MemoryError:
        message = "out of memory"
    except KeyboardInterrupt:
        print("sinkcheck: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback: one line, still exit 2
        message = f"unexpected {type(e).__name__}: {e}"
    print(f"sinkcheck: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
