"""The comparison defenses of docs/METHOD.md section 3, beside Surgery (surgery.py) and on the same LoRA loop.

    asft.py        AsFT: L = L_task + lambda * sum_m ||(I - C_m) B_m A_m||_F^2, the LoRA update kept along the
                   alignment direction V_m = W_aligned - W_base (an `extra_loss`)
    sap.py         SAP: a zero-initialised probe on the hidden states, stepped each step so that moving the LoRA
                   weights in the unsafe direction costs task loss (a `before_step`)
    safetylock.py  SafetyLock: post-hoc; per-head safe-minus-unsafe directions of the aligned model, baked into
                   o_proj biases of any fine-tuned model of the same family (no training at all)

AsFT and SAP subclass `surgery.Defense` and run through `surgery.main(argv, defense=...)`; their command lines
take their own flags, then `--`, then surgery.py's flags. This file holds what they share: the safety triples
and that command-line pattern.
"""
import argparse
import contextlib
import io
import sys

import surgery
from common import ArgumentParser, UserError, check_given, read_json_rows, same_path

TRIPLE_KEYS = ("instruction", "refusal", "harmful_answer")


def read_triples(path):
    """(instruction, refusal, harmful answer) records from a JSON list or JSONL file (offline.safety_triples's
    format; `safe`/`unsafe` are accepted for the two answers)."""
    rows = read_json_rows(path)
    triples = []
    for i, row in enumerate(rows, start=1):
        row = row if isinstance(row, dict) else {}
        triple = {"instruction": row.get("instruction"), "refusal": row.get("refusal", row.get("safe")),
                  "harmful_answer": row.get("harmful_answer", row.get("unsafe"))}
        if not all(isinstance(v, str) and v.strip() for v in triple.values()):
            raise UserError(f"{path}: record {i} needs non-empty string fields 'instruction', 'refusal' (or "
                            f"'safe') and 'harmful_answer' (or 'unsafe')")
        triples.append(triple)
    if not triples:
        raise UserError(f"{path}: no records")
    return triples


def load_triples(path=None, seed=0):
    """The triples of a file, or by default the offline ones (offline.safety_triples: harmful_ref + refusals)."""
    if path is not None:
        check_given("triples", path)
        return read_triples(path)
    import offline
    try:
        return [{k: t[k] for k in TRIPLE_KEYS} for t in offline.safety_triples(seed)]
    except offline.OfflineDataError as e:
        raise UserError(str(e)) from None


def split_argv(argv):
    """(the defense's own flags, surgery.py's flags): the two sides of the first `--`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def check_loop_output(loop_argv, inputs):
    """surgery.py's --out against the defense's own inputs ((flag, path) pairs; surgery.py checks it against its
    own): the run's folder may not be one of them. The rest of surgery.py's flags are surgery.py's to report."""
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            out = surgery.parse_args(["--alpha", "0", *loop_argv]).out
        except SystemExit:
            return
    for flag, path in inputs:
        if path is not None and str(path).strip() and str(out).strip() and same_path(out, path):
            raise UserError(f"--out {out}: is also an input ({flag} {path}); writing the run there would change "
                            f"that input: name another folder")


def run_in_loop(prog, parser, make_defense, argv=None, inputs=lambda args: ()):
    """`prog [defense flags] -- [surgery.py flags]`: the defense in surgery.py's LoRA loop, Surgery's own term off.
    inputs(args): the defense's own input files and folders, (flag, path) pairs, which surgery.py's --out may not be.

    `--alpha 0` goes first, so an explicit --alpha among surgery.py's flags still wins (argparse keeps the last)."""
    own, loop_argv = split_argv(argv)
    args = parser.parse_args(own)
    try:
        defense = make_defense(args)
        check_loop_output(loop_argv, inputs(args))
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return surgery.main(["--alpha", "0", *loop_argv], defense=defense)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def loop_parser(prog, description, epilog=""):
    return ArgumentParser(
        prog=prog, usage=f"{prog} [options] -- [surgery.py options]", description=description,
        formatter_class=HelpFormatter,
        epilog=(epilog + " " if epilog else "") + "Everything after `--` goes to surgery.py (see `python surgery.py "
                "--help`: --model, --data, --out, --max-steps, --lr, --lora-targets, ...); --alpha defaults to 0 "
                "there, so Surgery's own penalty is off unless asked for. Exit status as surgery.py's: 0 done, 2 bad "
                "input (one line on stderr, nothing written), 3 training diverged, 130 interrupted.")
