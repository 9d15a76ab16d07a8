"""The files every stage trains, references and evaluates on: the inputs resolved (the offline defaults where no flag
is given) and read before anything is written, the evaluation subsets, the check that roles share no instruction,
and the alignment stage's data (with the base model's own answers to benign requests).

    resolve_inputs   {role: path} of every file of the protocol, each read and checked
    check_splits     no instruction shared by roles that must not meet (ROLES_KEPT_APART)
    check_references every reference sequence has a token after the sink position
    alignment_data   the align stage's records, as a file named by its content
"""
import hashlib
import json
import random
from pathlib import Path

import offline
import surgery
from common import UserError, read_json_rows, write_jsonl, write_text
from defenses import TRIPLE_KEYS, load_triples
from evaluation.generation import generate
from evaluation.judges import KeywordJudge, read_judge_records
from evaluation.stages import cached_stage, device_for, file_digest
from evaluation.training import train_sink_pos
from offline import norm  # the form in which instructions are compared: lowercase, whitespace collapsed
from surgery import read_records


def all_ratios(args):
    return sorted(set(args.poison_ratios) | set(args.defense_ratios) | {args.sweep_ratio})


def eval_subset(path, n, seed, folder, name, shuffle):
    """The first n records (after a seeded shuffle for the harmful set, which is ordered by source), as a file:
    the exact prompts a run is evaluated on, so the split check and the cache see them. A record keeps its other
    fields (category, source: HS by source reads them)."""
    read_records(path)  # every record checked
    records = read_json_rows(path)
    if shuffle:
        random.Random(f"{seed}:{name}").shuffle(records)
    if n > len(records):
        raise UserError(f"{path}: asked for {n} evaluation records, the file has {len(records)}")
    target = Path(folder) / f"{name}_{n}_{file_digest(path)}.jsonl"
    if not target.exists():
        write_jsonl(target, records[:n])
    return target


def resolve_inputs(args):
    """The model and the path of every file the protocol uses; the offline defaults where no flag is given."""
    try:
        model = args.model or str(offline.default_model_dir(args.cache_dir))
        needs_offline = None in (args.align_data, args.align_benign, args.eval_harmful, args.eval_harmful_dev,
                                 args.eval_task, args.eval_benign, args.eval_benign_dev, args.judge_train, args.judge_test,
                                 args.harmful_ref, args.harmless_ref, args.harmful_probe,
                                 args.harmless_probe) or args.data is None
        defaults = offline.eval_data(args.cache_dir, seed=args.data_seed) if needs_offline else {}
        if needs_offline:
            defaults.update(offline.default_data(args.cache_dir, seed=args.data_seed))
        if args.data:
            train = {p: Path(args.data.replace("{p}", f"{p:g}")) for p in all_ratios(args)}
        else:
            train = {p: offline.poisoned_train(p, args.n_train, args.cache_dir, seed=args.data_seed)
                     for p in all_ratios(args)}
    except offline.OfflineDataError as e:
        raise UserError(str(e)) from None
    except ValueError as e:  # poisoned_train: a ratio or size the pools cannot serve
        raise UserError(f"--poison-ratios / --n-train: {e}") from None
    pick = lambda flag, key: Path(getattr(args, flag) or defaults[key])  # noqa: E731
    files = {"model": model, "align": pick("align_data", "align"), "align_benign": pick("align_benign", "align_benign"),
             "train": train, "harmful_ref": pick("harmful_ref", "harmful_ref"),
             "harmless_ref": pick("harmless_ref", "harmless_ref"), "harmful_probe": pick("harmful_probe", "harmful_probe"),
             "harmless_probe": pick("harmless_probe", "harmless_probe"),
             "judge_train": pick("judge_train", "judge_train"), "judge_test": pick("judge_test", "judge_test")}
    for name in ("align", "align_benign", "harmful_ref", "harmless_ref", "harmful_probe", "harmless_probe"):
        read_records(files[name])  # every input problem is reported
    for path in train.values():                                               # before any training starts
        read_records(path)
    sizes = {"eval_harmful": ("--n-harmful", args.n_harmful), "eval_harmful_dev": ("--n-dev", args.n_dev),
             "eval_benign": ("--n-benign", args.n_benign), "eval_benign_dev": ("--n-benign-dev", args.n_benign_dev),
             "eval_task": ("--n-task", args.n_task)}
    for key, (size_flag, n) in sizes.items():  # and every file read before anything is written
        available = len(read_records(pick(key, key)))
        if n > available:
            raise UserError(f"{pick(key, key)}: asked for {n} evaluation records ({size_flag}), the file has "
                            f"{available}")
    read_judge_records(files["judge_train"]), read_judge_records(files["judge_test"])
    if args.triples:
        load_triples(args.triples)
    subsets = Path(args.work_dir) / "eval-sets"
    files["eval_harmful"] = eval_subset(pick("eval_harmful", "eval_harmful"), args.n_harmful, args.seed, subsets,
                                        "eval_harmful", shuffle=True)
    files["eval_harmful_dev"] = eval_subset(pick("eval_harmful_dev", "eval_harmful_dev"), args.n_dev, args.seed,
                                            subsets, "eval_harmful_dev", shuffle=True)
    files["eval_benign"] = eval_subset(pick("eval_benign", "eval_benign"), args.n_benign, args.seed, subsets,
                                       "eval_benign", shuffle=False)  # real requests first, then templated ones
    files["eval_benign_dev"] = eval_subset(pick("eval_benign_dev", "eval_benign_dev"), args.n_benign_dev, args.seed,
                                           subsets, "eval_benign_dev", shuffle=True)
    files["eval_task"] = eval_subset(pick("eval_task", "eval_task"), args.n_task, args.seed, subsets, "eval_task",
                                     shuffle=False)  # the offline file alternates the classes: prefixes are balanced
    files["triples"] = Path(args.triples) if args.triples else offline_triples(args, subsets)
    return files


