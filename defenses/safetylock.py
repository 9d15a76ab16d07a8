"""SafetyLock (post-hoc): safe-minus-unsafe directions of a few attention heads of the aligned model, baked into
the o_proj bias of any fine-tuned model of the same family.

    python -m defenses.safetylock build --model ALIGNED --out LOCK.safetensors [--triples F] [--heads K] [--alpha A]
    python -m defenses.safetylock apply --model FINETUNED --lock LOCK.safetensors --out DIR [--alpha A]

Build, on the aligned model and (instruction, refusal, harmful answer) triples:
  1. Activations. Each head's output (its slice of the input of o_proj) while the model reads the chat prompt
     followed by the refusal ("safe") or by the harmful answer ("unsafe"), at the last POSITIONS = 5 tokens of
     that answer, each position one sample (the released code's choice). Under causal attention the prompt's
     own positions are identical in both sequences, so the contrast exists only once the answer has been read;
     the end-of-turn tokens are left out (the released code cuts them too), so the positions are answer text.
  2. Probes. Per head a logistic regression (L2 weight 1, as sklearn's default that the released code uses),
     fitted on the samples of 70% of the triples and scored on the other 30%: held-out by triple, so the five
     positions of one answer never sit on both sides. The K heads with the best held-out accuracy (ties: lower
     held-out log-loss) are kept.
  3. Directions. theta_h = mean(safe) - mean(unsafe), normalised; sigma_h = standard deviation of all samples'
     projections on theta_h (both classes, population std, as the released code's np.std).
The lock file stores, per layer with a chosen head, the head-space displacement sigma_h * theta_h at each chosen
head's slice (zero elsewhere), plus metadata: the model fingerprint, alpha, K, the heads with accuracy and sigma.

Apply: o_proj.bias += W_O (alpha * displacement) with W_O of the model being locked (the released code uses the
fine-tuned model's o_proj weight too: fine-tuning may have changed it). That is one matrix-vector product per
locked layer: milliseconds. A model folder is written with the biases in its weights and attention_bias in its
config (zero q/k/v biases added where the family ties them to o_proj's; Qwen2 and Mistral cannot express an
o_proj bias in a folder, so lock those in memory with apply(model, lock)).

K: 24 of the 1024 heads of a 7-8B Llama (2.3%); by default the same share of this model's heads, at least one:
SmolLM2-135M's 270 heads (30 layers x 9) give K = 6. alpha defaults to 6 as in the paper.
"""
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import surgery
from defenses import HelpFormatter, load_triples
from checks import FLAG_BOUNDS, check_config, quiet_loading, weight_files
from common import (ArgumentParser, UserError, cause, check_folder_files, check_given, check_input_file, check_output,
                    write_atomically)

DEFAULT_ALPHA = 6.0
POSITIONS = 5
HOLDOUT = 0.3
PAPER_HEADS, PAPER_HEAD_COUNT = 24, 32 * 32  # K of the paper, on Llama-3-8B's 32 layers x 32 heads
LOCK_FORMAT = "safetylock/1"
# Written by surgery.py beside the weights; they describe the unlocked model, so a locked folder leaves them out.
NOT_COPIED = {"sink_report.json", "train_log.jsonl", "checkpoint.pt", "safetylock.json"}


def default_head_count(n_layers, n_heads):
    """The paper's K = 24 of 1024 heads, as the same share of this model's heads (at least one)."""
    return max(1, round(PAPER_HEADS * n_layers * n_heads / PAPER_HEAD_COUNT))


def fingerprint(config):
    """What a lock needs to fit a model: the family and the attention shapes."""
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return {"model_type": config.model_type, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": n_heads, "head_dim": head_dim,
            "vocab_size": config.vocab_size}


def o_proj_names(model):
    """The o_proj module of every decoder layer, in layer order."""
    names = [name for name, m in model.named_modules() if name.endswith("self_attn.o_proj")]
    if not names:
        raise UserError(f"{type(model).__name__} has no self_attn.o_proj layers")
    return names


