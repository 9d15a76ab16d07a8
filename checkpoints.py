"""Resuming surgery.py runs: the checkpoint (trainable weights, optimizer state, the run's flags), the train log a
resumed run keeps, and what a stopped run tells the user.

A checkpoint is refused when it is not one, when it was made with other flags (only those in
RESUMABLE_WITH_OTHER may change), when its weights do not fit the model, or when any of its fields has the wrong
type or range (check_state): the step, the weights, AdamW's state and hyperparameters, the flags, the defense's state.
"""
import json
import math
import sys

import torch

import scale
from common import UserError, cause, check_input_file, write_atomically

# The most optimizer steps a run may have (checks.py's bound of --max-steps and of --epochs' steps).
MAX_STEPS = 100_000_000

# Flags that --resume may change: where things go and how often, not what is computed.
RESUMABLE_WITH_OTHER = {"out", "resume", "save_every", "log_every", "device", "grad_checkpointing"}


def run_config(args, defaults):
    """The flags a run's result depends on: every command-line flag (the names in `defaults`, surgery.py's parsed
    empty command line) but RESUMABLE_WITH_OTHER."""
    return {name: getattr(args, name) for name in sorted(vars(defaults)) if name not in RESUMABLE_WITH_OTHER}


def save_checkpoint(path, model, optimizer, step, defense=None, main_rank=True, config=None):
    """The trainable weights and the optimizer state, gathered in full on rank 0 (a collective under FSDP2), and the
    run's flags (run_config), so that --resume refuses to continue it with other ones."""
    weights, optimizer_state = scale.training_state(model, optimizer)
    if main_rank:
        state = {"step": step, "trainable": weights, "optimizer": optimizer_state,
                 "defense": defense.state_dict() if defense is not None else {}, "config": config or {}}
        write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, model, optimizer, defense=None, config=None):
    """Restores a checkpoint into the model, the optimizer and the defense; returns the step to continue from.
    Every field is checked for its type and range first (check_state), and any exception of torch while it is
    restored is one line naming the file: a checkpoint that is not this run's is refused, never half-restored."""
    check_input_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged or foreign file
        raise UserError(f"{path}: not a surgery.py checkpoint (torch.load cannot read it: {type(e).__name__})") \
            from None
    check_state(state, path, model, config)
    try:
        scale.load_training_state(model, optimizer, state["trainable"], state["optimizer"])
    except Exception as e:
        raise UserError(f"{path}: its optimizer state cannot be restored into this run ({cause(e)})") from None
    if defense is not None:
        try:
            defense.load_state_dict(state.get("defense") or {})
        except Exception as e:
            raise UserError(f"{path}: its {type(defense).__name__} state cannot be restored ({cause(e)})") from None
    return state["step"]


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad(path, what):
    return UserError(f"{path}: not a checkpoint of this run: {what} (--resume continues a run from its own "
                     f"checkpoint.pt; pass a new --out to start over)")


def check_state(state, path, model, config=None):
    """A loaded checkpoint against this run: its fields of the right types and ranges (the step an integer from 0
    to --max-steps, the weights finite floating-point tensors of this model's trainable names and shapes, the
    optimizer state AdamW's for those weights with finite moments and hyperparameters, the flags a dict), so that
    nothing wrong surfaces later as a traceback in the middle of training."""
    if not isinstance(state, dict) or not {"step", "trainable", "optimizer"} <= set(state):
        raise UserError(f"{path}: not a surgery.py checkpoint (no step, trainable weights and optimizer state)")
    saved = state.get("config") or {}  # checkpoints of before this check carry none
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise _bad(path, "its 'config' is not a dict of flags")
    differing = [name for name in saved if config is not None and name not in RESUMABLE_WITH_OTHER
                 and saved[name] != config.get(name)]
    if differing:
        name = differing[0]
        raise UserError(f"{path}: the run was started with --{name.replace('_', '-')} {saved[name]}, not "
                        f"{config.get(name)}: --resume continues a run with its own flags (or pass a new --out)")
    step = state["step"]
    max_steps = (config or {}).get("max_steps")
    top = max_steps if isinstance(max_steps, int) else MAX_STEPS
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= top:
        raise _bad(path, f"its step must be an integer from 0 to {top:,}, got {step!r}")
    trainable = state["trainable"]
    if not isinstance(trainable, dict) or not all(isinstance(w, torch.Tensor) for w in trainable.values()):
        raise _bad(path, "its trainable weights are not a dict of tensors")
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != expected:
        raise UserError(f"{path}: checkpoint does not match this model and its trainable weights "
                        f"(LoRA configuration or --full)")
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    differing = [name for name, w in trainable.items() if tuple(w.shape) != shapes[name]]
    if differing:
        raise UserError(f"{path}: checkpoint does not match this model: {differing[0]} has shape "
                        f"{tuple(trainable[differing[0]].shape)} there, {shapes[differing[0]]} here "
                        f"(another --lora-rank or model)")
    for name, w in trainable.items():
        if not w.is_floating_point() or not torch.isfinite(w).all():
            raise _bad(path, f"weight {name} is {'not floating-point' if not w.is_floating_point() else 'not finite'}")
    if state.get("defense") is not None and not isinstance(state["defense"], dict):
        raise _bad(path, "its 'defense' state is not a dict")
    check_optimizer_state(state["optimizer"], path, [name for name, p in model.named_parameters()
                                                      if p.requires_grad], shapes)