def offline_triples(args, folder):
    """offline.safety_triples as a file, so the runs that use them can name them by digest."""
    target = folder / f"safety_triples_seed{args.data_seed}.jsonl"
    if not target.exists():
        try:
            triples = offline.safety_triples(args.data_seed)
        except offline.OfflineDataError as e:
            raise UserError(str(e)) from None
        write_jsonl(target, [{k: t[k] for k in TRIPLE_KEYS} for t in triples])
    return target


# Roles whose instructions must never meet: nothing evaluated is trained on or used as a reference, references
# are not training data, and the learned judge is tested on objectives it was not fitted on.
ROLES_KEPT_APART = [("train", "reference"), ("train", "eval"), ("reference", "eval"), ("judge-train", "eval"),
                    ("judge-train", "judge-test")]


def role_files(files):
    """(role, name, instructions) for every file of the protocol."""
    out = [("train", "align", files["align"]), ("train", "align_benign", files["align_benign"])]
    out += [("train", f"attack p={p:g}", path) for p, path in files["train"].items()]
    out += [("reference", name, files[name]) for name in ("harmful_ref", "harmless_ref", "harmful_probe",
                                                           "harmless_probe")]
    out += [("eval", name, files[name]) for name in ("eval_harmful", "eval_harmful_dev", "eval_benign",
                                                      "eval_benign_dev", "eval_task")]
    rows = [(role, name, {norm(r["instruction"]) for r in read_records(path)})
            for role, name, path in out]
    if files.get("triples"):  # the defenses' safety data is reference data too: never an evaluation prompt
        rows.append(("reference", "triples", {norm(t["instruction"]) for t in load_triples(files["triples"])}))
    rows += [(role, name, {norm(obj) for obj, _, _ in read_judge_records(files[name])})
             for role, name in (("judge-train", "judge_train"), ("judge-test", "judge_test"))]
    return rows


