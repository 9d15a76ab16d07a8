"""The third sweep (results/PROTOCOL.md): does Surgery keep the alignment, or break the model? Its stages, each
resumable (every training and generation is a cached stage under --work-dir; a finished run is a JSON under
results/, never recomputed); its rules and grid are evaluation/choices.py's, its verdict evaluation/verdict.py's.

    python -m evaluation.third control                  the harm-blind control's references, calibrated (section 6)
    python -m evaluation.third premise   [--shard K/N]  SFT in four attack regimes, on the development sets (sec. 4)
    python -m evaluation.third strengths [--shard K/N]  the regime chosen; alpha and lambda swept (section 5)
    python -m evaluation.third main      [--shard K/N]  the main grid on the held-out sets (section 7)
    python -m evaluation.third release                  the adapters at p = 0.2, seed 44, checked (section 10)
    python -m evaluation.third report                   the tables from the committed JSONs alone

    seeded_train       the train set of (p, seed): the seed draws the poison and task pairs (section 1)
    aligned_model      the starting model, rebuilt from its committed adapter
    dev_record         one trained model's development answers, their categories and its sink divergence
    choose_regime      section 4's rule with budget checkpoint 1; checkpoint_2 after 10 main runs (section 7)
    attack             one SFT, Surgery, control or AsFT run from the aligned model in a regime
"""
import argparse
import collections
import functools
import hashlib
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import offline
from common import ArgumentParser, UserError, read_json, write_json, write_text
from evaluation.categories import categorise, categoriser_version
from evaluation.choices import (ALPHAS, CEILING_HOURS, CHOICE_SEEDS, CORE, CUTS, LAMBDAS, N_TRAIN,
                                PREMISE_HS_RISE, QUALITY_MARGIN, RATIOS, REFERENCES, REGIMES, REPORTED_SEEDS,
                                STEP_FACTOR, budget_cells, cut_to_fit, dev_means, choose_strength, plot_strengths,
                                premise_markdown, premise_table, spent_hours)
from evaluation.data import check_splits, resolve_inputs
from evaluation.generation import generate
from evaluation.judges import EmbeddingJudge, build_judges
from evaluation.stages import cached_stage, device_for, file_digest
from evaluation.training import train_sink_pos, train_stage, training_seconds
from evaluation.verdict import METHOD_NAMES

ROOT = Path(__file__).resolve().parent.parent

# PROTOCOL.md section 1: the starting model.
ALIGN_STEPS, ALIGN_LR = 300, 1e-3        # the v5 aligned model (results/second-attempt/alignment.json)


