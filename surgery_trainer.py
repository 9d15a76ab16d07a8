"""Surgery inside transformers' Trainer (or any Trainer subclass, such as TRL's SFTTrainer).

    from surgery import SurgeryTrainer, SurgeryMixin        # this module, imported on first use

    trainer = SurgeryTrainer(model=model, args=TrainingArguments(...), train_dataset=..., processing_class=tokenizer,
                             harmful_refs="harmful.jsonl", harmless_refs="harmless.jsonl", alpha=300)
    class SurgerySFTTrainer(SurgeryMixin, SFTTrainer): ...  # TRL, or any other Trainer subclass

The loss of a training step is the parent Trainer's own loss plus the Surgery term (docs/METHOD.md section 1):

    L = L_task + alpha * mean_h relu(d_h),      d_h = a_h(X_harmful) - a_h(X_harmless)

How, and why so:

- One forward per step. `ref_batch` harmful and `ref_batch` harmless reference sequences ride in the task batch
  (surgery.join_batches) with labels -100, and the parent's `compute_loss` runs on that joint batch inside
  surgery.recording_sinks: the hooked attention of surgery.py (section 3, `attn_implementation=surgery_sink`) records
  every layer's sink column, the sink values of the reference rows give d_h (surgery.per_sequence_sink_values,
  surgery.divergence_of_rows, surgery.sink_penalty), and the task loss is the parent's, computed by the parent: rows
  whose labels are all -100 add nothing to a causal LM loss (not to its sum, not to its token count), with or without
  `num_items_in_batch`, and right padding leaves every row as in a pass of its own (tested against the parent's loss
  on the task batch alone, 1e-6 in fp32).
- The draw of step k: `ref_batch` sequences of each set drawn with replacement by a generator seeded with
  surgery.step_seed(args.seed, k, 0), the same on every rank, and the same draw as `python surgery.py` makes at step
  k with the same seed.
- Gradient accumulation: the reference pair rides in the first micro-batch of each optimizer step only, and its term
  is scaled so that the Trainer's own accumulation scaling leaves it whole: the step's gradient is the task gradient
  of the whole accumulated batch plus alpha times the gradient of one penalty (as surgery.py, which puts it on one
  micro-batch of the step, and at ref rows per step whatever the accumulation).
- Data parallel, through the Trainer's own engine: every rank computes the same penalty on the same draw and the
  gradients are averaged over the ranks, so the step's penalty gradient is alpha times one penalty's (DDP tested;
  FSDP the same reasoning, untested: accelerate runs its FSDP plugin on accelerator devices only).
- Activation checkpointing: the micro-batch that carries the references runs its backward inside
  surgery.recording_sinks too, so a recomputed layer takes the sink-channel path of its first pass.
- alpha = 0 is the parent Trainer, exactly: no reference rows, the model's attention left as it was given.
- Logs: `sink_penalty` (mean_h relu(d_h)) and `positive_heads` (how many heads have d_h > 0), averaged over the steps
  since the last log, and once the reference lengths (median tokens of each set) and the head count, merged into the
  Trainer's own logs, so every reporter (TensorBoard, W&B, ...) shows them.

Bad input is a SurgeryConfigError (a ValueError and a surgery UserError) at construction; a task batch that the
reference rows cannot join (no attention_mask: padding-free or packed; a key it does not know) is a UserError at the
first step, before any weight changes.
"""
import contextlib
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
import transformers

import checks
import surgery
from common import UserError


class SurgeryConfigError(UserError, ValueError):
    """Bad input to SurgeryTrainer / SurgeryMixin, found at construction (before any step)."""


# Keys of a task batch beside input_ids / attention_mask / labels that the joint batch can carry: (padding value of
# the task rows' extension, value of the reference rows). position_ids of a reference row are its positions.
EXTRA_KEYS = {"token_type_ids": (0, 0), "shift_labels": (-100, -100), "position_ids": (0, None)}


