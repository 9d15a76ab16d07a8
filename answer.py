#!/usr/bin/env python3
"""Put your own questions to a model: greedy answers to a prompt file, with LoRA adapters merged in first.

    python answer.py --prompts questions.txt --out answers.jsonl \
        --adapter results/models/aligned/adapter --adapter results/models/sft_p0.2_s44/adapter

The adapters are merged into the model in the order given, each into the model the one before it made: the
released attack adapters (results/models/) were trained on the aligned model, so the aligned adapter comes first.
A prompt file is JSONL with "prompt" or "instruction" per line, or plain text with one prompt per line. Each answer
is the model's greedy continuation of the prompt in its chat template; the output is JSONL, {"prompt", "answer"}
per line, written whole when every answer is in.
"""
import json
import sys
from pathlib import Path

import torch

import offline
from common import (ArgumentParser, UserError, check_encodable, check_input_file, check_output, read_text_file,
                    write_jsonl)


def read_prompts(path):
    """The prompts of a JSONL file ("prompt" or "instruction" per record) or of a text file (one per line)."""
    text = read_text_file(path, what="a prompt file")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path}: no prompt in the file")
    if not lines[0].lstrip().startswith("{"):
        return [line.strip() for line in lines]
    check_encodable(text, path)
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {number}: not JSON ({e.msg})") from None
        prompt = record.get("prompt", record.get("instruction")) if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{path}: line {number}: no non-empty \"prompt\" or \"instruction\" string")
        prompts.append(prompt)
    return prompts


def read_adapter(folder):
    """A peft LoRA adapter folder: its config and its tensors (as peft names them), checked to be LoRA."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = Path(folder)
    try:
        check_input_file(folder / "adapter_model.safetensors")
        config = json.loads(read_text_file(folder / "adapter_config.json", what="an adapter config"))
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise UserError(f"--adapter {folder}: not a peft adapter folder ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int) \
            or not isinstance(config.get("lora_alpha"), (int, float)) or config["r"] < 1:
        raise UserError(f"--adapter {folder}: adapter_config.json is not a LoRA config with integer r >= 1 and a "
                        f"lora_alpha")
    return config, tensors


@torch.no_grad()
def merge_adapter(model, folder):
    """W += (lora_alpha / r) B A for every adapted linear layer, in the weights' dtype: what peft's merge does."""
    config, tensors = read_adapter(folder)
    scale = config["lora_alpha"] / config["r"]
    modules = dict(model.named_modules())
    names = sorted({key.rsplit(".lora_", 1)[0] for key in tensors if ".lora_" in key})
    if not names or len(tensors) != 2 * len(names):
        raise UserError(f"--adapter {folder}: adapter_model.safetensors holds no lora_A / lora_B pairs")
    for name in names:
        target = modules.get(name.removeprefix("base_model.model."))
        a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        if not isinstance(target, torch.nn.Linear) or a is None or b is None \
                or (b.shape[0], a.shape[1]) != tuple(target.weight.shape) or a.shape[0] != b.shape[1]:
            raise UserError(f"--adapter {folder}: {name} does not fit this model (no linear layer of that name and "
                            f"shape): an adapter of another model, or the adapters in the wrong order")
        target.weight += (scale * b.float() @ a.float()).to(target.weight.dtype)  # as surgery.py merges: bit for bit


def parse_args(argv=None):
    p = ArgumentParser(prog="answer.py", description=__doc__.split("\n\n")[0],
                       epilog="Exit status: 0 answered; 2 a bad input (one line on stderr, nothing written).")
    p.add_argument("--prompts", required=True, help="JSONL with \"prompt\" or \"instruction\", or one prompt per line")
    p.add_argument("--out", required=True, help="the answers, JSONL {\"prompt\", \"answer\"} per line")
    p.add_argument("--model", help="local folder or hub id (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", default=[],
                   help="a peft LoRA adapter folder, merged in the order given (repeat the flag)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="greedy tokens per answer")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: CUDA when present")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if not 1 <= args.max_new_tokens <= 1 << 16 or not 1 <= args.batch_size <= 1 << 16:
            raise UserError("--max-new-tokens and --batch-size must be between 1 and 65,536")
        inputs = [("--prompts", args.prompts)] + [("--adapter", a) for a in args.adapter]
        out = check_output("--out", args.out, inputs)
        prompts = read_prompts(args.prompts)
        import surgery
        from evaluation.generation import generate
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
        model, tokenizer = surgery.load_model(args.model or str(offline.default_model_dir()), device)
        for folder in args.adapter:
            merge_adapter(model, folder)
        answers = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, "answering")
    except (UserError, offline.OfflineDataError) as e:
        print(f"answer.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    write_jsonl(out, [{"prompt": q, "answer": a} for q, a in zip(prompts, answers)])
    print(f"wrote {out}: {len(answers)} answers")


if __name__ == "__main__":
    main()
