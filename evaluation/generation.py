"""3. Evaluate: a model's greedy answers to the held-out prompts, what they measure (HS per judge, fine-tune accuracy,
over-refusal) and its sink divergence on the held-out probes; the development measurements that choose the
alignment and the attack regime (never reported).

    generate           greedy answers to chat-formatted instructions, batched
    evaluate_stage     one model's answers and measurements (cached), then every judge's verdicts (cached)
    dev_harmful_score  keyword HS on the development harmful prompts
    dev_over_refusal   over-refusal on the development benign requests
"""
import json

import numpy as np
import torch

import surgery
from common import read_json_rows, write_jsonl, write_text
from evaluation.judges import KeywordJudge, judge_state
from evaluation.reading import predicted_label
from evaluation.stages import cached_stage, device_for, file_digest, safe_name, stage_dir
from evaluation.training import train_sink_pos
from surgery import read_records


@torch.no_grad()
def generate(model, tokenizer, instructions, max_new_tokens, batch_size, desc):
    """Greedy answers to chat-formatted instructions, batched with left padding (prompts sorted by length so a
    batch wastes little on padding; answers come back in input order)."""
    from transformers import GenerationConfig
    from tqdm.auto import tqdm
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False) for text in instructions]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, dynamic_ncols=True):
        chunk = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)  # the chat template holds the special tokens
        out = model.generate(**batch, generation_config=config)
        for i, row in zip(chunk, out[:, batch["input_ids"].shape[1]:]):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return answers


def prompt_source(record):
    """Where a held-out prompt comes from, for HS by source: the part of its category before "/" (the offline splits'
    "do-not-answer/<area>"), else the package its source names, else "unlabelled"."""
    category = str(record.get("category", ""))
    if "/" in category:
        return category.split("/")[0]
    return str(record.get("source", "")).split("==")[0] or "unlabelled"


def evaluate_stage(args, files, judges, name, model_path):
    """One model's answers to the harmful prompts, the task sentences and the benign requests, and its sink
    divergence on the held-out probes at the training stages' sink position (cached), then every judge's verdicts
    on the harmful answers."""
    harmful_records, task_records = read_records(files["eval_harmful"]), read_records(files["eval_task"])
    benign_records = read_records(files["eval_benign"])
    sink_pos = train_sink_pos(args)
    config = {"stage": "generate", "model": str(model_path), "eval_harmful": file_digest(files["eval_harmful"]),
              "eval_task": file_digest(files["eval_task"]), "eval_benign": file_digest(files["eval_benign"]),
              "probes": [file_digest(files["harmful_probe"]), file_digest(files["harmless_probe"])],
              "max_new_tokens": args.max_new_tokens, "task_tokens": args.task_tokens,
              "benign_tokens": args.benign_tokens, "max_len": args.max_len}
    if sink_pos != 0:  # only when moved, so that the stages of the results at the default stay valid
        config["sink_position"] = sink_pos

    def compute(folder):
        model, tokenizer = surgery.load_model(str(model_path), device_for(args))
        answers = {}
        for kind, records, tokens in (("harmful", harmful_records, args.max_new_tokens),
                                      ("task", task_records, args.task_tokens),
                                      ("benign", benign_records, args.benign_tokens)):
            answers[kind] = generate(model, tokenizer, [r["instruction"] for r in records], tokens, args.gen_batch,
                                     f"{name}: {kind}")
        write_jsonl(folder / "generations.jsonl", [
            {"kind": kind, "instruction": r["instruction"], "answer": a}
            for kind, recs in (("harmful", harmful_records), ("task", task_records), ("benign", benign_records))
            for r, a in zip(recs, answers[kind])])
        labels = sorted({r["output"].strip().lower() for r in task_records})
        correct = [int(predicted_label(a, labels) == r["output"].strip().lower())
                   for r, a in zip(task_records, answers["task"])]
        refused = [int(not flag) for flag in KeywordJudge().harmful(None, answers["benign"])]
        probes = [[surgery.encode(tokenizer, r, args.max_len)[0] for r in read_records(files[key])]
                  for key in ("harmful_probe", "harmless_probe")]
        heldout = surgery.probe_divergence(model, *probes, sink_pos, tokenizer.pad_token_id)
        return {"fine_tune_accuracy": 100 * sum(correct) / len(correct), "task_correct": correct,
                "answered_task": sum(predicted_label(a, labels) is not None for a in answers["task"]),
                "over_refusal": 100 * sum(refused) / len(refused), "benign_refused": refused,
                "divergence_heldout": heldout.tolist()}
    generated = cached_stage(args.work_dir, f"generate-{name}", config, compute)
    folder = stage_dir(args.work_dir, f"generate-{name}", config)
    rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    instructions = [r["instruction"] for r in rows if r["kind"] == "harmful"]
    answers = [r["answer"] for r in rows if r["kind"] == "harmful"]
    harmful_score, harmful_flags, seconds = {}, {}, generated["seconds"]
    for judge in judges:
        verdict = cached_stage(args.work_dir, f"verdict-{name}-{safe_name(judge.name)}",
                               {"stage": "verdict", "generations": file_digest(folder / "generations.jsonl"),
                                **judge.config(), "judge_state": judge_state(judge)},
                               lambda _, judge=judge: {"flags": judge.harmful(instructions, answers)})
        harmful_flags[judge.name] = [int(f) for f in verdict["flags"]]
        harmful_score[judge.name] = 100 * sum(verdict["flags"]) / len(verdict["flags"])
        seconds += verdict["seconds"]
    return {"harmful_score": harmful_score, "harmful_flags": harmful_flags, "n_harmful": len(answers),
            "harmful_sources": [prompt_source(r) for r in read_json_rows(files["eval_harmful"])],
            "eval_seconds": round(seconds, 1), "generations": str(folder / "generations.jsonl"),
            "harmful_answers": answers, "benign_answers": [r["answer"] for r in rows if r["kind"] == "benign"],
            **{k: generated[k] for k in ("fine_tune_accuracy", "task_correct", "answered_task", "over_refusal",
                                         "benign_refused", "divergence_heldout")}}


def dev_answered(args, files, key, name, model_path, tokens):
    """Share (%) of a development file's requests answered without a refusal phrase (the keyword judge). The
    development files choose the alignment and the attack regime; they never enter a reported number."""
    records = read_records(files[key])
    config = {"stage": "dev", "model": str(model_path), "prompts": file_digest(files[key]), "max_new_tokens": tokens}
    stage = f"dev-{key}"  # named by its model and prompts alone: the chosen alignment's figures are reused

    def compute(folder):
        model, tokenizer = surgery.load_model(str(model_path), device_for(args))
        answers = generate(model, tokenizer, [r["instruction"] for r in records], tokens, args.gen_batch,
                           f"{name}: {key}")
        write_text(folder / "answers.json", json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
        return {"harmful_score": 100 * float(np.mean(KeywordJudge().harmful(None, answers)))}
    return cached_stage(args.work_dir, stage, config, compute)["harmful_score"]


def dev_harmful_score(args, files, name, model_path):
    """Keyword HS on the development harmful prompts."""
    return dev_answered(args, files, "eval_harmful_dev", name, model_path, args.max_new_tokens)


def dev_over_refusal(args, files, name, model_path):
    """Over-refusal on the development benign requests."""
    return 100 - dev_answered(args, files, "eval_benign_dev", name, model_path, args.benign_tokens)
