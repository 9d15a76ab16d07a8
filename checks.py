"""surgery.py's input checks: everything a user can get wrong is found here, before anything is written, and
reported as one line (a UserError, exit 2).

    check_command_line  the flags alone (types, ranges with upper bounds too), and the output folder (before any
                        file is read)
    resolve_defaults    the embedded default model and data (offline/) for what the command line leaves out
    check_model         a model folder or hub id, from its config (every size a bounded integer), a skeleton of
                        the model on the meta device against the weights' headers, and its tokenizer, before any
                        weight is read
    load_model          the model and tokenizer, with every library error turned into one line, and a weight
                        missing from (or unexpected in) the checkpoint an error, not a warning
    check_sequences     the data and the flags against the model (token ids, references long enough for the sink,
                        the LoRA rank within the adapted layers, the number of steps)
    check_finite        a step's loss and gradient norm; the sink values before and the weights after training
"""
import contextlib
import math
import re
import warnings
from pathlib import Path

import torch

from checkpoints import MAX_STEPS, checkpoint_note
from common import (NonFiniteError, UserError, cause, check_folder_files, check_given, check_input_file,
                    check_output, first_line, read_json)


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


# Upper bounds of surgery.py's flags: beyond them a run cannot fit in memory or finish, so the flag is a typo; each
# is checked before anything is read or written (--lora-rank also against the adapted layers, once the model is
# known: check_sequences).
MAX_EPOCHS = 10_000
FLAG_BOUNDS = {"batch_size": 1 << 20, "grad_accum": 4096, "ref_batch": 1024, "lora_rank": 1 << 16,
               "probe_count": 1 << 20, "max_len": 1 << 20, "log_every": MAX_STEPS, "max_steps": MAX_STEPS,
               "warmup_steps": MAX_STEPS, "save_every": MAX_STEPS}


