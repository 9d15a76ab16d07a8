"""sinkcheck command line: audit the attention-sink divergence of a checkpoint (exit 0 ok, 1 gate failed, 2 bad input)."""
import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import files

EXIT_OK, EXIT_GATE, EXIT_BAD_INPUT = 0, 1, 2

DESCRIPTION = """\
Audit the attention-sink divergence of a decoder checkpoint: Llama (incl. SmolLM2), Mistral, Qwen2, Qwen3,
Gemma 3 (text), Phi-3 and OLMo 2.

For every layer and query head h, a_h(X) is the mean over probe sequences of the mean attention weight
that queries after the sink position put on the sink; the divergence is d_h = a_h(harmful) - a_h(harmless),
computed in fp32 by an independent C++ forward pass. Heads with d_h > 0 are "positive"."""

EPILOG = """\
probes, in order of preference (the report and --json name the set used: "file:FILE", "metadata", "built-in"):
  --probes FILE       a JSON object {"sink_position": s, "harmful": [[ids]...], "harmless": [[ids]...]}, or
                      JSONL text records {"instruction": ..., "output": ..., "harmful": true|false}, tokenized
                      with the model folder's tokenizer and chat template (prompt, then answer), sink at 0
  PATH's metadata     the probes surgery.py stores under "sinkcheck.probes" in the safetensors __metadata__
  OTHER's metadata    with --compare, when PATH has none (e.g. PATH is the model before fine-tuning)
  built-in            the text records shipped with sinkcheck (sinkcheck/data/builtin_probes.jsonl),
                      tokenized with the model folder's tokenizer and chat template

exit status: 0 done, 1 more positive heads than --max-positive, 2 bad input (one line on stderr, no output
file written): bad flags, unreadable or malformed files, unsupported models, bad probes, and checkpoints
holding a NaN or infinity in any floating-point tensor (named with the element), or whose activations
overflow (named by layer).
On a terminal, a line per layer on stderr shows progress and an estimate of the time left."""


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit 2, like every other bad input.
        raise UsageError(f"{message} (see sinkcheck --help)")


def build_parser():
    p = Parser(prog="sinkcheck", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,  # --jso is no --json
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
                   help=f"compute threads, 0 to {MAX_THREADS} (default 0: one per CPU core)")
    p.add_argument("--top", metavar="K", type=int, default=10,
                   help="how many of the largest divergences to list (at least 1)")
    return p


MAX_THREADS = 1024
INT_MAX = 2**31 - 1


def check_args(args):
    """Range checks argparse cannot do, and the --json target, before any file is read."""
    if args.max_positive is not None and not 0 <= args.max_positive <= INT_MAX:
        raise UsageError(f"--max-positive must be between 0 and {INT_MAX}, got {args.max_positive}")
    if not 0 <= args.threads <= MAX_THREADS:
        raise UsageError(f"--threads must be between 0 and {MAX_THREADS}, got {args.threads}")
    if not 1 <= args.top <= INT_MAX:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    for flag in ("probes", "json", "compare"):  # an empty string is a value, not an absence
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise UsageError(f"--{flag} is empty: name a {'folder or ' if flag == 'compare' else ''}file")
    if args.json is not None:
        target = Path(args.json)
        folder = target.resolve().parent
        if not folder.exists():
            raise UsageError(f"--json {args.json}: folder {folder} does not exist")
        if not folder.is_dir():
            raise UsageError(f"--json {args.json}: {folder} is not a folder")
        if target.is_dir():
            raise UsageError(f"--json {args.json}: is a folder, expected a file name")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"--json {args.json}: folder {folder} is not writable")


def duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    """A line on stderr per layer done, with the time left estimated from the work done so far (token rows x
    layers); only when stderr is a terminal and once the audit has run `quiet_seconds`, so short audits stay
    quiet. `stream`, `enabled` and `quiet_seconds` are for tests."""

    def __init__(self, label, stream=None, enabled=None, quiet_seconds=2.0):
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.quiet_seconds = quiet_seconds
        self.start = time.monotonic()
        self.steps_shown = 0

    def __call__(self, done, total, steps_done, steps_total):
        if not self.enabled or steps_done <= self.steps_shown:
            return
        elapsed = time.monotonic() - self.start
        if elapsed < self.quiet_seconds:
            return
        self.steps_shown = steps_done
        left = elapsed * (total - done) / done if done > 0 else 0.0
        print(f"{self.label}: layer {steps_done}/{steps_total} done, {duration(elapsed)} elapsed, "
              f"about {duration(left)} left", file=self.stream, flush=True)

    def close(self):
        pass


def write_json_atomically(path, obj):
    path = Path(path)
    # A SIGTERM or Ctrl-C after mkstemp made the file but before `tmp` is known here would leave it behind: both
    # are held until then (the handlers run at the unmask, inside the try).
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            previous = None
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, allow_nan=False)  # strict JSON: a NaN here is a bug, not a number to write
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def load_probes(args, core, probes_mod):
    if args.probes is not None:
        return probes_mod.from_file(args.probes, core.checkpoint_directory(args.path))
    for candidate in [args.path] + ([args.compare] if args.compare else []):
        found = probes_mod.from_metadata(candidate)
        if found is not None:
            return found
    where = f"{args.path} has no '{probes_mod.METADATA_KEY}' metadata" + (
        f" and neither has {args.compare}" if args.compare else "")
    return probes_mod.builtin(core.checkpoint_directory(args.path), where)


def audit(model, path, probes):
    label = Path(path).resolve().name or str(path)
    progress = ProgressLine(f"sinkcheck {label}")
    try:
        return model.sink_divergence(probes.harmful, probes.harmless, probes.sink_position, progress=progress)
    finally:
        progress.close()


def run(argv):
    args = build_parser().parse_args(argv)
    check_args(args)
    # Every file the C++ loader and the tokenizer will open is a regular file (a FIFO would block them), and --json
    # is none of them: files.py, the one way sinkcheck opens its inputs and chooses its output.
    inputs = files.check_checkpoint("PATH", args.path)
    if args.compare is not None:
        inputs += files.check_checkpoint("--compare", args.compare)
    inputs += [Path(p) for p in (args.path, args.compare, args.probes) if p is not None]
    if args.json is not None:
        files.check_output("--json", args.json, inputs)

    from . import _core as core
    from . import probes as probes_mod
    from . import report

    # Both checkpoints are opened (every header, tensor shape and config checked; no weight is read yet) before
    # any compute, so a bad --compare fails in a second, not after the first audit.
    model = core.Model(str(args.path), threads=args.threads)
    other_model = core.Model(str(args.compare), threads=args.threads) if args.compare else None
    probes = load_probes(args, core, probes_mod)
    # Then every floating-point tensor of both, streamed (the audits would check only what they read): a NaN or
    # infinity anywhere, the LM head included, is bad input before either audit computes.
    for m in (model, other_model):
        if m is not None:
            m.check_finite()
    result = audit(model, args.path, probes)
    del model  # its layer buffers go before the second audit fills its own
    other = audit(other_model, args.compare, probes) if args.compare else None
    del other_model
    print(f"probe set: {probes.kind} ({probes.source}): {len(probes.harmful)} harmful, {len(probes.harmless)} "
          f"harmless, sink position {probes.sink_position}")
    out = {"sink_position": probes.sink_position, "divergence": result["divergence"], "positive": result["positive"],
           "probe_set": probes.kind}
    if args.compare:
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
    if args.json is not None:
        write_json_atomically(args.json, out)
    if args.max_positive is not None and result["positive"] > args.max_positive:
        print(f"sinkcheck: {result['positive']} positive-divergence heads exceed --max-positive {args.max_positive}",
              file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def _terminate(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so a --json temporary file is removed on the way out.
    raise KeyboardInterrupt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        pass
    try:
        from . import _core
        from .files import InputError
        from .probes import ProbeError
        known = (UsageError, ProbeError, InputError, _core.CheckError)
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