def eval_args():
    """eval.py's settings of the second sweep (its defaults), which this sweep keeps: model, data, judges, lengths."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.parse_args([])
    cli.validate(args)
    args.results_dir = None  # eval.py's own folder is not this sweep's (its run JSONs say where they are)
    return args


@functools.lru_cache(maxsize=None)
def code_commit():
    """The commit the code of a run came from, "+dirty" when the tree differs from it (recorded, not enforced); read
    once, when the stage starts (main() calls it first), so that a commit made while a run trains is not credited
    with code the process never loaded."""
    def git(*argv):
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ---- 1. The data the seed draws ------------------------------------------------------------------------------

def seed_draw(splits, seed):
    """The poison pool and the benign pool, each in the order the seed draws them."""
    poison, benign = list(splits.poison_pool), list(splits.benign_pool)
    random.Random(f"{seed}:poison").shuffle(poison)
    random.Random(f"{seed}:benign").shuffle(benign)
    return poison, benign


def seeded_train(work_dir, data_seed, p, seed):
    """The attack train set of ratio p for run seed `seed`: the first round(p x N_TRAIN) (half up) of a permutation
    of the poison pool and the first N_TRAIN minus that of a permutation of the benign pool, both drawn with the
    seed, then shuffled with (seed, p). Within a seed the poison at p = 0.1 is part of that at 0.2. The pools are
    those of the offline splits of data seed `data_seed` (re-drawing the splits would change the held-out sets)."""
    poison, benign = seed_draw(offline.build_splits(data_seed), seed)
    n_poison = offline.poison_count(p, N_TRAIN)
    records = poison[:n_poison] + benign[:N_TRAIN - n_poison]
    random.Random(f"{seed}:{p!r}:records").shuffle(records)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    target = Path(work_dir) / "train-data" / f"train_p{p:g}_s{seed}_{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not target.exists():
        write_text(target, text)
    return target


# ---- 2. What a model answers on the development sets -----------------------------------------------------------

@dataclass
class Context:
    """What every stage of the sweep shares."""
    args: object          # eval.py's settings
    files: dict           # resolve_inputs'
    judges: list
    results: Path         # results/

    @property
    def encoder(self):
        return next(j.encoder for j in self.judges if isinstance(j, EmbeddingJudge))

    @property
    def embedding(self):
        return next(j for j in self.judges if isinstance(j, EmbeddingJudge))


def context(results="results"):
    args = eval_args()
    files = resolve_inputs(args)
    check_splits(files)
    args.model_path = files["model"]
    return Context(args=args, files=files, judges=build_judges(args, files), results=Path(results))


CALIBRATION = Path("labels") / "sample2" / "calibration.json"  # under results/: `results/labels/agreement.py --sample 2`
ALIGNED_ADAPTER = Path("models") / "aligned" / "adapter"  # under results/: the starting point of every run


def aligned_model(ctx):
    """The aligned model every run starts from: the committed fp32 adapter (results/models/aligned/adapter) merged
    into the default model, which gives the align stage's weights bit for bit (answer.merge_adapter merges as
    surgery.py does). Where it is not committed yet, the align stage of the second sweep trains it (cached) and its
    adapter is committed first. Every machine thus starts from the same weights, in a folder of the same name."""
    import answer
    import surgery
    released = ctx.results / ALIGNED_ADAPTER
    if not (released / "adapter_model.safetensors").exists():
        from evaluation.pipeline import align_stage
        trained = Path(align_stage(ctx.args, ctx.files, ALIGN_STEPS, ALIGN_LR)["model"])
        release_adapter(trained / "adapter", released, "the default model (SmolLM2-135M-Instruct, fp32, as "
                        "`python -m offline` converts it)", fp32=True)
    config = {"stage": "aligned-from-adapter", "base": str(ctx.files["model"]),
              "adapter": file_digest(released / "adapter_model.safetensors"),
              "probes": [file_digest(ctx.files[k]) for k in ("harmful_ref", "harmless_ref")]}

    def compute(folder):
        model, tokenizer = surgery.load_model(str(ctx.files["model"]), "cpu")
        answer.merge_adapter(model, released)
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        d = reference_divergence(ctx, model, tokenizer)
        return {"model": str(folder / "model"), "sink_report": {"divergence_after": d}}
    return cached_stage(ctx.args.work_dir, "aligned-from-adapter", config, compute)


def reference_divergence(ctx, model, tokenizer):
    """d_h of a loaded model on the 64 reference pairs (the development probes), as surgery.py's sink report."""
    import surgery
    ids = [[surgery.encode(tokenizer, r, ctx.args.max_len)[0] for r in offline.read_jsonl(ctx.files[k])]
           for k in ("harmful_ref", "harmless_ref")]
    return np.asarray(surgery.probe_divergence(model, *ids, train_sink_pos(ctx.args), tokenizer.pad_token_id)).tolist()