def check_optimizer_state(optimizer, path, names, shapes):
    """AdamW's state dict as the loop saves it (parameters by name, or by index in a checkpoint of before the
    state-dict API): param_groups naming every trainable weight once with finite hyperparameters, and per weight
    a finite step and moments of the weight's shape."""
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list) or not optimizer["param_groups"]:
        raise _bad(path, "its optimizer state is not a dict of 'state' and a non-empty list of 'param_groups'")
    listed = []
    for group in optimizer["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise _bad(path, "an optimizer parameter group is not a dict with a list of 'params'")
        for key in ("lr", "eps", "weight_decay"):
            if key in group and not (_number(group[key]) and group[key] >= 0):
                raise _bad(path, f"the optimizer's {key} must be a finite number >= 0, got {group[key]!r}")
        betas = group.get("betas", (0.9, 0.999))
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(_number(b) and 0 <= b < 1
                                                                             for b in betas):
            raise _bad(path, f"the optimizer's betas must be two numbers in [0, 1), got {betas!r}")
        for key in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                    "decoupled_weight_decay"):
            if group.get(key) is not None and not isinstance(group[key], bool):
                raise _bad(path, f"the optimizer's {key} must be true, false or null, got {group[key]!r}")
        listed += group["params"]
    by_index = all(isinstance(p, int) and not isinstance(p, bool) for p in listed)
    if sorted(map(str, listed)) != sorted(map(str, range(len(names)) if by_index else names)):
        raise _bad(path, "its optimizer's parameter groups do not list this run's trainable weights")
    for key, entry in optimizer["state"].items():
        name = names[key] if by_index and isinstance(key, int) and 0 <= key < len(names) else key
        if name not in shapes or not isinstance(entry, dict):
            raise _bad(path, f"the optimizer state of {key!r} is not that of a trainable weight")
        for field, value in entry.items():
            if field == "step":  # the steps taken: a state exists after the first, and Adam divides by 1 - beta^step
                step = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if not _number(step) or not 1 <= step <= MAX_STEPS:
                    raise _bad(path, f"the optimizer's step count of {name} must be a number from 1 to "
                                     f"{MAX_STEPS:,}, got {step!r}")
            elif isinstance(value, torch.Tensor):
                if not value.is_floating_point() or not torch.isfinite(value).all() or (
                        value.dim() > 0 and tuple(value.shape) != shapes[name]) or (
                        field.endswith("exp_avg_sq") and (value < 0).any()):
                    raise _bad(path, f"the optimizer's {field} of {name} is not a finite tensor of its shape")
            elif not _number(value) or value < 0:
                raise _bad(path, f"the optimizer's {field} of {name} must be a finite number >= 0, got {value!r}")


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


def open_log(out, start, resume):
    """OUT/train_log.jsonl for writing, holding the lines of steps up to `start` when a run resumes."""
    kept = [line for line in read_log(out / "train_log.jsonl") if json.loads(line)["step"] <= start] \
        if resume else []
    try:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(out / "train_log.jsonl", "w")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None
    log_file.writelines(line + "\n" for line in kept)
    return log_file


def checkpoint_note(checkpoint):
    """What a run that stopped on a non-finite value leaves behind, for its error line."""
    if checkpoint.is_file():
        step = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
        return f"the last good checkpoint, {checkpoint} (step {step}), is kept; no final outputs were written"
    return "no checkpoint was saved before it (see --save-every); no final outputs were written"


def save_on_interrupt(checkpoint, model, optimizer, done, total_steps, defense, config, world):
    """Ctrl-C inside the loop: one process saves where it stopped; several cannot meet for a gather at an arbitrary
    point and keep their last periodic checkpoint. Exits 130."""
    if world.size == 1:
        save_checkpoint(checkpoint, model, optimizer, done, defense, config=config)
    if world.rank == 0:
        print(f"\ninterrupted: {done if world.size == 1 else 'the last periodic checkpoint'} of "
              f"{total_steps} steps saved to {checkpoint}; continue with --resume", file=sys.stderr)
    raise SystemExit(130)


