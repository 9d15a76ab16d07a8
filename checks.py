"""surgery.py's input checks: everything a user can get wrong is found here, before anything is written, and
reported as one line (a UserError, exit 2).

    check_command_line  the flags alone, and the output folder (before any file is read)
    resolve_defaults    the embedded default model and data (offline/) for what the command line leaves out
    check_model         a model folder or hub id, from its config and tokenizer, before any weight is read
    load_model          the model and tokenizer, with every library error turned into one line
    check_sequences     the data against the model (token ids, references long enough for the sink)
    check_finite        a step's loss and gradient norm; the sink values before and the weights after training
"""
import contextlib
import math
import os
import re
from pathlib import Path

import torch

from checkpoints import checkpoint_note
from common import NonFiniteError, UserError, first_line


def check_command_line(args):
    """Everything about the command line that can be checked before a file is read."""
    check_flags(args)
    check_output_folder(args)


def resolve_defaults(args):
    """No --model / --data: the embedded defaults from PyPI packages (offline/)."""
    if args.model is None or args.data is None or args.harmful_ref is None or args.harmless_ref is None:
        import offline
        try:
            if args.model is None:
                args.model = str(offline.default_model_dir())
            if args.data is None or args.harmful_ref is None or args.harmless_ref is None:
                default = offline.default_data()
                args.data = args.data or default["train"]
                args.harmful_ref = args.harmful_ref or default["harmful_ref"]
                args.harmless_ref = args.harmless_ref or default["harmless_ref"]
        except offline.OfflineDataError as e:
            raise UserError(str(e)) from None