PADDING_FREE = ("SurgeryTrainer: padding-free (packed) batches are not supported: the reference rows ride in the task "
                "batch as padded rows; set padding_free=False (and no 'bfd' packing)")


def _pretrained(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _records(refs, name):
    """Reference records from a path (surgery.read_records) or a list of records or of token-id sequences."""
    if isinstance(refs, (str, os.PathLike)):
        try:
            return surgery.read_records(refs)
        except UserError as e:  # a missing, empty or malformed file, named in the message
            raise SurgeryConfigError(f"{name}: {e}") from None
    if refs is None or isinstance(refs, (bytes, Mapping)) or not isinstance(refs, Iterable):
        raise SurgeryConfigError(f"{name}: expected a list of records {{'instruction', 'output'}}, a list of token-id "
                                 f"lists, or the path of a JSON / JSONL file of records (got {type(refs).__name__})")
    refs = list(refs)
    if not refs:
        raise SurgeryConfigError(f"{name}: no records (the penalty needs at least one reference of each kind)")
    refs = [rec.tolist() if torch.is_tensor(rec) and rec.dim() == 1 else rec for rec in refs]
    if all(isinstance(rec, Sequence) and not isinstance(rec, (str, bytes)) and rec and all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in rec) for rec in refs):
        return [[int(t) for t in rec] for rec in refs]  # already tokenized
    try:  # records, with the fields and aliases surgery.py reads
        return surgery.records_from_rows([dict(rec) if isinstance(rec, Mapping) else rec for rec in refs], name)
    except UserError as e:
        raise SurgeryConfigError(f"{e}; or give every reference as a list of token ids") from None


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", None) or processing_class