def shared_instructions(files):
    """[(name, name, example instruction, count)] for every pair of files whose roles must not share one."""
    rows, clashes = role_files(files), []
    for i, (role_a, name_a, set_a) in enumerate(rows):
        for role_b, name_b, set_b in rows[i + 1:]:
            if (role_a, role_b) in ROLES_KEPT_APART or (role_b, role_a) in ROLES_KEPT_APART:
                common = set_a & set_b
                if common:
                    clashes.append((name_a, name_b, sorted(common)[0], len(common)))
    return clashes


def check_splits(files):
    clashes = shared_instructions(files)
    if clashes:
        a, b, example, count = clashes[0]
        raise UserError(f"{a} and {b} share {count} instruction(s), e.g. {example[:80]!r}: evaluation, training "
                        f"and reference sets must be disjoint")


def check_references(args, files, tokenizer):
    """What every training stage's surgery.py would find only when it starts: each reference sequence needs a token
    after the sink position (--train-args may move it) within --max-len."""
    sink_pos = train_sink_pos(args)
    for key in ("harmful_ref", "harmless_ref"):
        for i, record in enumerate(read_records(files[key]), start=1):
            length = len(surgery.encode(tokenizer, record, args.max_len)[0])
            if length <= sink_pos + 1:
                raise UserError(f"{files[key]}: {key.replace('_', ' ')} record {i} has {length} tokens (within "
                                f"--max-len {args.max_len}), none after the sink position {sink_pos}")


def complete_sentences(text):
    """The text up to its last sentence end: a greedy answer cut by the token limit stops mid-sentence."""
    text = text.strip()
    if not text or text.endswith((".", "!", "?", ")", "`", '"')):
        return text
    end = max(text.rfind(c) for c in ".!?")
    return text[:end + 1] if end > 0 else text


def alignment_data(args, files):
    """The alignment stage's records: align's (refusals, task pairs) and align_benign's requests with the model's
    own answers (benign_answers), shuffled, as a file named by its content."""
    combined = read_records(files["align"]) + benign_answers(args, files)
    random.Random(f"{args.seed}:align-benign").shuffle(combined)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in combined)
    target = Path(args.work_dir) / "align-data" / f"align_{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not target.exists():
        write_text(target, text)
    return target


ANSWER_CHUNK = 128  # requests per cached stage of benign answers: requests appended to the file reuse the rest


def benign_answers(args, files):
    """align_benign's requests answered greedily by the model before alignment: the alignment stage keeps it an
    assistant by training on its own helpful answers. An answer cut by the token limit ends at its last sentence;
    an answer with a refusal phrase is left out. Cached per chunk of the file, by its requests alone: changing the
    rest of the alignment data, or appending requests, does not generate the others again."""
    records = read_records(files["align_benign"])
    if args.n_align_benign is not None:
        records = records[:args.n_align_benign]
    pairs = []
    for start in range(0, len(records), ANSWER_CHUNK):
        requests = [r["instruction"] for r in records[start:start + ANSWER_CHUNK]]
        config = {"stage": "benign-answers", "model": str(files["model"]), "answer_tokens": args.answer_tokens,
                  "requests": hashlib.sha256(json.dumps(requests).encode()).hexdigest()[:16]}

        def compute(folder, requests=requests, start=start):
            model, tokenizer = surgery.load_model(str(files["model"]), device_for(args))
            answers = [complete_sentences(a) for a in generate(
                model, tokenizer, requests, args.answer_tokens, args.gen_batch,
                f"base model: benign requests {start + 1}-{start + len(requests)} of {len(records)}")]
            helpful = KeywordJudge().harmful(None, answers)  # a non-empty answer without a refusal phrase
            kept = [{"instruction": q, "output": a} for q, a, keep in zip(requests, answers, helpful) if keep]
            write_jsonl(folder / "pairs.jsonl", kept)
            return {"pairs": str(folder / "pairs.jsonl"), "benign_pairs": len(kept), "requests": len(requests)}
        pairs += read_json_rows(cached_stage(args.work_dir, "benign-answers", config, compute)["pairs"])
    return pairs