def check_flags(args):
    """The flags alone: types are argparse's, ranges and combinations are checked here."""
    for flag in ("batch_size", "grad_accum", "ref_batch", "lora_rank", "probe_count", "max_len", "log_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("alpha", "lr", "lora_alpha", "lora_dropout", "epochs", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(args, flag)):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}")
    for flag in ("alpha", "sink_pos", "warmup_steps", "weight_decay", "grad_clip", "save_every"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.lr <= 0 or args.lora_alpha <= 0:
        raise UserError(f"--lr and --lora-alpha must be > 0, got {args.lr:g} and {args.lora_alpha:g}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout:g}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.max_steps is None and args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs:g}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2^63 - 1, got {args.seed}")
    if args.sink_pos >= args.max_len - 1:
        raise UserError(f"--sink-pos {args.sink_pos} leaves no query after the sink within --max-len "
                        f"{args.max_len}: the sink position must be below --max-len - 1")
    if not args.full and not args.lora_targets:
        raise UserError("--lora-targets is empty: name the linear layers to adapt, e.g. q_proj,v_proj")
    for flag in ("model", "data", "harmful_ref", "harmless_ref", "out"):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise UserError(f"--{flag.replace('_', '-')} is empty: name a path (or leave the flag out for the "
                            f"default)")


def check_sequences(model, args, examples, refs):
    """The data against the model: every token id inside its vocabulary, and every reference sequence long
    enough to have a query after the sink (a step draws any of them, and a draw without one has no sink value)."""
    vocabulary = model.get_input_embeddings().num_embeddings
    for kind, sequences in (("task", [ids for ids, _ in examples]), ("harmful reference", refs[0]),
                            ("harmless reference", refs[1])):
        for i, ids in enumerate(sequences, start=1):
            if max(ids, default=0) >= vocabulary:
                raise UserError(f"--model {args.model}: its tokenizer gives token id {max(ids)} in {kind} record {i}, "
                                f"outside the model's {vocabulary} embeddings: the tokenizer and weights do not match")
            if kind != "task" and len(ids) <= args.sink_pos + 1:
                raise UserError(f"{args.harmful_ref if kind.startswith('harmful') else args.harmless_ref}: {kind} "
                                f"record {i} has {len(ids)} tokens (within --max-len {args.max_len}), none after "
                                f"--sink-pos {args.sink_pos}: every reference needs more than {args.sink_pos + 1}")


# What a finished or interrupted run leaves in its output folder (config and tokenizer files aside).
RUN_FILES = ("checkpoint.pt", "train_log.jsonl", "model.safetensors", "adapter", "sink_report.json")


def check_writable_folder(flag, folder):
    """A folder that exists, or can be made, and can be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: is a file, expected a folder")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {existing} is not writable")


def check_output_folder(args):
    """--out must be a folder this run can write, and not one that holds another run (unless --resume continues
    it). Checked before anything is loaded, so a mistake costs nothing and nothing is written."""
    out = Path(args.out)
    check_writable_folder("--out", out)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if args.resume:
        if not (out / "checkpoint.pt").is_file():
            raise UserError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}"
                            + (" (that run finished)" if (out / "sink_report.json").exists() else ""))
    elif "checkpoint.pt" in found:
        raise UserError(f"--out {out}: holds an unfinished run (checkpoint.pt): continue it with --resume, or pass "
                        f"a new --out (or remove the folder) to start another")
    elif found:
        raise UserError(f"--out {out}: already holds a run ({', '.join(found)}): pass a new --out, or remove the "
                        f"folder to run again")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@contextlib.contextmanager
def quiet_loading():
    """No progress bar per file read: on a terminal it is noise, and it would come before an error line."""
    from transformers.utils import logging as transformers_logging
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def check_model(name_or_path):
    """The tokenizer of a local model folder or hub id, after checking from its config and tokenizer (before any
    weight is read) what surgery.py needs: a causal LM whose attention goes through the attention interface, and a
    chat template. Every problem is a UserError naming the model."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise UserError(f"cannot load model {name}: is a file, expected a model folder (config.json, weights, "
                        f"tokenizer)")
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(f"cannot load model {name}: no config.json in this folder, so it is not a transformers "
                        f"model folder")
    if not local.exists() and not HUB_ID.fullmatch(name):
        raise UserError(f"cannot load model {name}: no such model folder")
    with quiet_loading():
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model {model_where(name)}: {first_line(e)}") from None
        architecture = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        if architecture is None:
            raise UserError(f"--model {name}: a {config.model_type!r} model is not a causal language model that "
                            f"transformers knows")
        if not architecture._supports_attention_backend:
            raise UserError(f"--model {name}: {architecture.__name__}'s attention does not go through transformers' "
                            f"attention interface, so its sink values cannot be recorded; use a family that does "
                            f"(Llama, Qwen2, Mistral, Gemma, ...)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"cannot load the tokenizer of {model_where(name)}: {first_line(e)}") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"--model {name}: its tokenizer has no chat template, so records cannot be formatted as "
                        f"conversations; use an instruction-tuned model or add a chat template to its tokenizer")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise UserError(f"--model {name}: its tokenizer has neither a padding nor an end-of-sequence token")
    return tokenizer


def model_where(name):
    return name if Path(name).expanduser().exists() else (
        f"{name} (not a local folder; tried as a hub id: check its spelling, and that the hub is reachable or the "
        f"model is in the local cache)")


def load_model(name_or_path, device, dtype, attn_implementation):
    """Model and tokenizer from a local folder or a hub id, with the given attention implementation. What cannot
    work is found from the config and the tokenizer (check_model), before the weights are read."""
    from transformers import AutoModelForCausalLM
    name = str(name_or_path)
    tokenizer = check_model(name)
    with quiet_loading():
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"cannot load model {model_where(name)}: {first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


LOGGED_VALUES = ("task_loss", "sink_loss", "extra_loss", "grad_norm")


def check_finite(log, checkpoint):
    """Stop on the first step whose loss or gradient norm is NaN or infinite: nothing after it can be a result."""
    bad = [key for key in LOGGED_VALUES if key in log and not math.isfinite(log[key])]
    if bad:
        raise NonFiniteError(f"at step {log['step']} the {bad[0].replace('_', ' ')} is {log[bad[0]]}; "
                             f"{checkpoint_note(checkpoint)}")


def check_divergence_before(divergence, args):
    """The untrained model's sink values on the probes: a NaN here is the model's, not training's."""
    if not torch.isfinite(divergence).all():
        raise UserError(f"--model {args.model}: its sink values on the probes are not finite before any training "
                        f"(NaN or infinite weights, or activations that overflow {args.dtype})")


def check_trained(state, divergence, done, checkpoint):
    """The trained weights and the sink divergence after training: nothing non-finite is written as a result."""
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad or not torch.isfinite(divergence).all():
        raise NonFiniteError(f"after step {done}, {f'weight {bad[0]} holds' if bad else 'the sink divergence is'} "
                             f"NaN or infinity; {checkpoint_note(checkpoint)}")