# ----------------------------------------------------------------------------------------------------------------
# 1. Activations
# ----------------------------------------------------------------------------------------------------------------

def answer_sequence(tokenizer, instruction, answer, max_len):
    """Token ids of the chat prompt followed by the answer text, without the end-of-turn tokens."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + \
        tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids[:max_len]


@torch.no_grad()
def head_outputs(model, sequences, positions, pad_id, batch_size=8):
    """[sequence, position, layer, head, head_dim]: the input of every o_proj, split per head, at the last
    `positions` tokens of each sequence."""
    n_heads = fingerprint(model.config)["num_attention_heads"]
    layers = [model.get_submodule(name) for name in o_proj_names(model)]
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: captured.append(args[0])) for layer in layers]
    out = []
    try:
        for i in range(0, len(sequences), batch_size):
            batch = surgery.to_device(surgery.pad_batch(sequences[i:i + batch_size], pad_id), model.device)
            captured.clear()
            model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            lengths = batch["attention_mask"].sum(1)
            # Right padding: the last valid tokens of row b are lengths[b] - positions .. lengths[b] - 1.
            at = (lengths[:, None] - positions + torch.arange(positions, device=lengths.device)).clamp(min=0)
            rows = torch.arange(len(at), device=at.device)[:, None]
            per_layer = [x[rows, at].float() for x in captured]  # each [batch, positions, heads * head_dim]
            stacked = torch.stack(per_layer, dim=2)
            out.append(stacked.unflatten(-1, (n_heads, -1)).cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# 2. Probes and the choice of heads
# ----------------------------------------------------------------------------------------------------------------

def fit_probes(features, labels, l2=1.0, iterations=200):
    """One logistic regression per head, all at once: features [head, sample, dim], labels [sample] in {0, 1}.
    Minimises sum_i log-loss + l2 / 2 * ||w||^2 per head (bias not penalised). Returns (w [head, dim], b [head])."""
    heads, _, dim = features.shape
    features, labels = features.double(), labels.double()
    w = torch.zeros(heads, dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(heads, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def objective():  # heads do not interact, so one sum is as good as one problem per head
        optimizer.zero_grad()
        logits = torch.einsum("hnd,hd->hn", features, w) + b[:, None]
        loss = F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits), reduction="sum")
        loss = loss + l2 / 2 * (w ** 2).sum()
        loss.backward()
        return loss
    optimizer.step(objective)
    return w.detach(), b.detach()


def probe_scores(w, b, features, labels):
    """(accuracy [head], mean log-loss [head]) of the probes on these samples."""
    with torch.no_grad():
        logits = torch.einsum("hnd,hd->hn", features.double(), w) + b[:, None]
        labels = labels.double().expand_as(logits)
        accuracy = ((logits > 0).double() == labels).double().mean(1)
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    return accuracy, loss


def top_heads(accuracy, loss, k):
    """Flat indices of the k heads with the highest accuracy, ties broken by the lower loss, then by index."""
    order = sorted(range(len(accuracy)), key=lambda h: (-float(accuracy[h]), float(loss[h]), h))
    return order[:k]


# ----------------------------------------------------------------------------------------------------------------
# 3. Directions
# ----------------------------------------------------------------------------------------------------------------

def head_directions(safe, unsafe):
    """theta [..., dim]: unit mean(safe) - mean(unsafe) per head; sigma [...]: population std of the projections
    of all samples on theta. safe / unsafe: [sample, ..., dim]."""
    theta = safe.mean(0) - unsafe.mean(0)
    theta = theta / theta.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    projections = (torch.cat([safe, unsafe]) * theta).sum(-1)
    return theta, projections.std(0, unbiased=False)


def layer_biases(o_proj_weight, displacement, alpha):
    """W_O (alpha * displacement): the o_proj bias that shifts the chosen heads' outputs by alpha sigma theta."""
    return o_proj_weight.float() @ (alpha * displacement.float())