class SurgeryMixin:
    """The Surgery penalty for any transformers Trainer subclass: `class T(SurgeryMixin, SFTTrainer)`.

    Keyword-only arguments beside the Trainer's own:
      harmful_refs, harmless_refs  records {"instruction", "output"} (also "prompt"/"response"/"input", as surgery.py
                                   reads them), lists of token ids, or paths of JSON / JSONL files of records
      alpha       weight of the penalty (default 300; 0: the parent Trainer exactly)
      sink_pos    position of the sink token (default 0)
      ref_batch   harmful and harmless reference sequences drawn per optimizer step, each (default 1)
      max_ref_len references are cut to this many tokens (default 256)
    Records are chat-formatted and tokenized once, here, with the trainer's processing_class (surgery.encode).
    """

    def __init__(self, *args, harmful_refs=None, harmless_refs=None, alpha=300.0, sink_pos=0, ref_batch=1,
                 max_ref_len=256, **kwargs):
        # The scalars first: a mistake there is found before the parent builds anything.
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha < 0:
            raise SurgeryConfigError(f"alpha must be a finite number >= 0 (got {alpha!r}); 0 trains as the parent "
                                     f"Trainer")
        for name, value, least in (("sink_pos", sink_pos, 0), ("ref_batch", ref_batch, 1),
                                   ("max_ref_len", max_ref_len, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SurgeryConfigError(f"{name} must be an integer >= {least} (got {value!r})")
        if max_ref_len <= sink_pos + 1:
            raise SurgeryConfigError(f"max_ref_len {max_ref_len} leaves no token after sink_pos {sink_pos}: it must "
                                     f"exceed {sink_pos + 1}")
        records = (_records(harmful_refs, "harmful_refs"), _records(harmless_refs, "harmless_refs"))
        if getattr(kwargs.get("args", args[1] if len(args) > 1 else None), "padding_free", False):
            raise SurgeryConfigError(PADDING_FREE)
        self.alpha, self.sink_pos, self.ref_batch, self.max_ref_len = float(alpha), sink_pos, ref_batch, max_ref_len
        super().__init__(*args, **kwargs)
        self._surgery_penalty_step = None  # the global step whose penalty has been applied
        self._surgery_values = []  # [penalty, positive heads] of each step since the last log
        self._surgery_lengths_logged = False
        self.surgery_last = None  # the last step's penalty, d_h and draw (detached), for a look from outside
        self._check_parallelism()
        self.reference_ids = self._tokenize_references(records)
        self._check_model()
        lengths = checks.reference_lengths(*self.reference_ids)
        self.reference_length_summary = lengths
        if checks.length_warning(lengths):
            warnings.warn(f"SurgeryTrainer: {checks.length_warning(lengths)}", stacklevel=2)

    # --- construction ---------------------------------------------------------------------------------------------

    def _check_parallelism(self):
        if self.args.n_gpu > 1:
            raise SurgeryConfigError(f"SurgeryTrainer: {self.args.n_gpu} GPUs in one process (torch DataParallel) "
                                     f"is not supported (the sink recorder is one per process); launch one process "
                                     f"per GPU with torchrun (DDP / FSDP)")
        if getattr(self.args, "padding_free", False) or getattr(self, "padding_free", False):
            raise SurgeryConfigError(PADDING_FREE)
        kwargs = self.args.activation_checkpointing_kwargs or {}
        if self.args.activation_checkpointing and isinstance(kwargs, dict) and kwargs.get("use_reentrant"):
            raise SurgeryConfigError("SurgeryTrainer: reentrant activation checkpointing runs a layer's forward "
                                     "without gradients, so the sink columns (which leave a layer beside its output) "
                                     "would get none; leave use_reentrant unset or False")

    def _tokenize_references(self, records):
        """Token ids of every reference, each longer than sink_pos + 1 (a draw can pick any of them)."""
        tokenizer = _tokenizer_of(self.processing_class)
        vocabulary = _pretrained(self.model).get_input_embeddings().num_embeddings
        self.reference_pad_id = 0
        if tokenizer is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            self.reference_pad_id = pad if pad is not None else 0
        out = []
        for name, recs in zip(("harmful_refs", "harmless_refs"), records):
            ids_of_set = []
            for i, rec in enumerate(recs, start=1):
                if isinstance(rec, dict):
                    if tokenizer is None:
                        raise SurgeryConfigError(f"{name}: records need the tokenizer to be tokenized: pass "
                                                 f"processing_class=tokenizer (or token-id lists)")
                    if getattr(tokenizer, "chat_template", None) is None:
                        raise SurgeryConfigError(f"{name}: the tokenizer has no chat template, so records cannot be "
                                                 f"formatted as conversations; set tokenizer.chat_template (or pass "
                                                 f"token-id lists)")
                    try:
                        ids = surgery.encode(tokenizer, rec, self.max_ref_len)[0]
                    except UserError as e:
                        raise SurgeryConfigError(f"{name}: record {i}: {e}") from None
                else:
                    ids = rec[:self.max_ref_len]
                if len(ids) <= self.sink_pos + 1:
                    raise SurgeryConfigError(f"{name}: record {i} has {len(ids)} tokens (within max_ref_len "
                                             f"{self.max_ref_len}), none after sink_pos {self.sink_pos}: every "
                                             f"reference needs more than {self.sink_pos + 1}")
                if max(ids) >= vocabulary or min(ids) < 0:
                    raise SurgeryConfigError(f"{name}: record {i} has token id {max(ids)} outside the model's "
                                             f"{vocabulary} embeddings: the tokenizer and the model do not match")
                ids_of_set.append(ids)
            out.append(ids_of_set)
        return tuple(out)

    def _check_model(self):
        """The model must run the hooked attention of surgery.py; with alpha 0 it is left as it was given."""
        model = _pretrained(self.model)
        if not isinstance(model, transformers.PreTrainedModel) or not type(model)._supports_attention_backend:
            raise SurgeryConfigError(f"SurgeryTrainer: {type(model).__name__}'s attention does not go through "
                                     f"transformers' attention interface, so its sink values cannot be recorded; use "
                                     f"a family that does (Llama, Qwen2, Mistral, Gemma, ...)")
        self.surgery_layers = None
        if self.alpha == 0:
            return
        try:
            model.set_attn_implementation(surgery.SINK_ATTENTION)
        except (ValueError, ImportError) as e:
            raise SurgeryConfigError(f"SurgeryTrainer: cannot switch {type(model).__name__} to the "
                                     f"{surgery.SINK_ATTENTION!r} attention: {e}") from None
        if model.config._attn_implementation != surgery.SINK_ATTENTION:
            raise SurgeryConfigError(f"SurgeryTrainer: {type(model).__name__} kept attention "
                                     f"{model.config._attn_implementation!r}: its attention does not go through "
                                     f"transformers' attention interface")
        # One small forward (no gradient, eval mode: no randomness drawn) counts the attention calls of a forward.
        device = model.get_input_embeddings().weight.device
        if device.type == "meta":
            return
        probe = surgery.to_device(surgery.pad_batch([self.reference_ids[0][0][:self.sink_pos + 2]],
                                                    self.reference_pad_id), device)
        with torch.no_grad(), surgery.evaluation_mode(self.model), surgery.recording_sinks(self.sink_pos) as columns:
            self.model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
            self.surgery_layers = len(columns)
            heads = columns[0].shape[-1] if columns else 0
        if not self.surgery_layers:
            raise SurgeryConfigError(f"SurgeryTrainer: {type(model).__name__} did not call the "
                                     f"{surgery.SINK_ATTENTION!r} attention function: its attention does not go "
                                     f"through transformers' attention interface")
        self.surgery_heads = self.surgery_layers * heads

    # --- the step -------------------------------------------------------------------------------------------------

    def reference_draw(self, step, device=None):
        """The (harmful, harmless) padded batches of optimizer step `step`: the same on every rank, and the draw
        surgery.py makes at that step with the same seed."""
        draw = torch.Generator().manual_seed(surgery.step_seed(self.args, step, 0))
        device = device if device is not None else self.args.device
        return tuple(surgery.reference_batch(ids, self.ref_batch, draw, self.reference_pad_id, device)
                     for ids in self.reference_ids)

    def _penalty_due(self):
        return self.alpha > 0 and self._surgery_penalty_step != self.state.global_step

    def train(self, *args, **kwargs):
        self._surgery_penalty_step = None
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The micro-batch that carries the references runs forward AND backward with the sink channel on: a layer
        # that activation checkpointing recomputes in backward must take the path its first pass took.
        if not self._penalty_due():
            return super().training_step(model, inputs, num_items_in_batch)
        with surgery.recording_sinks(self.sink_pos):
            return super().training_step(model, inputs, num_items_in_batch)

    def _ga_factor(self, num_items_in_batch):
        """What the Trainer will divide this micro-batch's loss by (its rule in training_step)."""
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        return 1 if scaled else getattr(self, "current_gradient_accumulation_steps", 1)

    def _joint_inputs(self, inputs, harmful, harmless):
        """The task batch with the reference rows below it (labels -100), every row as in a pass of its own."""
        if not torch.is_tensor(inputs.get("input_ids")) or not torch.is_tensor(inputs.get("attention_mask")):
            raise UserError("SurgeryTrainer: the task batch needs 'input_ids' and 'attention_mask' tensors (padding-"
                            "free or packed batches are not supported)")
        refs = [{k: v.to(inputs[k].dtype) for k, v in b.items() if k in ("input_ids", "attention_mask")}
                for b in (harmful, harmless)]
        core = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels") if k in inputs}
        joint = dict(inputs)
        joint.update(surgery.join_batches(core, *refs))
        n_task, width = inputs["input_ids"].shape[0], joint["input_ids"].shape[1]
        n_refs = joint["input_ids"].shape[0] - n_task
        for key, value in inputs.items():
            if key in core or not torch.is_tensor(value):
                continue
            if key not in EXTRA_KEYS or value.dim() != 2 or value.shape[0] != n_task:
                raise UserError(f"SurgeryTrainer: cannot add the reference rows to a batch with {key!r}; the batch "
                                f"may hold input_ids, attention_mask, labels, {', '.join(EXTRA_KEYS)}")
            task_pad, ref_value = EXTRA_KEYS[key]
            task_part = F.pad(value, (0, width - value.shape[1]), value=task_pad)
            ref_part = (torch.arange(width, device=value.device).expand(n_refs, width) if ref_value is None else
                        torch.full((n_refs, width), ref_value, device=value.device)).to(value.dtype)
            joint[key] = torch.cat([task_part, ref_part])
        return joint

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and self._penalty_due()):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        step = self.state.global_step
        harmful, harmless = self.reference_draw(step, inputs["input_ids"].device)
        joint = self._joint_inputs(inputs, harmful, harmless)
        n_task = inputs["input_ids"].shape[0]
        recording = (contextlib.nullcontext(surgery.SinkRecorder.columns)
                     if surgery.SinkRecorder.sink_pos == self.sink_pos else surgery.recording_sinks(self.sink_pos))
        with recording as columns:
            start = len(columns)
            result = super().compute_loss(model, joint, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            recorded = columns[start:start + self.surgery_layers] if self.surgery_layers else columns[start:]
        if not recorded:
            raise UserError(f"{type(_pretrained(self.model)).__name__} did not call the {surgery.SINK_ATTENTION!r} "
                            f"attention function: its attention does not go through transformers' attention interface")
        loss, outputs = result if return_outputs else (result, None)
        # The sink values of the reference rows (the task rows' are recorded too, and unused).
        sink = torch.stack(recorded)[:, n_task:]
        per_sequence, has_query = surgery.per_sequence_sink_values(sink, joint["attention_mask"][n_task:],
                                                                   self.sink_pos)
        divergence = surgery.divergence_of_rows(per_sequence, has_query, harmful["input_ids"].shape[0],
                                                self.sink_pos)
        penalty = surgery.sink_penalty(divergence)
        if torch.is_grad_enabled() and not penalty.requires_grad:
            raise UserError("SurgeryTrainer: the sink penalty has no gradient (is a layer's forward run without "
                            "gradients, e.g. by reentrant activation checkpointing?)")
        loss = loss + self.alpha * self._ga_factor(num_items_in_batch) * penalty
        self._surgery_penalty_step = step
        self._surgery_values.append(torch.stack([penalty.detach().float(), (divergence > 0).sum().float()]))
        self.surgery_last = {"step": step, "penalty": penalty.detach(), "divergence": divergence.detach(),
                             "harmful": harmful, "harmless": harmless}
        return (loss, outputs) if return_outputs else loss

    # --- logs -----------------------------------------------------------------------------------------------------

    def log(self, logs, *args, **kwargs):
        if not any(key.startswith("eval_") for key in logs):
            if self._surgery_values:
                penalty, positive = torch.stack(self._surgery_values).mean(0).tolist()
                logs["sink_penalty"], logs["positive_heads"] = penalty, positive
                self._surgery_values = []
            if not self._surgery_lengths_logged:
                lengths = self.reference_length_summary
                logs["ref_harmful_median_tokens"] = lengths["harmful"]["median"]
                logs["ref_harmless_median_tokens"] = lengths["harmless"]["median"]
                if getattr(self, "surgery_heads", None):
                    logs["sink_heads"] = self.surgery_heads
                self._surgery_lengths_logged = True
        return super().log(logs, *args, **kwargs)


class SurgeryTrainer(SurgeryMixin, transformers.Trainer):
    """transformers.Trainer with the Surgery penalty (see SurgeryMixin for the arguments)."""
