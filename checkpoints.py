"""Resuming surgery.py runs: the checkpoint (trainable weights, optimizer state, the run's flags), the train log a
resumed run keeps, and what a stopped run tells the user.

A checkpoint is refused when it is not one, when it was made with other flags (only those in
RESUMABLE_WITH_OTHER may change), or when its weights do not fit the model.
"""
import json
import sys

import torch

import scale
from common import UserError, write_atomically

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
    """Restores a checkpoint into the model, the optimizer and the defense; returns the step to continue from."""
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
    scale.load_training_state(model, optimizer, state["trainable"], state["optimizer"])
    if defense is not None:
        defense.load_state_dict(state.get("defense", {}))
    return state["step"]


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