# ----------------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------------

def build(model_dir, triples=None, heads=None, alpha=DEFAULT_ALPHA, positions=POSITIONS, holdout=HOLDOUT, seed=0,
          max_len=256, device="cpu"):
    """The lock of an aligned model: {"displacements": {o_proj name: [heads * head_dim]}, "meta": {...}}.
    triples: (instruction, refusal, harmful_answer) dicts (None: offline.safety_triples)."""
    triples = load_triples() if triples is None else triples
    if len(triples) < 2:
        raise UserError("SafetyLock: at least 2 triples are needed (one to fit, one to score the probes)")
    if not 0 < holdout < 1 or positions < 1 or not 0 <= alpha < math.inf or max_len < 1:
        raise UserError("SafetyLock: the held-out share must be in (0, 1), positions and max-len >= 1 and alpha "
                        "finite and >= 0")
    if max_len > FLAG_BOUNDS["max_len"] or positions > max_len:
        raise UserError(f"SafetyLock: --max-len must be at most {FLAG_BOUNDS['max_len']:,} and --positions at most "
                        f"--max-len, got {max_len:,} and {positions:,}")
    model, tokenizer = surgery.load_model(str(model_dir), torch.device(device))
    model.eval()
    shape = fingerprint(model.config)
    n_layers, n_heads = shape["num_hidden_layers"], shape["num_attention_heads"]
    k = default_head_count(n_layers, n_heads) if heads is None else heads
    if not 1 <= k <= n_layers * n_heads:
        raise UserError(f"SafetyLock: --heads must be in 1..{n_layers * n_heads}")

    def outputs(answer_key):
        sequences = [answer_sequence(tokenizer, t["instruction"], t[answer_key], max_len) for t in triples]
        return head_outputs(model, sequences, positions, tokenizer.pad_token_id)  # [triple, pos, L, H, d]
    safe, unsafe = outputs("refusal"), outputs("harmful_answer")

    # Probes fitted on some triples and scored on the others.
    order = torch.randperm(len(triples), generator=torch.Generator().manual_seed(seed))
    n_held_out = min(len(triples) - 1, max(1, round(holdout * len(triples))))
    held_out, fitted = order[:n_held_out], order[n_held_out:]

    def samples(which):  # ([head, sample, dim], [sample]): safe = 1, unsafe = 0
        x = torch.cat([safe[which].flatten(0, 1), unsafe[which].flatten(0, 1)])  # [sample, L, H, d]
        y = torch.cat([torch.ones(len(which) * positions), torch.zeros(len(which) * positions)])
        return x.flatten(1, 2).transpose(0, 1), y
    w, b = fit_probes(*samples(fitted))
    accuracy, loss = probe_scores(w, b, *samples(held_out))
    chosen = top_heads(accuracy, loss, k)

    theta, sigma = head_directions(safe.flatten(0, 1), unsafe.flatten(0, 1))  # [L, H, d], [L, H]
    names = o_proj_names(model)
    displacements, head_info = {}, []
    for flat in sorted(chosen):
        layer, head = divmod(flat, n_heads)
        vector = displacements.setdefault(names[layer], torch.zeros(n_heads, shape["head_dim"]))
        vector[head] = sigma[layer, head] * theta[layer, head]
        head_info.append({"layer": layer, "head": head, "held_out_accuracy": round(float(accuracy[flat]), 4),
                          "sigma": round(float(sigma[layer, head]), 6)})
    meta = {"format": LOCK_FORMAT, "fingerprint": shape, "alpha": alpha, "heads": head_info, "k": k,
            "positions": positions, "triples": len(triples), "held_out_triples": n_held_out,
            "model": str(model_dir), "mean_held_out_accuracy": round(float(accuracy.mean()), 4)}
    return {"displacements": {name: v.flatten() for name, v in displacements.items()}, "meta": meta}


def save_lock(path, lock):
    from safetensors.torch import save_file
    tensors = {f"{name}.displacement": v.contiguous() for name, v in lock["displacements"].items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={
        "format": "pt", "safetylock": json.dumps(lock["meta"])}))
    return Path(path)