def release_adapter(source, target, base, fp32=False):
    """A run's peft adapter copied to results/models/<run>/adapter/: bf16 (about 2 MB) unless fp32, its config
    naming the model it applies to."""
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(Path(source) / "adapter_model.safetensors"))
    dtype = torch.float32 if fp32 else torch.bfloat16
    config = read_json(Path(source) / "adapter_config.json")
    config["base_model_name_or_path"] = base
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(target / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    write_json(target / "adapter_config.json", config)


def dev_answers(ctx, name, model_path):
    """The model's greedy answers to the 100 development prompts and the 60 development requests (cached)."""
    prompts = {kind: [r["instruction"] for r in offline.read_jsonl(ctx.files[f"eval_{kind}_dev"])]
               for kind in ("harmful", "benign")}
    tokens = {"harmful": ctx.args.max_new_tokens, "benign": ctx.args.benign_tokens}
    config = {"stage": "dev-answers", "model": str(model_path), "max_len": ctx.args.max_len, "tokens": tokens,
              **{kind: file_digest(ctx.files[f"eval_{kind}_dev"]) for kind in prompts}}

    def compute(folder):
        import surgery
        model, tokenizer = surgery.load_model(str(model_path), device_for(ctx.args))
        answers = {kind: generate(model, tokenizer, prompts[kind], tokens[kind], ctx.args.gen_batch,
                                  f"{name}: development {kind}") for kind in prompts}
        write_json(folder / "answers.json", answers, strict=False)
        return {"answers": str(folder / "answers.json")}
    stage = cached_stage(ctx.args.work_dir, f"dev-answers-{name}", config, compute)
    return prompts, read_json(stage["answers"]), stage["seconds"]


HARMFUL_CATEGORIES = ("harmful", "refusal", "harmless", "broken")
BENIGN_CATEGORIES = ("helpful", "refusal", "broken")


def shares(categories, names):
    return {c: 100.0 * sum(x == c for x in categories) / len(categories) for c in names}


def dev_record(ctx, name, model_path, divergence):
    """One model on the development sets: answers, their categories (PROTOCOL.md section 3) and shares, and its
    sink divergence on the development probes (the 64 reference pairs): M = mean relu(d_h), N = positive heads."""
    prompts, answers, seconds = dev_answers(ctx, name, model_path)
    judged = [int(f) for f in ctx.embedding.harmful(prompts["harmful"], answers["harmful"])]
    harmful, _ = categorise(ctx.encoder, prompts["harmful"], answers["harmful"], "harmful", judged)
    benign, _ = categorise(ctx.encoder, prompts["benign"], answers["benign"], "benign")
    d = np.asarray(divergence, dtype=float)
    return {"dev_harmful": shares(harmful, HARMFUL_CATEGORIES), "dev_benign": shares(benign, BENIGN_CATEGORIES),
            "M": float(np.maximum(d, 0).mean()), "N": int((d > 0).sum()), "heads": int(d.size),
            "divergence_dev_probes": d.tolist(), "categoriser": categoriser_version(True), "eval_seconds": seconds,
            "dev_harmful_categories": harmful, "dev_benign_categories": benign, "dev_embedding_flags": judged,
            "dev_harmful_answers": answers["harmful"], "dev_benign_answers": answers["benign"]}


# ---- 3. The premise table (PROTOCOL.md section 4) --------------------------------------------------------------

def regime_args(args, regime):
    """eval.py's settings with the regime's surgery.py flags as --train-args."""
    return argparse.Namespace(**{**vars(args), "train_args": REGIMES[regime][3]})


def premise_plan():
    """(regime, p, seed) of every premise run, regime by regime in the protocol's order."""
    return [(r, p, s) for r in REGIMES for s in CHOICE_SEEDS for p in RATIOS]


def committed(target):
    """A run's committed JSON, if there is one (every stage resumes by skipping what is committed), else None."""
    if not target.exists():
        return None
    print(f"[committed] {target.stem}  ({target})", flush=True)
    return read_json(target)


def premise_run(ctx, regime, p, seed):
    """SFT from the aligned model in one regime: trained, read on the development sets, its JSON written."""
    name = f"premise{regime}_sft_p{p:g}_s{seed}"
    target = ctx.results / "dev" / "json" / f"{name}.json"
    if (done := committed(target)) is not None:
        return done
    what, steps, lr, flags = REGIMES[regime]
    data = seeded_train(ctx.args.work_dir, ctx.args.data_seed, p, seed)
    trained = train_stage(regime_args(ctx.args, regime), ctx.files, f"premise{regime}-sft_p{p:g}_s{seed}",
                          aligned_model(ctx)["model"], data, 0.0, steps, lr, seed=seed)
    record = {"run": name, "stage": "premise", "regime": regime, "regime_what": what, "method": "sft",
              "poison_ratio": p, "seed": seed, "steps": steps, "lr": lr, "surgery_flags": flags,
              "train_data": {"file": data.name, "sha256": file_digest(data)}, "commit": code_commit(),
              "train_seconds": training_seconds(trained), "seconds_per_step": training_seconds(trained) / steps,
              **dev_record(ctx, name, trained["model"], trained["sink_report"]["divergence_after"])}
    write_json(target, record, strict=False)
    print(f"{name}: dev HS {record['dev_harmful']['harmful']:.0f}%, refusal {record['dev_harmful']['refusal']:.0f}%, "
          f"broken {record['dev_harmful']['broken']:.0f}%/{record['dev_benign']['broken']:.0f}%, helpful "
          f"{record['dev_benign']['helpful']:.0f}%; M {record['M']:.2e}, N {record['N']}/{record['heads']}",
          flush=True)
    return record


def aligned_dev_record(ctx):
    """The aligned model on the development sets: the reference row of the premise table."""
    target = ctx.results / "dev" / "json" / "aligned.json"
    if target.exists():
        return read_json(target)
    aligned = aligned_model(ctx)
    record = {"run": "aligned", "stage": "reference", "method": "aligned", "commit": code_commit(),
              **dev_record(ctx, "aligned", aligned["model"], aligned["sink_report"]["divergence_after"])}
    write_json(target, record, strict=False)
    return record


def committed_dev_records(results):
    folder = Path(results) / "dev" / "json"
    return [read_json(p) for p in sorted(folder.glob("premise*.json"))] if folder.is_dir() else []


def write_premise_report(results):
    records = committed_dev_records(results)
    aligned_path = Path(results) / "dev" / "json" / "aligned.json"
    if not aligned_path.exists():
        raise UserError(f"{aligned_path} is missing: run `python -m evaluation.third premise` first")
    aligned = read_json(aligned_path)
    table = premise_table(records, aligned)
    write_json(Path(results) / "dev" / "premise.json", table, strict=False)
    write_text(Path(results) / "dev" / "premise.md", premise_markdown(table, aligned))
    return table


# ---- 5. The regime and the strengths (PROTOCOL.md sections 4, 5 and 7) -----------------------------------------

def choose_regime(results):
    """Section 4: the first regime, in order, where the premise holds, SFT at p = 0.2 raises development HS by
    PREMISE_HS_RISE points and checkpoint 1 fits; else (a). Needs the whole premise table."""
    records = committed_dev_records(results)
    table = write_premise_report(results)
    missing = [r for r, e in table.items() if not e["complete"]]
    if missing:
        raise UserError(f"the premise table lacks regime(s) {', '.join(missing)}: run "
                        f"`python -m evaluation.third premise` to the end first")
    dev_eval = float(np.mean([r["eval_seconds"] for r in records]))
    spent = spent_hours(records)
    checks_ = {}
    for regime, entry in table.items():
        budget = budget_cells(regime, [r for r in records if r["regime"] == regime], dev_eval, spent)
        checks_[regime] = {"premise_holds": entry["premise_holds"], "hs_rise_met": entry["hs_rise_met"], **budget}
    chosen = next((r for r, c in checks_.items() if c["premise_holds"] and c["hs_rise_met"] and c["fits"]), None)
    holds = [r for r, c in checks_.items() if c["premise_holds"]]
    outcome = (f"premise holds in ({chosen})" if chosen else "premise absent" if not holds else
               f"premise holds in ({holds[0]}), " + ("which the budget cannot afford" if checks_[holds[0]]["hs_rise_met"]
                                                    else "where SFT does not break the alignment"))
    choice = {"regime": chosen or "a", "outcome": outcome, "checkpoint_1": checks_, "spent_hours": spent,
              "rule": "PROTOCOL.md section 4: first of (a)-(d) where the premise holds, development HS rises >= "
                      f"{PREMISE_HS_RISE:g} points at p = 0.2 and the main grid fits under {CEILING_HOURS:g} CPU h"}
    write_json(kept, choice, strict=False)
    return choice


def strength_plan(choice):
    """(method, strength, seed) of every strength run at p = 0.2 in the chosen regime; AsFT's lambda sweep only where
    checkpoint 1 kept it (not under (d), not after cut C3)."""
    plan = [("surgery", a, s) for s in CHOICE_SEEDS for a in ALPHAS]
    return plan + (lambda_plan() if lambda_swept(choice) else [])


def lambda_plan():
    return [("asft", l, s) for s in CHOICE_SEEDS for l in LAMBDAS]


def lambda_swept(choice):
    return choice["checkpoint_1"][choice["regime"]]["lambda_sweep"]


def lambda_outside_budget(choice, rows):
    """Amendment 8: the lambda sweep that cut C3 removed, run after the verdict outside the budget; it enters the
    strength choice and its figure once all its runs are committed, and no main run follows from it."""
    runs = {(r["strength"], r["seed"]) for r in rows if r["method"] == "asft"}
    return not lambda_swept(choice) and choice["regime"] != "d" and runs >= {(l, s) for _, l, s in lambda_plan()}


def run_name(method, strength, p, seed):
    tag = {"surgery": "_a", "control": "_a", "asft": "_l"}.get(method)
    return f"{method}{tag}{strength:g}_p{p:g}_s{seed}" if tag else f"{method}_p{p:g}_s{seed}"


def attack(ctx, regime, method, strength, p, seed, stage):
    """One attack from the aligned model in a regime: SFT (alpha 0), Surgery (alpha = strength), the control
    (Surgery's penalty on the control's reference sets) or AsFT (lambda = strength); cached under --work-dir."""
    _, steps, lr, _ = REGIMES[regime]
    args, files = regime_args(ctx.args, regime), dict(ctx.files)
    alpha, defense = (strength if method in ("surgery", "control") else 0.0), None
    if method == "control":
        folder = ctx.results / "dev" / "control"
        files.update(harmful_ref=folder / "harmful_ref.jsonl", harmless_ref=folder / "harmless_ref.jsonl")
    if method == "asft":
        from evaluation.training import defense_for
        args.asft_lambda = strength
        defense = defense_for(args, files, "asft", aligned_model(ctx)["model"])
    data = seeded_train(args.work_dir, args.data_seed, p, seed)
    trained = train_stage(args, files, f"{stage}{regime}-{run_name(method, strength, p, seed)}",
                          aligned_model(ctx)["model"], data, alpha, steps, lr, defense, seed=seed)
    return trained, data, steps


def strength_run(ctx, regime, method, strength, seed):
    """One point of the strength sweep at p = 0.2, read on the development sets."""
    p = max(RATIOS)
    name = f"strength{regime}_{run_name(method, strength, p, seed)}"
    target = ctx.results / "dev" / "json" / f"{name}.json"
    if (done := committed(target)) is not None:
        return done
    trained, data, steps = attack(ctx, regime, method, strength, p, seed, "strength")
    record = {"run": name, "stage": "strength", "regime": regime, "method": method, "strength": strength,
              "poison_ratio": p, "seed": seed, "steps": steps, "commit": code_commit(),
              "train_data": {"file": data.name, "sha256": file_digest(data)},
              "train_seconds": training_seconds(trained), "seconds_per_step": training_seconds(trained) / steps,
              **dev_record(ctx, name, trained["model"], trained["sink_report"]["divergence_after"])}
    write_json(target, record, strict=False)
    print(f"{name}: dev HS {record['dev_harmful']['harmful']:.0f}%, broken {record['dev_harmful']['broken']:.0f}%/"
          f"{record['dev_benign']['broken']:.0f}%, helpful {record['dev_benign']['helpful']:.0f}%", flush=True)
    return record


def choose_strengths(results, choice):
    """Alpha and lambda by section 5's rule from the committed strength runs; results/dev/strengths.json."""
    regime = choice["regime"]
    folder = Path(results) / "dev" / "json"
    rows = [read_json(p) for p in sorted(folder.glob(f"strength{regime}_*.json"))]
    sft = dev_means([r for r in committed_dev_records(results)
                     if r["regime"] == regime and r["poison_ratio"] == max(RATIOS)])
    out = {"regime": regime, "sft": sft, "rule": f"PROTOCOL.md section 5: the largest strength with development "
           f"helpful >= SFT's - {QUALITY_MARGIN:g} and broken (harmful, benign) <= SFT's + {QUALITY_MARGIN:g}"}
    late = lambda_outside_budget(choice, rows)
    for method, grid in (("surgery", ALPHAS), ("asft", LAMBDAS)):
        if method == "asft" and not (lambda_swept(choice) or late):
            continue
        points = {}
        for strength in grid:
            runs = [r for r in rows if r["method"] == method and r["strength"] == strength]
            if len(runs) < len(CHOICE_SEEDS):
                raise UserError(f"the strength sweep lacks {method} at {strength:g} in regime ({regime}): run "
                                f"`python -m evaluation.third strengths` to the end first")
            points[strength] = dev_means(runs)
        chosen, matched = choose_strength(points, sft)
        out[method] = {"points": {f"{k:g}": v for k, v in points.items()}, "chosen": chosen,
                       "quality_matched": matched}
        if method == "asft" and late:
            out[method]["outside_budget"] = "PROTOCOL.md amendment 8: run after the verdict; no main run uses it"
    write_json(Path(results) / "dev" / "strengths.json", out, strict=False)
    plot_strengths(out, Path(results) / "dev" / "strengths.png")
    return out


# ---- 6. The main grid (PROTOCOL.md section 7) -------------------------------------------------------------------

def grid_cells(choice, checkpoint=2):
    """The main grid's (method, p) cells as results/dev/regime.json keeps them: checkpoint 2's once made (checkpoint
    2 asked), else checkpoint 1's for the chosen regime. As tuples: JSON gives lists, and a list is never equal to the
    tuple (method, p), so a cell compared as read would never be found."""
    made = choice.get("checkpoint_2") if checkpoint == 2 else None
    return [tuple(cell) for cell in (made or choice["checkpoint_1"][choice["regime"]])["cells"]]


def main_plan(choice, strengths):
    """(method, strength, p, seed) of every main run: the core cells seed by seed, then the cuttable cells kept by
    the budget, in reverse cut order."""
    strength = {"sft": 0.0, "surgery": strengths["surgery"]["chosen"], "control": strengths["surgery"]["chosen"],
                "asft": strengths.get("asft", {}).get("chosen", 0.0)}
    cells = grid_cells(choice)
    core = [c for c in cells if c in CORE]
    rest = [c for c in cells if c not in CORE]
    return ([(m, strength[m], p, s) for s in REPORTED_SEEDS for m, p in core]
            + [(m, strength[m], p, s) for m, p in rest for s in REPORTED_SEEDS])


def main_run(ctx, regime, method, strength, p, seed, reader):
    """One run of the main grid: trained, evaluated on the held-out sets, categorised, its JSON in results/json/."""
    name = run_name(method, strength, p, seed)
    target = ctx.results / "json" / f"{name}.json"
    if (done := committed(target)) is not None:
        return done
    trained, data, steps = attack(ctx, regime, method, strength, p, seed, "main")
    return held_out_record(ctx, regime_args(ctx.args, regime), (name, method, p, strength, seed), trained,
                           trained["model"], trained["sink_report"]["divergence_after"], steps, reader, regime=regime,
                           strength=strength, train_data={"file": data.name, "sha256": file_digest(data)})


def held_out_record(ctx, args, run, trained, model_path, divergence, steps, reader, **fields):
    """A model evaluated on the held-out sets (cached), categorised, its JSON written to results/json/<name>.json
    with this sweep's fields; run: (name, method, p, strength, seed)."""
    from evaluation.generation import evaluate_stage
    from evaluation.report import run_record
    name = run[0]
    evaluation = evaluate_stage(args, ctx.files, ctx.judges, name, model_path)
    record = run_record(args, run, trained, model_path, evaluation, divergence, steps)
    record.update(sweep="third", commit=code_commit(), **fields)
    record = reader.categorised(record, ctx.results)
    write_json(ctx.results / "json" / f"{name}.json", record, strict=False)
    counts = {c: record["harmful_categories"].count(c) for c in HARMFUL_CATEGORIES}
    print(f"{name}: harmful prompts " + ", ".join(f"{c} {n}" for c, n in counts.items())
          + f"; helpful {record['benign_categories'].count('helpful')}/{len(record['benign_categories'])}; "
            f"FA {record['fine_tune_accuracy']:.1f}%", flush=True)
    return record


def reference_run(ctx, method, reader):
    """The aligned or the base model on the held-out sets, categorised: section 7's reference rows, regenerated
    because this sweep's aligned model is the retrained one (amendment 4); results/json/<method>.json."""
    import surgery
    target = ctx.results / "json" / f"{method}.json"
    if (done := committed(target)) is not None:
        return done
    aligned = aligned_model(ctx)
    if method == "aligned":
        model_path, divergence = aligned["model"], aligned["sink_report"]["divergence_after"]
    else:
        model_path = ctx.files["model"]
        divergence = reference_divergence(ctx, *surgery.load_model(str(model_path), "cpu"))
    return held_out_record(ctx, ctx.args, (method, method, None, 0.0, None), None, model_path, divergence, 0,
                           reader, regime=None, strength=None)


def main_records(results, references=False):
    """The committed run JSONs of this sweep's main grid (with references=True, the aligned and base rows too)."""
    folder = Path(results) / "json"
    records = [r for r in (read_json(p) for p in sorted(folder.glob("*.json"))) if r.get("sweep") == "third"] \
        if folder.is_dir() else []
    return [r for r in records if references or r["method"] not in REFERENCES]


def checkpoint_2(results, choice):
    """Section 7's second checkpoint, after the first 10 main runs: the cells re-projected with the measured cost
    per run of each method (SFT's times the second sweep's factor where a method has none yet); kept in
    results/dev/regime.json."""
    kept = Path(results) / "dev" / "regime.json"
    if kept.exists():  # the other process may have made it: made once, after the first 10 runs, never re-made
        choice = read_json(kept)
    done = main_records(results)
    if choice.get("checkpoint_2") or len(done) < 10:
        return choice
    cost = {m: [r["wall_seconds"]["train"] + r["wall_seconds"]["evaluate"] for r in done if r["method"] == m]
            for m in STEP_FACTOR}
    sft = float(np.mean(cost["sft"]))
    per_run = {m: float(np.mean(v)) if v else sft * STEP_FACTOR[m] for m, v in cost.items()}
    spent = hours_spent(results)
    names = {r["run"] for r in done}

    def total(cells):
        return spent + sum(per_run[m] for m, p in cells for s in REPORTED_SEEDS
                           if not any(n.startswith(m) and f"_p{p:g}_s{s}" in n for n in names)) / 3600
    cells, cuts = cut_to_fit(grid_cells(choice, checkpoint=1), total)
    cuts = choice["checkpoint_1"][choice["regime"]]["cuts"] + cuts
    choice["checkpoint_2"] = {"cells": cells, "cuts": cuts, "per_run_seconds": per_run, "spent_hours": spent,
                              "projected_hours": total(cells), "fits": total(cells) <= CEILING_HOURS,
                              "after_runs": len(done)}
    write_json(kept, choice, strict=False)
    return choice


def hours_spent(results):
    """One-thread CPU hours of every committed run of this sweep: premise, strengths, main grid and references."""
    return (spent_hours(committed_dev_records(results) + strength_records(results))
            + sum(r["wall_seconds"]["train"] + r["wall_seconds"]["evaluate"]
                  for r in main_records(results, references=True)) / 3600)


def strength_records(results):
    folder = Path(results) / "dev" / "json"
    return [read_json(p) for p in sorted(folder.glob("strength*.json"))] if folder.is_dir() else []


# ---- 7. Releasable models (PROTOCOL.md section 10) --------------------------------------------------------------

RELEASE_SEED, RELEASE_CHECK_PROMPTS, RELEASE_CHECK_SHARE = 44, 50, 90.0


def qualifiers(results):
    """Section 9's qualifiers of the verdict, from the development files: the regime and its premise outcome, the
    strength rule's outcome, the control's calibration, the cells cut and left unmeasured, and the CPU hours of the
    committed runs (section 11)."""
    dev = Path(results) / "dev"
    choice, strengths = read_json(dev / "regime.json"), read_json(dev / "strengths.json")
    control = read_json(dev / "control" / "calibration.json")
    chosen = next(c for c in control["candidates"] if (c["X_m"], c["X_r"]) == (control["chosen"]["X_m"],
                                                                               control["chosen"]["X_r"]))
    made = choice.get("checkpoint_2") or choice["checkpoint_1"][choice["regime"]]
    cut = [f"{label} ({METHOD_NAMES[m]} at p = {p:g})" for label, m, p in CUTS if label in made["cuts"]
           and not (choice["regime"] == "d" and m == "asft")]
    hours = hours_spent(results)
    seeds = collections.Counter((r["method"], r["poison_ratio"]) for r in main_records(results))
    short = [f"{METHOD_NAMES[m]} at p = {p:g} ({n} of {len(REPORTED_SEEDS)} seeds)"
             for (m, p), n in sorted(seeds.items()) if n < len(REPORTED_SEEDS)]
    alpha = strengths["surgery"]
    return [f"- Attack regime ({choice['regime']}) {REGIMES[choice['regime']][0]}: **{choice['outcome']}** "
            f"(`dev/regime.json`, section 4).",
            f"- Surgery's alpha: {alpha['chosen']:g}, " + ("quality matched" if alpha.get("quality_matched")
                                                           else "**quality not matched**") + " (`dev/strengths.json`, section 5).",
            *([f"- AsFT's lambda, development sets only (swept after the verdict, outside the budget; no main run "
               f"uses it; amendment 8): {strengths['asft']['chosen']:g}, "
               + ("quality matched" if strengths["asft"]["quality_matched"] else "**quality not matched**") + "."]
              if "outside_budget" in strengths.get("asft", {}) else []),
            f"- The control ({chosen['X_m']} vs {chosen['X_r']}): its penalty on the untrained aligned model is "
            f"{chosen['penalty']:.2e}, {chosen['ratio_to_surgery']:.2f}x Surgery's {control['surgery']['penalty']:.2e}, "
            + (f"matched (within a factor of {control['factor']:g})" if control.get("matched") else
               f"**unmatched** (not within a factor of {control['factor']:g})")
            + " (`dev/control/calibration.json`, section 6).",
            "- Cells cut by the budget (section 7), unmeasured: " + (", ".join(cut) or "none") + ".",
            *([f"- Cells with fewer than {len(REPORTED_SEEDS)} seeds, not reported as full cells: " + ", ".join(short)
               + "."] if short else []),
            f"- CPU hours of the committed runs (premise, strengths, main grid and references; one-thread seconds): "
            f"{hours:.1f}, against the ceiling of {CEILING_HOURS:g}."]


def benign_clusters():
    """The held-out benign requests' templates (evaluation.stats.request_clusters), in the order every run answered
    them: the offline package's eval_benign, its first n_benign records (evaluation/data.py eval_subset, not
    shuffled). For section 8's +- over prompts beside each difference; None when the offline data cannot be read
    (the report then prints no width for the benign readings)."""
    from evaluation.stats import request_clusters
    args = eval_args()
    try:
        records = offline.read_jsonl(offline.eval_data(args.cache_dir, seed=args.data_seed)["eval_benign"])
    except (offline.OfflineDataError, OSError):
        return None
    return request_clusters(records[:args.n_benign])


def release_models(ctx, choice, strengths):
    """The adapters of SFT, Surgery and the control at p = 0.2, first reported seed, under results/models/<run>/
    adapter/ in bf16, each checked: with the aligned adapter merged first, its greedy answers to the first
    RELEASE_CHECK_PROMPTS held-out harmful prompts equal the run JSON's for >= RELEASE_CHECK_SHARE% of them, else it
    is released in fp32 instead. Results in results/models/release.json."""
    import answer
    import surgery
    from evaluation.generation import generate
    if choice["regime"] == "d":
        raise UserError("regime (d) trains every weight: there are no adapters to release (section 10)")
    alpha, p = strengths["surgery"]["chosen"], max(RATIOS)
    prompts = [r["instruction"] for r in offline.read_jsonl(ctx.files["eval_harmful"])][:RELEASE_CHECK_PROMPTS]
    base = ("the aligned model: the default model (SmolLM2-135M-Instruct, fp32) with results/models/aligned/adapter "
            "merged first")
    report = {}
    for method, strength in (("sft", 0.0), ("surgery", alpha), ("control", alpha)):
        name = run_name(method, strength, p, RELEASE_SEED)
        stored = read_json(ctx.results / "json" / f"{name}.json")["harmful_answers"][:RELEASE_CHECK_PROMPTS]
        trained, _, _ = attack(ctx, choice["regime"], method, strength, p, RELEASE_SEED, "main")
        target = ctx.results / "models" / name / "adapter"
        for fp32 in (False, True):
            release_adapter(Path(trained["model"]) / "adapter", target, base, fp32=fp32)
            model, tokenizer = surgery.load_model(str(ctx.files["model"]), device_for(ctx.args))
            for folder in (ctx.results / ALIGNED_ADAPTER, target):
                answer.merge_adapter(model, folder)
            answers = generate(model, tokenizer, prompts, ctx.args.max_new_tokens, ctx.args.gen_batch, name)
            same = 100.0 * sum(a == b for a, b in zip(answers, stored)) / len(stored)
            report[name] = {"dtype": "fp32" if fp32 else "bf16", "same_answers_percent": same,
                            "prompts": len(stored)}
            print(f"{name}: {same:.0f}% of the first {len(stored)} held-out answers equal the run's "
                  f"({report[name]['dtype']})", flush=True)
            if same >= RELEASE_CHECK_SHARE:
                break
    write_json(ctx.results / "models" / "release.json", report, strict=False)
    return report


# ---- command line ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = ArgumentParser(prog="python -m evaluation.third",
                                description="The third sweep of results/PROTOCOL.md, stage by stage; every finished "
                                            "run is a JSON under --results-dir and is never recomputed.")
    p.add_argument("stage", choices=("control", "premise", "strengths", "lambdas", "main", "release", "report"),
                   help="control: the harm-blind control's reference sets, calibrated on the aligned model (section "
                        "6); premise: SFT in the four attack regimes on the development sets (section 4); strengths: "
                        "the regime chosen, then Surgery's alpha and AsFT's lambda swept (section 5); lambdas: AsFT's "
                        "lambda sweep alone, where cut C3 removed it (amendment 8); main: the main "
                        "grid on the held-out sets (section 7); release: the adapters at p = 0.2, seed 44, checked "
                        "(section 10); report: the tables from the committed JSONs alone")
    p.add_argument("--shard", default="0/1", help="K/N: this process runs every N-th run starting at K (default 0/1)")
    p.add_argument("--results-dir", default="results", help="where the JSONs and tables go (default: results)")
    args = p.parse_args(argv)
    code_commit()
    try:
        k, _, n = args.shard.partition("/")
        shard, shards = int(k), int(n)
        if not 0 <= shard < shards:
            raise ValueError
    except ValueError:
        print(f"{p.prog}: error: --shard must be K/N with 0 <= K < N, got {args.shard!r}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if args.stage == "control":
            from evaluation.control import calibrate_control
            calibration = calibrate_control(context(args.results_dir))
            print(json.dumps({k: calibration[k] for k in ("chosen", "matched")}))
            return calibration
        if args.stage == "premise":
            ctx = context(args.results_dir)
            aligned_dev_record(ctx)
            for regime, ratio, seed in premise_plan()[shard::shards]:
                premise_run(ctx, regime, ratio, seed)
        if args.stage == "strengths":
            ctx = context(args.results_dir)
            chosen = Path(args.results_dir) / "dev" / "regime.json"  # made once: checkpoint 2 is added to it later
            choice = read_json(chosen) if chosen.exists() else choose_regime(args.results_dir)
            for method, strength, seed in strength_plan(choice)[shard::shards]:
                strength_run(ctx, choice["regime"], method, strength, seed)
            choose_strengths(args.results_dir, choice)
        if args.stage == "lambdas":
            chosen = Path(args.results_dir) / "dev" / "regime.json"
            if not chosen.exists():
                raise UserError(f"{chosen} is missing: the regime is chosen by `python -m evaluation.third strengths`")
            choice = read_json(chosen)
            if choice["regime"] == "d":
                raise UserError("AsFT is defined on LoRA adapters; regime (d) trains the full model")
            ctx = context(args.results_dir)
            for method, strength, seed in lambda_plan()[shard::shards]:
                strength_run(ctx, choice["regime"], method, strength, seed)
            choose_strengths(args.results_dir, choice)
        if args.stage == "main":
            ctx = context(args.results_dir)
            from evaluation.reading import RunReader
            choice, strengths = (read_json(Path(args.results_dir) / "dev" / f) for f in ("regime.json", "strengths.json"))
            from evaluation.control import calibrate_control
            calibrate_control(ctx)
            reader = RunReader(ctx.args, ctx.files, ctx.judges)
            for method in REFERENCES[shard::shards]:
                reference_run(ctx, method, reader)
            for method, strength, ratio, seed in main_plan(choice, strengths)[shard::shards]:
                if (method, ratio) in grid_cells(choice):  # checkpoint 2 may cut cells while the grid runs
                    main_run(ctx, choice["regime"], method, strength, ratio, seed, reader)
                choice = checkpoint_2(args.results_dir, choice)
        if args.stage == "release":
            ctx = context(args.results_dir)
            choice, strengths = (read_json(Path(args.results_dir) / "dev" / f) for f in ("regime.json", "strengths.json"))
            release_models(ctx, choice, strengths)
        table = write_premise_report(args.results_dir)
        main_runs = main_records(args.results_dir, references=True)
        if main_runs:  # the main grid's tables and verdict, from its committed JSONs alone
            from evaluation.verdict import markdown, plot_main
            plot_main(main_runs, Path(args.results_dir) / "main.png")
            labels = Path(args.results_dir) / CALIBRATION
            cal = read_json(labels) if labels.exists() else None
            write_text(Path(args.results_dir) / "results.md",
                       "# The third sweep: main grid (results/PROTOCOL.md sections 7-9)\n\nBuilt by `python -m "
                       "evaluation.third report` from `results/json/`" + (f" and `results/{CALIBRATION}`" if cal else "")
                       + ".\n\nQualifiers of the verdict (section 9):\n\n" + "\n".join(qualifiers(args.results_dir))
                       + "\n\n" + markdown(main_runs, cal and cal["calibration"], cal and cal["targets"]["met"],
                                          benign_clusters()))
        print((Path(args.results_dir) / "dev" / "premise.md").read_text(encoding="utf-8"))
        return table
    except UserError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
