#!/usr/bin/env python3
"""Put your own questions to a model: greedy answers to a prompt file, with LoRA adapters merged in first.

    python answer.py --prompts questions.txt --out answers.jsonl \
        --adapter results/models/aligned/adapter --adapter results/models/sft_p0.2_s44/adapter

The adapters are merged into the model in the order given, each into the model the one before it made: the
released attack adapters (results/models/) were trained on the aligned model, so the aligned adapter comes first.
A prompt file is JSON or JSONL records with "prompt" or "instruction" (a name ending .json or .jsonl, or a first
line that starts with "{"), or plain text with one prompt per line. Each answer is the model's greedy continuation of
the prompt in its chat template; the output is JSONL, {"prompt", "answer"} per line, written whole when every answer
is in. A prompt whose answer would pass the model's context is refused before any answer is made.
"""
import math
import re
import sys
from pathlib import Path

import torch

import offline
from common import (ArgumentParser, UserError, cause, check_given, check_input_file, check_output, read_json,
                    parse_json_rows, read_text_file, write_jsonl)


def read_prompts(path):
    """The prompts of a prompt file: JSON or JSONL records with a "prompt" or "instruction" string (a name ending
    .json or .jsonl, or a first line that starts with "{"), else plain text, one prompt per non-blank line."""
    path = Path(path)
    text = read_text_file(path, what="a prompt file").removeprefix("\ufeff")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path}: no prompt in the file")
    if path.suffix.lower() not in (".json", ".jsonl") and not lines[0].lstrip().startswith("{"):
        return [line.strip() for line in lines]
    rows = parse_json_rows(text, path)
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{path}: expected a JSON list of records, or JSONL (one record per line)")
    prompts = []
    for number, record in enumerate(rows, 1):
        prompt = record.get("prompt", record.get("instruction")) if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{path}: record {number}: no non-empty \"prompt\" or \"instruction\" string")
        prompts.append(prompt)
    return prompts


# peft settings that change what merging means; a plain W += (alpha / r) B A would silently build another model
UNMERGED_FIELDS = ("use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias")
LORA_KEY = re.compile(r"[\w.]+\.lora_[AB]\.weight")


def read_adapter(folder):
    """A peft LoRA adapter folder: its config and its tensors (as peft names them), checked to be a plain LoRA that
    W += scale B A merges (no DoRA, no per-module ranks), with finite lora_A / lora_B pairs of rank r."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = Path(folder)
    where = f"--adapter {folder}"
    if not folder.is_dir():
        raise UserError(f"{where}: not a folder (a peft adapter folder holds adapter_config.json and "
                        f"adapter_model.safetensors)")
    config = read_json(folder / "adapter_config.json", max_bytes=1 << 20, what="an adapter config")
    weights = folder / "adapter_model.safetensors"
    check_input_file(weights)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{weights}: not a safetensors file ({cause(e)})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UserError(f"{where}: adapter_config.json is not a LoRA config (its peft_type must be \"LORA\")")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if type(rank) is not int or rank < 1 or type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise UserError(f"{where}: adapter_config.json needs an integer r >= 1 and a finite number lora_alpha "
                        f"(r {rank!r}, lora_alpha {alpha!r})")
    for field in UNMERGED_FIELDS:
        if config.get(field):
            raise UserError(f"{where}: adapter_config.json sets {field}, which this plain W += (alpha / r) B A merge "
                            f"does not do; merge it with peft (merge_and_unload) and pass --model the result")
    for key, tensor in tensors.items():
        if not LORA_KEY.fullmatch(key):
            raise UserError(f"{weights}: tensor {key} is not a lora_A or lora_B weight, so this is not a plain LoRA "
                            f"adapter")
        if tensor.dim() != 2 or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise UserError(f"{weights}: tensor {key} is not a finite floating-point matrix")
    for name in {key.rsplit(".lora_", 1)[0] for key in tensors}:
        a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        if a is None or b is None:
            raise UserError(f"{weights}: {name} has only one of lora_A and lora_B")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise UserError(f"{weights}: {name} is not of rank r = {rank} (adapter_config.json)")
    if not tensors:
        raise UserError(f"{weights}: holds no lora_A / lora_B pairs")
    return config, tensors


@torch.no_grad()
def merge_adapter(model, folder, adapter=None):
    """W += scale B A for every adapted linear layer, in the weights' dtype: what peft's merge does (scale =
    lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora). adapter: read_adapter(folder), if already read."""
    config, tensors = adapter or read_adapter(folder)
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    modules = dict(model.named_modules())
    for name in sorted({key.rsplit(".lora_", 1)[0] for key in tensors}):
        target = modules.get(name.removeprefix("base_model.model."))
        a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        if not isinstance(target, torch.nn.Linear) or (b.shape[0], a.shape[1]) != tuple(target.weight.shape):
            raise UserError(f"--adapter {folder}: {name} does not fit this model (no linear layer of that name and "
                            f"shape): an adapter of another model, or the adapters in the wrong order")
        target.weight += (scale * b.float() @ a.float()).to(target.weight.dtype)  # as surgery.py merges: bit for bit


def check_context(model, tokenizer, prompts, max_new_tokens, path):
    """Every chat-formatted prompt and its answer fit the model's context: past it a model with rotary positions
    answers from positions it never saw, and a very long prompt would run for hours instead of failing."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return
    for number, prompt in enumerate(prompts, 1):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])  # as generate() tokenizes it
        if length + max_new_tokens > context:
            raise UserError(f"{path}: prompt {number} is {length:,} tokens in the chat template, which with "
                            f"--max-new-tokens {max_new_tokens} passes the model's context of {context:,} tokens")


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
        for flag, value in (("prompts", args.prompts), ("model", args.model), *(("adapter", a) for a in args.adapter)):
            check_given(flag, value)
        model_name = args.model or str(offline.default_model_dir())
        inputs = [("--prompts", args.prompts), ("--model", model_name)] + [("--adapter", a) for a in args.adapter]
        out = check_output("--out", args.out, inputs)
        prompts = read_prompts(args.prompts)
        adapters = [read_adapter(folder) for folder in args.adapter]  # every input checked before the model loads
        import surgery
        from evaluation.generation import generate
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
        model, tokenizer = surgery.load_model(model_name, device)
        check_context(model, tokenizer, prompts, args.max_new_tokens, args.prompts)
        for folder, adapter in zip(args.adapter, adapters):
            merge_adapter(model, folder, adapter)
        answers = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, "answering")
    except (UserError, offline.OfflineDataError) as e:
        print(f"answer.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    write_jsonl(out, [{"prompt": q, "answer": a} for q, a in zip(prompts, answers)])
    print(f"wrote {out}: {len(answers)} answers")


if __name__ == "__main__":
    main()