def check_flags(args):
    """The flags alone: types are argparse's, ranges (lower and upper bounds) and combinations are checked here."""
    for flag in ("model", "data", "harmful_ref", "harmless_ref", "out"):
        check_given(flag, getattr(args, flag), " (or leave the flag out for the default)")
    for flag in ("batch_size", "grad_accum", "ref_batch", "lora_rank", "probe_count", "max_len", "log_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("alpha", "lr", "lora_alpha", "lora_dropout", "epochs", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(args, flag)):
            raise UserError(f"--{flag.replace('_', '-')} must be a finite number, got {getattr(args, flag)}")
    for flag in ("alpha", "sink_pos", "warmup_steps", "weight_decay", "grad_clip", "save_every"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    for flag, bound in FLAG_BOUNDS.items():
        if getattr(args, flag) is not None and getattr(args, flag) > bound:
            raise UserError(f"--{flag.replace('_', '-')} must be at most {bound:,}, got {getattr(args, flag):,}")
    if args.lr <= 0 or args.lora_alpha <= 0:
        raise UserError(f"--lr and --lora-alpha must be > 0, got {args.lr:g} and {args.lora_alpha:g}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout:g}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.max_steps is None and args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs:g}")
    if args.epochs > MAX_EPOCHS:
        raise UserError(f"--epochs must be at most {MAX_EPOCHS:,}, got {args.epochs:g}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2^63 - 1, got {args.seed}")
    if args.sink_pos >= args.max_len - 1:
        raise UserError(f"--sink-pos {args.sink_pos} leaves no query after the sink within --max-len "
                        f"{args.max_len}: the sink position must be below --max-len - 1")
    if not args.full and not args.lora_targets:
        raise UserError("--lora-targets is empty: name the linear layers to adapt, e.g. q_proj,v_proj")


def check_lora_rank(model, rank, targets, flag="--lora-rank"):
    """A LoRA rank above the smaller side of an adapted layer adds parameters and no rank: refused (the bound
    that keeps a typo's rank from allocating rank x width adapters). Layers of none of the target names: no bound
    here (add_lora names the model's layers)."""
    sides = [(name, min(module.in_features, module.out_features)) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in set(targets)]
    if sides:
        name, side = min(sides, key=lambda item: item[1])
        if rank > side:
            raise UserError(f"{flag} {rank} is larger than {name} ({side} on its smaller side): the rank of a LoRA "
                            f"update is at most min(in, out) of the layer it adapts, here {side}")


def check_sequences(model, args, examples, refs):
    """The data and the flags against the model: every token id inside its vocabulary, every reference sequence
    long enough to have a query after the sink (a step draws any of them, and a draw without one has no sink
    value), the LoRA rank within the adapted layers and the number of steps within MAX_STEPS."""
    if not args.full:
        check_lora_rank(model, args.lora_rank, args.lora_targets)
    if args.max_steps is None:
        steps = math.ceil(args.epochs * math.ceil(len(examples) / args.batch_size))
        if steps > MAX_STEPS:
            raise UserError(f"--epochs {args.epochs:g} of {len(examples):,} examples at --batch-size "
                            f"{args.batch_size} make {steps:,} steps, over {MAX_STEPS:,}")
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


# What surgery.py writes into --out, file by file (adapter/ is a folder): each must be a regular file or absent.
WRITTEN_FILES = ("checkpoint.pt", "train_log.jsonl", "model.safetensors", "sink_report.json")


def check_output_folder(args):
    """--out must be a folder this run can write (common.check_output: not empty, not an existing file, FIFO or
    device, not an input such as the model folder), and not one that holds another run (unless --resume continues
    it, and then its files are regular files). Checked before anything is loaded, so a mistake costs nothing and
    nothing is written."""
    out = check_output("--out", args.out, folder=True)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if args.resume:
        for name in WRITTEN_FILES:  # what the resumed run reads, then replaces: regular files
            check_output("--out", out / name)
        if (out / "adapter").exists() and not (out / "adapter").is_dir():
            raise UserError(f"--out {out}: {out / 'adapter'} is not a folder")
        if not (out / "checkpoint.pt").is_file():
            raise UserError(f"--resume: no checkpoint at {out / 'checkpoint.pt'}"
                            + (" (that run finished)" if (out / "sink_report.json").exists() else ""))
    elif "checkpoint.pt" in found:
        raise UserError(f"--out {out}: holds an unfinished run (checkpoint.pt): continue it with --resume, or pass "
                        f"a new --out (or remove the folder) to start another")
    elif found:
        raise UserError(f"--out {out}: already holds a run ({', '.join(found)}): pass a new --out, or remove the "
                        f"folder to run again")
    check_output("--out", out, [(f"--{flag.replace('_', '-')}", getattr(args, flag))
                                for flag in ("model", "data", "harmful_ref", "harmless_ref")], folder=True)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@contextlib.contextmanager
def quiet_loading():
    """Nothing of the libraries' own on stderr while a model loads: no progress bar per file read, no warnings and
    no load report (missing or unexpected weights are load_model's error, one line). On a terminal they are noise,
    and they would come before an error line."""
    from transformers.utils import logging as transformers_logging
    was_enabled = transformers_logging.is_progress_bar_enabled()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity(transformers_logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if was_enabled:
            transformers_logging.enable_progress_bar()


# The sizes of a model's config.json, each an integer from 1 to its bound: a zero divides by zero in the model's
# code, a negative makes a negative dimension, a huge one builds a model that fills the memory before the weights
# are compared with it. The bounds are an order of magnitude above the largest released models'.
CONFIG_BOUNDS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "intermediate_size": 1 << 19,
                 "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
                 "head_dim": 1 << 12, "max_position_embeddings": 1 << 28}


def check_config(config, name):
    """Every size of CONFIG_BOUNDS that the config has is an integer in range, and the heads divide as the
    attention needs; a UserError naming the model, the field and the value otherwise."""
    values = {}
    for field, bound in CONFIG_BOUNDS.items():
        try:
            value = getattr(config, field, None)
        except Exception:  # a config class that computes the field from others, which are checked themselves
            continue
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise UserError(f"--model {name}: config.json: {field} must be an integer from 1 to {bound:,}, got "
                            f"{value!r}")
        values[field] = value
    heads, kv_heads = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise UserError(f"--model {name}: config.json: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}")
    if heads and "hidden_size" in values and getattr(config, "head_dim", None) is None \
            and values["hidden_size"] % heads:
        raise UserError(f"--model {name}: config.json: hidden_size {values['hidden_size']} is not a multiple of "
                        f"num_attention_heads {heads} (and no head_dim is given)")


def weight_files(folder):
    """The safetensors files of a model folder (its index's shards, or model.safetensors); [] when it has none
    (another format: the library's own message)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        document = read_json(index, 64 << 20, "a shard index")
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()):
            raise UserError(f"{index}: not a shard index (a weight_map of tensor names to file names in this "
                            f"folder)")
        return [folder / f for f in sorted(set(weight_map.values()))]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []


def skeleton_of(config, name):
    """The model config.json describes, built on the meta device: no memory, and the model's own code run on the
    config's values (any exception there is a UserError)."""
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise UserError(f"cannot load model {name}: config.json describes no model that can be built "
                        f"({cause(e)})") from None


def check_weights_fit(skeleton, folder, name):
    """The skeleton (skeleton_of) against the tensors in the safetensors headers of the folder (read without their
    data): a truncated or damaged weights file, or a config that describes more parameters than the weights hold
    (transformers would initialise the rest at random, and fill the memory first for a config that is too large),
    is a UserError before any weight is read."""
    from safetensors import safe_open
    expected = sum(p.numel() for p in skeleton.parameters())
    files = weight_files(folder)
    if not files:
        return
    held = 0
    for path in files:
        check_input_file(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    held += math.prod(f.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own types for a truncated or damaged file
            raise UserError(f"cannot load model {name}: {path}: not a readable safetensors file ({cause(e)})") \
                from None
    if expected > held:
        raise UserError(f"cannot load model {name}: config.json describes {expected:,} parameters, the weights hold "
                        f"{held:,}: weights are missing, or the config is not the weights' own")


def check_model(name_or_path, lora_rank=None, lora_targets=()):
    """The tokenizer of a local model folder or hub id, after checking from its config and tokenizer (before any
    weight is read) what surgery.py needs: a causal LM whose attention goes through the attention interface, and a
    chat template; with lora_rank, that rank against the layers of the lora_targets names (eval.py, before its
    first stage). Every problem is a UserError naming the model (and the file): any exception of the libraries
    underneath is turned into one."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    name = str(name_or_path)
    check_given("model", name)
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise UserError(f"cannot load model {name}: is a file, expected a model folder (config.json, weights, "
                        f"tokenizer)")
    if local.is_dir():  # no FIFO or device where the libraries will open a file
        check_folder_files(local)
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(f"cannot load model {name}: no config.json in this folder, so it is not a transformers "
                        f"model folder")
    if not local.exists() and not HUB_ID.fullmatch(name):
        raise UserError(f"cannot load model {name}: no such model folder")
    with quiet_loading():
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as e:  # a config.json of wrong types or values fails in the library's own code
            raise UserError(f"cannot load model {model_where(name)}: {'config.json: ' if local.is_dir() else ''}"
                            f"{cause(e)}") from None
        check_config(config, name)
        architecture = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        if architecture is None:
            raise UserError(f"--model {name}: a {config.model_type!r} model is not a causal language model that "
                            f"transformers knows")
        if not architecture._supports_attention_backend:
            raise UserError(f"--model {name}: {architecture.__name__}'s attention does not go through transformers' "
                            f"attention interface, so its sink values cannot be recorded; use a family that does "
                            f"(Llama, Qwen2, Mistral, Gemma, ...)")
        skeleton = skeleton_of(config, name)
        if local.is_dir():
            check_weights_fit(skeleton, local, name)
        if lora_rank is not None:
            check_lora_rank(skeleton, lora_rank, lora_targets)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # a tokenizer file of the wrong shape ends in the library's KeyError, TypeError...
            files = [f.name for f in sorted(local.glob("tokenizer*"))] if local.is_dir() else []
            raise UserError(f"cannot load the tokenizer of {model_where(name)}"
                            f"{' (' + ', '.join(files) + ')' if files else ''}: {cause(e)}") from None
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


# transformers' load report, as load_model's error: (key of output_loading_info, what it says of a weight).
LOAD_PROBLEMS = (("missing_keys", "is missing from the weights (transformers would initialise it at random)"),
                 ("unexpected_keys", "is in the weights but not in the model config.json describes"),
                 ("mismatched_keys", "has another shape in the weights than in the model config.json describes"))


def check_loading_info(info, name):
    """A weight missing from the checkpoint, unexpected in it or of another shape is an error, not a warning
    (tied weights, which the checkpoint holds once, are not missing: transformers leaves them out)."""
    for key, says in LOAD_PROBLEMS:
        found = sorted(info.get(key) or (), key=str)
        if found:
            first = found[0]
            shapes = f" ({tuple(first[1])} there, {tuple(first[2])} here)" if isinstance(first, tuple) \
                and len(first) == 3 else ""
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise UserError(f"cannot load model {name}: weight {first[0] if isinstance(first, tuple) else first} "
                            f"{says}{shapes}{more}: the weights and config.json do not match")
    if info.get("error_msgs"):
        raise UserError(f"cannot load model {name}: {first_line(info['error_msgs'][0])}")


def load_model(name_or_path, device, dtype, attn_implementation):
    """Model and tokenizer from a local folder or a hub id, with the given attention implementation. What cannot
    work is found from the config, the weights' headers and the tokenizer (check_model) before the weights are
    read; any exception while they are read is one line, and so is transformers' load report."""
    from transformers import AutoModelForCausalLM
    name = str(name_or_path)
    tokenizer = check_model(name)
    with quiet_loading():
        try:
            # ignore_mismatched_sizes: a weight of another shape is reported with the others (and refused below),
            # not raised as "see the above report" with the report silenced
            model, info = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True,
                ignore_mismatched_sizes=True)
        except Exception as e:  # safetensors, torch and transformers raise many types for a damaged checkpoint
            raise UserError(f"cannot load model {model_where(name)}: {cause(e)}") from None
    check_loading_info(info, name)
    check_weights_finite(model, name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def check_weights_finite(model, name):
    """The one rule for weights, which sinkcheck keeps too: a NaN or infinity in any floating-point tensor, read or
    not, means a broken checkpoint, refused before anything is computed from it."""
    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"cannot use model {model_where(name)}: weight {key} holds NaN or infinity (a broken "
                            f"checkpoint: surgery.py and sinkcheck refuse any non-finite weight)")


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


# Sink values fall as sequences grow longer (a late query spreads its attention over more keys), so reference sets
# that differ in length make d_h measure length. Beyond this ratio of medians or upper quartiles we warn.
LENGTH_RATIO_WARNING = 1.25


def reference_lengths(harmful, harmless):
    """Token-length median and upper quartile of each reference set, their ratios, and whether they match."""
    summary = {}
    for name, sequences in (("harmful", harmful), ("harmless", harmless)):
        lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.float64)
        summary[name] = {"median": lengths.quantile(0.5).item(), "upper_quartile": lengths.quantile(0.75).item()}
    summary["ratio"] = {k: max(summary["harmful"][k], summary["harmless"][k]) /
                        max(1.0, min(summary["harmful"][k], summary["harmless"][k])) for k in summary["harmful"]}
    summary["matched"] = all(r <= LENGTH_RATIO_WARNING for r in summary["ratio"].values())
    return summary


def length_warning(lengths):
    """None when the reference sets match in length (reference_lengths), else the warning: d_h would then measure
    length more than harm."""
    if lengths["matched"]:
        return None
    return (f"the reference sets differ in length by up to {max(lengths['ratio'].values()):.2f}x (over "
            f"{LENGTH_RATIO_WARNING}); sink values fall with length, so d_h will measure length more than harm: match "
            f"the sets in length")
