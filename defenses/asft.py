"""AsFT (anchoring safety in fine-tuning): keep the LoRA update along the direction that alignment moved the weights.

    python -m defenses.asft --base BASE [--aligned ALIGNED] [--lambda L] -- <surgery.py flags>

For every LoRA-adapted linear layer m, alignment moved the weight by V_m = W_aligned - W_base. With
C_m = V_m V_m^T / ||V_m||_F the loss is

    L = L_task + lambda * sum_m || (I - C_m) B_m A_m ||_F^2

so the part of each update B A that C_m does not map back onto V's column space is penalised (lambda = 1 in the
paper, with LoRA on q and v, r = 8, lora_alpha 32, lr 5e-5). The released code builds every dense d x d matrix C_m.
Here nothing of size d x d is formed: with B~ = (I - C) B = B - V (V^T B) / ||V||_F ([out, r], two products with V)

    || B~ A ||_F^2 = < B~^T B~, A A^T >        (two r x r Gram matrices)

costs O(d^2 r) time and O(d r) memory beyond V itself. (The grouping BA - V ((V^T B) A) / ||V||_F would build a
d_in x d_in matrix.) The penalty is on B A as the method states, without LoRA's alpha / r scale.

Note C is V V^T / ||V||_F as published, not the projection V V^T / ||V||_2^2: its size scales with ||V||, so a
small alignment step gives a small C and the penalty is close to plain ||B A||_F^2. A module that alignment did
not move (V = 0) gets C = 0, the limit of that formula.

In this project's pipeline BASE is the default model before alignment and ALIGNED the output of the align stage,
which is also the model being fine-tuned (surgery.py's --model, the default for --aligned).
"""
import math
from pathlib import Path

import torch

import surgery
from defenses import loop_parser, run_in_loop
from common import UserError, cause, check_folder_files, check_given, check_input_file, read_json


def outside_alignment_penalty(V, V_norm, B, A):
    """|| (I - C) B A ||_F^2 with C = V V^T / ||V||_F (C = 0 where V = 0), never forming C or B A."""
    B_outside = B - V @ (V.T @ B) / V_norm if V_norm > 0 else B
    return ((B_outside.T @ B_outside) * (A @ A.T)).sum()