def load_lock(path):
    """A lock file: a regular file, safetensors (any exception of safetensors is one line), with SafetyLock's
    metadata (the fingerprint, alpha) and finite 1-D displacements; anything else is a UserError naming it."""
    from safetensors import safe_open
    check_given("lock", path)
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such lock file")
    check_input_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("safetylock", "null"))
            displacements = {key.removesuffix(".displacement"): f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise UserError(f"{path}: not a safetensors file ({str(e).splitlines()[0] if str(e) else cause(e)})") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != LOCK_FORMAT:
        raise UserError(f"{path}: not a SafetyLock file (no {LOCK_FORMAT} metadata)")
    shape = meta.get("fingerprint")
    if not isinstance(shape, dict) or not isinstance(meta.get("alpha"), (int, float)) or isinstance(
            meta.get("alpha"), bool) or not all(isinstance(v, (int, str)) and not isinstance(v, bool)
                                                for v in shape.values()):
        raise UserError(f"{path}: its SafetyLock metadata has no model fingerprint or no numeric alpha")
    if not displacements or not all(v.dim() == 1 and v.is_floating_point() and torch.isfinite(v).all()
                                    for v in displacements.values()):
        raise UserError(f"{path}: its displacements are not finite 1-D floating-point tensors")
    return {"displacements": displacements, "meta": meta}


# ----------------------------------------------------------------------------------------------------------------
# Apply
# ----------------------------------------------------------------------------------------------------------------

def check_fits(lock, config, where):
    expected, found = lock["meta"]["fingerprint"], fingerprint(config)
    if expected != found:
        differing = {k: (expected.get(k), found.get(k)) for k in expected if expected.get(k) != found.get(k)}
        raise UserError(f"{where} is not of the lock's model family: (lock, model) differ in {differing}")


def apply(model_or_folder, lock, out=None, alpha=None):
    """Lock a model: o_proj.bias += W_O (alpha * displacement) on the lock's layers.

    model_or_folder: a loaded model (changed in place and returned; takes milliseconds) or a model folder, in
    which case `out` receives the locked model folder (written atomically; returned). lock: a lock file or the
    dict of build(). alpha: None uses the lock's."""
    lock_path = lock if isinstance(lock, (str, os.PathLike)) else None
    lock = load_lock(lock) if lock_path is not None else lock
    alpha = lock["meta"]["alpha"] if alpha is None else alpha
    if not isinstance(alpha, (int, float)) or not 0 <= alpha < math.inf:
        raise UserError(f"SafetyLock: the strength alpha must be finite and >= 0, got {alpha}")
    if isinstance(model_or_folder, nn.Module):
        return apply_to_model(model_or_folder, lock, alpha)
    if out is None:
        raise UserError("SafetyLock: applying to a model folder needs an output folder")
    return apply_to_folder(Path(model_or_folder), lock, out, alpha, lock_path)


@torch.no_grad()
def apply_to_model(model, lock, alpha):
    check_fits(lock, model.config, type(model).__name__)
    for name, displacement in lock["displacements"].items():
        o_proj = model.get_submodule(name)
        bias = layer_biases(o_proj.weight, displacement.to(o_proj.weight.device), alpha).to(o_proj.weight.dtype)
        if o_proj.bias is None:
            o_proj.bias = nn.Parameter(bias, requires_grad=False)
        else:
            o_proj.bias += bias
    return model


def read_checkpoint(folder):
    """(every tensor, the metadata of the first file) of a folder's safetensors, single file or sharded; a damaged
    index or weights file is a UserError naming it."""
    from safetensors import safe_open
    tensors, metadata = {}, None
    for path in weight_files(folder) or [folder / "model.safetensors"]:
        if not path.exists():
            raise UserError(f"{folder}: no {path.name}")
        check_input_file(path)
        try:
            with safe_open(path, framework="pt") as f:
                metadata = metadata if metadata is not None else dict(f.metadata() or {})
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
        except Exception as e:  # safetensors raises its own types for a truncated or damaged file
            raise UserError(f"{path}: not a readable safetensors file ({cause(e)})") from None
    return tensors, metadata


def apply_to_folder(folder, lock, out, alpha, lock_path=None):
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    check_given("out", out)
    out = Path(out)
    if folder.is_dir():  # no FIFO or device where a file is read
        check_folder_files(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a model folder (no config.json)")
    if out.resolve() == folder.resolve():
        raise UserError(f"--out {out} is the model folder itself: the locked model goes to another folder")
    # The locked folder replaces --out whole: it may be no input and hold none.
    check_output("--out", out, [("--model", folder), ("--lock", lock_path)], folder=True, replaced_whole=True)
    try:
        with quiet_loading():  # the library's warnings about the config would come before the error line
            config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # a config.json of wrong types or values fails in the library's own code
        raise UserError(f"{folder / 'config.json'}: {cause(e)}") from None
    check_config(config, str(folder))
    check_fits(lock, config, str(folder))
    tensors, metadata = read_checkpoint(folder)
    if "safetylock" in metadata:
        raise UserError(f"{folder} is already locked (its weights carry SafetyLock metadata)")
    for name, displacement in lock["displacements"].items():
        weight = tensors.get(f"{name}.weight")
        if weight is None or weight.dim() != 2 or weight.shape[1] != displacement.numel():
            raise UserError(f"{folder}: no weight {name}.weight of {displacement.numel()} columns for the lock's "
                            f"displacement: the weights are not of the lock's model family")
    bias_keys = [f"{name}.bias" for name in lock["displacements"]]
    if not all(key in tensors for key in bias_keys):
        # The family's config has to declare the biases; where the flag also gives q/k/v biases, those are zeros.
        if not hasattr(config, "attention_bias"):
            raise UserError(f"a {config.model_type} model folder cannot hold an o_proj bias; lock the loaded model "
                            f"in memory instead (defenses.safetylock.apply(model, lock))")
        config.attention_bias = True
        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config).state_dict()
        except Exception as e:  # the model's own code on the config's values
            raise UserError(f"{folder / 'config.json'}: describes no model that can be built ({cause(e)})") from None
        if not all(key in skeleton for key in bias_keys):
            raise UserError(f"a {config.model_type} model has no o_proj bias even with attention_bias; lock the "
                            f"loaded model in memory instead")
        for key, value in skeleton.items():
            if key.endswith(".bias") and key not in tensors:
                weight = tensors.get(key.removesuffix(".bias") + ".weight")
                if weight is None:
                    raise UserError(f"{folder}: no weight {key.removesuffix('.bias')}.weight: the weights and "
                                    f"config.json do not match")
                tensors[key] = torch.zeros(value.shape, dtype=weight.dtype)
    for name, displacement in lock["displacements"].items():
        bias, rows = tensors[f"{name}.bias"], tensors[f"{name}.weight"].shape[0]
        if tuple(bias.shape) != (rows,):
            raise UserError(f"{folder}: {name}.bias has shape {tuple(bias.shape)}, not ({rows},)")
    for name, displacement in lock["displacements"].items():
        weight = tensors[f"{name}.weight"]
        tensors[f"{name}.bias"] = (tensors[f"{name}.bias"].float()
                                   + layer_biases(weight, displacement, alpha)).to(weight.dtype)
    applied = {"lock": lock["meta"], "alpha": alpha, "source_model": str(folder)}
    metadata = {**metadata, "format": "pt", "safetylock": json.dumps(applied)}

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(staging / "model.safetensors"), metadata=metadata)
        config.save_pretrained(staging)
        for file in folder.iterdir():
            if (file.is_file() and file.name not in NOT_COPIED and not file.name.startswith("model")
                    and file.name != "config.json"):
                shutil.copy2(file, staging / file.name)
        (staging / "safetylock.json").write_text(json.dumps(applied, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp and safetensors make private entries; outputs get the usual
        for file in staging.iterdir():
            os.chmod(file, 0o666 & ~umask)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def replace_folder(new, target):
    """Put folder `new` at `target` by renames: a reader sees the old folder or the new one, never a mix."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def check_lock_target(path, inputs=()):
    """--out of build: a file name in a folder that exists or can be made, and none of the inputs (common's rule
    for every output: no FIFO or device, not the model's weights or the triples)."""
    check_given("out", path)
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path}: is a folder, expected the name of the lock file to write")
    check_output("--out", path, inputs)


def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m defenses.safetylock", formatter_class=HelpFormatter,
        description="SafetyLock: build a lock (per-head safety directions) from an aligned model, or apply one "
                    "to a fine-tuned model of the same family (docs/METHOD.md section 3).",
        epilog="Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 130 interrupted.")
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", formatter_class=HelpFormatter,
                            help="directions of the aligned model -> a small lock file")
    b.add_argument("--model", required=True, help="the aligned model folder")
    b.add_argument("--out", required=True, help="the lock file to write (safetensors)")
    b.add_argument("--triples", help="JSON/JSONL (instruction, refusal, harmful_answer) records "
                                     "(default: offline.safety_triples, harmful_ref with refusals)")
    b.add_argument("--heads", type=int, help="K, heads to lock (default: 24/1024 of the model's heads, at least 1)")
    b.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="strength stored in the lock")
    b.add_argument("--positions", type=int, default=POSITIONS, help="last answer tokens recorded per sequence")
    b.add_argument("--holdout", type=float, default=HOLDOUT, help="share of triples held out to score the probes")
    b.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    b.add_argument("--max-len", type=int, default=256, help="truncate every sequence to this many tokens")
    b.add_argument("--device", default="cpu", help="torch device for the forward passes")
    a = commands.add_parser("apply", formatter_class=HelpFormatter,
                            help="a fine-tuned model folder + a lock -> a locked model folder")
    a.add_argument("--model", required=True, help="the fine-tuned model folder")
    a.add_argument("--lock", required=True, help="the lock file from `build`")
    a.add_argument("--out", required=True, help="the locked model folder to write (replaced atomically)")
    a.add_argument("--alpha", type=float, help="strength (default: the lock's)")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        if args.command == "build":
            if args.heads is not None and args.heads < 1:
                raise UserError(f"--heads must be at least 1, got {args.heads}")
            if args.seed < 0:
                raise UserError(f"--seed must be >= 0, got {args.seed}")
            if args.seed >= 2**63:
                raise UserError(f"--seed must be below 2^63, got {args.seed}")
            check_device(args.device)
            check_lock_target(args.out, [("--model", args.model), ("--triples", args.triples)])
            triples = load_triples(args.triples)
            lock = build(args.model, triples, args.heads, args.alpha, args.positions, args.holdout, args.seed,
                         args.max_len, args.device)
            save_lock(args.out, lock)
            meta = lock["meta"]
            print(f"safetylock: {meta['k']} heads from {meta['triples']} triples (mean held-out probe accuracy "
                  f"{meta['mean_held_out_accuracy']:.3f}): " + ", ".join(
                      f"L{h['layer']}H{h['head']} {h['held_out_accuracy']:.2f}" for h in meta["heads"])
                  + f"; wrote {args.out} in {time.perf_counter() - start:.1f} s")
        else:
            for flag in ("model", "lock", "out"):
                check_given(flag, getattr(args, flag))
            apply(args.model, args.lock, args.out, args.alpha)
            print(f"safetylock: locked {args.model} -> {args.out} in {time.perf_counter() - start:.1f} s")
    except UserError as e:
        print(f"defenses.safetylock: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:  # the lock file and the locked folder are written whole or not at all
        print("\ndefenses.safetylock: interrupted", file=sys.stderr)
        raise SystemExit(130)
    return 0


if __name__ == "__main__":
    main()
