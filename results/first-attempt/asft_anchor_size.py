#!/usr/bin/env python3
"""How far AsFT's C_m = V_m V_m^T / ||V_m||_F is from a projector (results/first-attempt/README.md, finding 4): per
adapted layer, ||V_m||_F and ||C_m||_2 = sigma_1(V_m)^2 / ||V_m||_F, the most that (I - C_m) shrinks an update along
V_m's top direction (a projector would remove it: 1).

    python results/first-attempt/asft_anchor_size.py --aligned runs/eval/train-align-<hash> [--base DIR]
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from defenses.asft import read_weights  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # eval.py's LoRA targets


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--aligned", required=True, help="the aligned model folder (eval.py's align stage)")
    p.add_argument("--base", help="the model before alignment (default: the embedded SmolLM2-135M-Instruct)")
    args = p.parse_args()
    if args.base is None:
        import offline
        args.base = str(offline.default_model_dir())
    with safe_open(str(Path(args.aligned) / "model.safetensors"), framework="pt") as f:
        names = sorted(k for k in f.keys() if any(k.endswith(f"self_attn.{t}.weight") for t in TARGETS))
    aligned, base = read_weights(args.aligned, names), read_weights(args.base, names)
    v_norms, c_norms = [], []
    for name in names:
        V = aligned[name] - base[name]
        v_norms.append(float(V.norm()))
        c_norms.append(float(torch.linalg.matrix_norm(V, 2)) ** 2 / v_norms[-1])
    print(f"{len(names)} adapted layers: ||V||_F median {statistics.median(v_norms):.2f} (max {max(v_norms):.2f}); "
          f"||C||_2 median {statistics.median(c_norms):.2f} (max {max(c_norms):.2f})")


if __name__ == "__main__":
    main()