def read_weights(folder, names):
    """{name: fp32 tensor} for these tensor names from a model folder's safetensors (single file or sharded);
    only the requested tensors are read. A folder holding a FIFO or device, a damaged index or a truncated or
    damaged weights file is a UserError naming the file (any exception of safetensors is turned into one)."""
    from safetensors import safe_open
    folder = Path(folder)
    check_folder_files(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        document = read_json(index, 64 << 20, "a shard index")
        shard_of = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(shard_of, dict) or not all(isinstance(f, str) and f and Path(f).name == f
                                                     for f in shard_of.values()):
            raise UserError(f"{index}: not a shard index (a weight_map of tensor names to file names in this "
                            f"folder)")
    elif (folder / "model.safetensors").is_file():
        shard_of = {name: "model.safetensors" for name in names}
    else:
        raise UserError(f"{folder}: no model.safetensors (or model.safetensors.index.json) in this folder")
    missing = [name for name in names if name not in shard_of]
    by_shard = {}
    for name in names:
        if name in shard_of:
            by_shard.setdefault(shard_of[name], []).append(name)
    weights = {}
    for shard, shard_names in by_shard.items():
        check_input_file(folder / shard)
        try:
            with safe_open(folder / shard, framework="pt") as f:
                present = set(f.keys())
                missing += [name for name in shard_names if name not in present]
                weights.update({name: f.get_tensor(name).float() for name in shard_names if name in present})
        except Exception as e:  # safetensors raises its own types for a truncated or damaged file
            raise UserError(f"{folder / shard}: not a readable safetensors file ({cause(e)})") from None
    if missing:
        raise UserError(f"{folder}: no tensor {missing[0]} (and {len(missing) - 1} more): not the same model family")
    return weights


class AsFT(surgery.Defense):
    """The AsFT penalty as an extra loss of surgery.py's loop.

    aligned_dir: folder of the aligned model (None: the model being fine-tuned, surgery.py's --model);
    base_dir: folder of the model before alignment; lam: the penalty weight lambda."""

    def __init__(self, aligned_dir, base_dir, lam=1.0):
        if not 0 <= lam < math.inf:
            raise UserError(f"AsFT: lambda must be finite and >= 0, got {lam}")
        check_given("aligned", aligned_dir)
        check_given("base", base_dir)
        for folder in (aligned_dir, base_dir):
            if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
                raise UserError(f"{folder}: is a file, expected a model folder")
            if folder is not None and not Path(folder).is_dir():
                raise UserError(f"{folder}: no such model folder")
            if folder is not None:  # no FIFO or device where the weights are read
                check_folder_files(folder)
            if folder is not None and not any((Path(folder) / name).is_file() for name in
                                              ("model.safetensors", "model.safetensors.index.json")):
                raise UserError(f"{folder}: no model.safetensors (or model.safetensors.index.json) in this folder")
        self.aligned_dir, self.base_dir, self.lam = aligned_dir, base_dir, lam

    def setup(self, model, tokenizer, args):
        adapted = surgery.lora_modules(model)
        if not adapted:
            raise UserError("AsFT penalises the LoRA update B A of each adapted layer: run it without --full")
        names = [f"{name}.weight" for name in adapted]
        aligned_dir = self.aligned_dir or args.model
        aligned, base = read_weights(aligned_dir, names), read_weights(self.base_dir, names)
        self.anchors = []  # (LoRA module, V, ||V||_F) per adapted layer
        for (name, module), key in zip(adapted.items(), names):
            W = module.base.weight.detach().float()
            if aligned[key].shape != W.shape or base[key].shape != W.shape:
                raise UserError(f"{key}: shape {tuple(W.shape)} in the model, {tuple(aligned[key].shape)} in "
                                f"{aligned_dir}, {tuple(base[key].shape)} in {self.base_dir}")
            # The anchor is the start of fine-tuning: another model than the aligned one would make V meaningless.
            if not torch.allclose(aligned[key].to(W.device), W, rtol=1e-3, atol=1e-6):
                raise UserError(f"AsFT: {key} of the model being fine-tuned differs from {aligned_dir}; fine-tune "
                                f"the aligned model itself (surgery.py --model {aligned_dir})")
            V = (aligned[key] - base[key]).to(W.device)
            self.anchors.append((module, V, float(V.norm())))
        unmoved = sum(1 for _, _, norm in self.anchors if norm == 0)
        if unmoved == len(self.anchors):
            raise UserError(f"AsFT: {aligned_dir} and {self.base_dir} are identical in every adapted layer, so "
                            f"there is no alignment direction")
        if unmoved:
            print(f"asft: {unmoved} of {len(self.anchors)} adapted layers were not moved by alignment (V = 0): "
                  f"their whole update is penalised")

    def extra_loss(self, model, step):
        return self.lam * sum(outside_alignment_penalty(V, V_norm, m.lora_B.float(), m.lora_A.float())
                              for m, V, V_norm in self.anchors)


class UnanchoredAsFT(AsFT):
    """The ablation of AsFT's anchor: C_m = 0 in every layer, so the penalty is lambda * sum_m ||B_m A_m||_F^2, a
    plain norm penalty on the LoRA update. Run beside AsFT, it tells how much of AsFT's effect comes from the
    alignment direction and how much from holding the update small."""

    def __init__(self, lam=1.0):
        super().__init__(None, None, lam)

    def setup(self, model, tokenizer, args):
        self.anchors = [(module, None, 0.0) for module in surgery.lora_modules(model).values()]


def main(argv=None):
    parser = loop_parser(
        "python -m defenses.asft",
        "AsFT: LoRA fine-tuning with the penalty lambda * sum_m ||(I - C_m) B_m A_m||_F^2, C_m = V_m V_m^T / "
        "||V_m||_F, V_m = W_aligned - W_base per adapted layer (docs/METHOD.md section 3).",
        epilog="Paper settings: --lora-targets q_proj,v_proj --lora-rank 8 --lora-alpha 32 --lr 5e-5.")
    parser.add_argument("--base", required=True, help="model folder before alignment (W_base)")
    parser.add_argument("--aligned", help="aligned model folder (W_aligned); default: surgery.py's --model, "
                                          "the model being fine-tuned")
    parser.add_argument("--lambda", dest="lam", metavar="L", type=float, default=1.0, help="weight of the penalty")
    return run_in_loop("defenses.asft", parser, lambda a: AsFT(a.aligned, a.base, a.lam), argv,
                       inputs=lambda a: [("--base", a.base), ("--aligned", a.aligned)])


if __name__ == "__main__":
    main()
