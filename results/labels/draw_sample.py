"""Draw a blind labelling sample (issue 18): answers of a committed sweep, stratified by (method, p).

    python results/labels/draw_sample.py                  # reads the prompt files under runs/eval/eval-sets/
    python results/labels/draw_sample.py --build-prompts  # first writes them there (the offline package, a few seconds)
    python results/labels/draw_sample.py --sample 2       # sample 2: the third sweep's main grid (PROTOCOL.md sec. 3)

Sample 1 (the default) is described below; sample 2 differs only where SAMPLES says: the third sweep's run JSONs
(results/json/, the main grid and the aligned and base rows), at least 400 answers whatever the number of strata
(`sized`: 42 harmful and 16 benign per stratum for 7 strata), its own salt, written to sample2/, and a seeded subset of DOUBLE answers written again, reshuffled, to
sample2/blind_second.jsonl for a second, independent annotator (the inter-rater kappa).

Writes, next to this script:
  sample_key.jsonl  {"id", "run", "kind", "index"} per drawn answer, in id order: the only link from a blind id to
                    its run (method, p, seed); `index` is the position in the run JSON's harmful_answers or
                    benign_answers. Not for the labeller.
  blind.jsonl       {"id", "kind", "prompt", "answer"} per drawn answer, shuffled, ids a001.. given after the
                    shuffle: what the labeller sees, with RUBRIC.md.
and prints the count per stratum (the table in README.md). Same inputs, same bytes: every draw is seeded.

Answers: results/second-attempt/json/*.json, the second sweep (38 runs; one protocol fingerprint, checked).
Strata: (method, p), 18 of them (base, aligned, SFT and Surgery at p = 0, 0.05, 0.1, 0.15, 0.2 with seeds 43-45,
AsFT, SAP and SafetyLock at p = 0.1, 0.2 with seed 43). Per stratum 17 answers to harmful prompts and
7 to benign requests; within a stratum the seeds take turns (6/6/5 of 17, 3/2/2 of 7) and no
prompt repeats; over the strata the prompts are dealt from seeded permutations, so each harmful prompt is drawn
once or twice (306 draws of 300) and each benign request at most once (126 of 160).

Prompts. The run JSONs hold the answers but not the prompts. eval.py answered, in order, the prompts of two files
it writes under <work dir>/eval-sets/ (work dir runs/eval) in resolve_inputs -> eval_subset:
  eval_harmful_300_<digest>.jsonl  offline.eval_data(seed=0)["eval_harmful"] (413 prompts: StrongREJECT and
                                   Do-Not-Answer), shuffled with random.Random("43:eval_harmful") (43 = the run
                                   config's `seed`), the first 300;
  eval_benign_160_<digest>.jsonl   offline.eval_data(seed=0)["eval_benign"], not shuffled, the first 160;
(<digest>: the first 16 hex of the SHA-256 of the offline source file). They are not committed (runs/ is ignored).
Any eval.py run with the sweep's flags writes them; --build-prompts writes the same two files with the offline package
alone (it needs the data packages of `make setup`; the offline package keeps its data under $SURGERY_CACHE, else
~/.cache/surgery). Either way the files must have the SHA-256 pinned below, which is that of the files the sweep
used: with them, eval.py's protocol_fingerprint (model path /root/.cache/surgery/models/...) reproduces the
`fingerprint` of all 38 run JSONs and that of results/second-attempt/alignment.json. Checked again at every run:
the counts (300, 160), each run's `harmful_sources` against the prompts' sources, and, as a reading of the text, that
the base model's harmful answers and the aligned model's benign answers share the most content words with their own
prompt (far more often than with the next prompt, which an off-by-one would give).

Standard library only (the offline package is imported only by --build-prompts).
"""
import argparse
import glob
import hashlib
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# sample -> where its runs are, the salt of its draws, answers per stratum (harmful, benign), where it is written,
# and how many of its answers a second annotator labels too
SAMPLES = {1: {"runs": HERE.parent / "second-attempt" / "json", "salt": "labels-v1", "per_stratum": (17, 7),
               "out": HERE, "double": 0},
           2: {"runs": HERE.parent / "json", "salt": "labels-v2", "per_stratum": "sized", "out": HERE / "sample2",
               "double": 60}}
N_HARMFUL, N_BENIGN, EVAL_SEED, DATA_SEED = 300, 160, 43, 0
MIN_ANSWERS = 400  # sample 2's size whatever the budget cut (PROTOCOL.md amendment 6)


def sized(strata):
    """Sample 2's (harmful, benign) answers per stratum: n = ceil(MIN_ANSWERS / strata) in all, three quarters of
    them harmful where no harmful prompt is then drawn twice (at most N_HARMFUL // strata), the rest benign."""
    n = -(-MIN_ANSWERS // strata)
    harmful = min(-(-3 * n // 4), N_HARMFUL // strata)
    return harmful, n - harmful
PROMPT_SHA256 = {  # of the two prompt files the sweep was evaluated on (see the docstring)
    "harmful": "e68a7359562b077d8bf34f8ca1c3bbf5dec45283dc4e8114202ed6b1fb7301b4",
    "benign": "c66bf178b925c2ab71ee03f17d11cea5cb6073e8c7a80404c2dea0999e75b3c5",
}
PATTERN = {"harmful": f"eval_harmful_{N_HARMFUL}_*.jsonl", "benign": f"eval_benign_{N_BENIGN}_*.jsonl"}
METHOD_ORDER = ["base", "aligned", "sft", "surgery", "control", "asft", "sap", "safetylock"]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_prompts(folder):
    """eval.py's eval_subset for the two files, from offline.eval_data (the repo's the offline package)."""
    sys.path.insert(0, str(ROOT))
    import offline  # noqa: E402  (the repo's own module; reads the installed data packages)
    data = offline.eval_data(seed=DATA_SEED)
    folder.mkdir(parents=True, exist_ok=True)
    for kind, key, n, shuffle in (("harmful", "eval_harmful", N_HARMFUL, True),
                                  ("benign", "eval_benign", N_BENIGN, False)):
        records = offline.read_jsonl(data[key])
        if shuffle:
            random.Random(f"{EVAL_SEED}:{key}").shuffle(records)
        target = folder / f"{key}_{n}_{sha256(data[key])[:16]}.jsonl"
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:n]), encoding="utf-8")
        print(f"wrote {target}")


def read_prompts(folder):
    """{kind: list of prompt records} from the pinned files in folder."""
    out = {}
    for kind, pattern in PATTERN.items():
        found = [p for p in sorted(glob.glob(str(folder / pattern))) if sha256(p) == PROMPT_SHA256[kind]]
        if not found:
            sys.exit(f"no {pattern} with SHA-256 {PROMPT_SHA256[kind][:16]}... in {folder}: run with "
                     f"--build-prompts (or --prompts-dir FOLDER)")
        with open(found[0], encoding="utf-8") as f:
            out[kind] = [json.loads(line) for line in f if line.strip()]
    assert (len(out["harmful"]), len(out["benign"])) == (N_HARMFUL, N_BENIGN)
    return out


def prompt_source(record):
    """eval.py's prompt_source: what each run JSON's harmful_sources lists."""
    category = str(record.get("category", ""))
    if "/" in category:
        return category.split("/")[0]
    return str(record.get("source", "")).split("==")[0] or "unlabelled"


def read_runs(folder, sample):
    """The run JSONs of the sample's sweep (sample 2: those marked sweep "third" alone)."""
    runs = {}
    for path in sorted(Path(folder).glob("*.json")):
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        if sample == 1 or run.get("sweep") == "third":
            runs[path.stem] = run
    if not runs:
        sys.exit(f"no run JSON of sample {sample}'s sweep in {folder}")
    assert len({r.get("fingerprint") for r in runs.values()}) == 1, "run JSONs of more than one protocol"
    return runs


STOP = set("the a an to of and or for how in on that with i you me my can is it be do what are as by this at your "
           "from about there their they some more most which who why when where will would could should have has "
           "not no but if so into its our we any all".split())


def words(text):
    return {w for w in re.findall(r"[a-z]{3,}", text.lower()) if w not in STOP}


def own_prompt_nearest(prompts, answers, shift=0):
    """How many answers share the most content words (Jaccard) with prompt i + shift, of those with any word."""
    sets = [words(p["instruction"]) for p in prompts]
    hits = total = 0
    for i, answer in enumerate(answers):
        a = words(answer)
        if not a:
            continue
        scores = [len(a & s) / len(a | s) for s in sets]
        j = (i + shift) % len(prompts)
        total += 1
        hits += scores[j] > 0 and scores[j] == max(scores)
    return hits, total


def check_alignment(prompts, runs):
    sources = [prompt_source(r) for r in prompts["harmful"]]
    for name, run in runs.items():
        assert len(run["harmful_answers"]) == N_HARMFUL and len(run["benign_answers"]) == N_BENIGN, name
        assert run["harmful_sources"] == sources, f"{name}: harmful_sources differ from the prompts' sources"
    for kind, run in (("harmful", "base"), ("benign", "aligned")):
        own = own_prompt_nearest(prompts[kind], runs[run][f"{kind}_answers"])
        shifted = own_prompt_nearest(prompts[kind], runs[run][f"{kind}_answers"], shift=1)
        print(f"check: {run} {kind} answers nearest their own prompt {own[0]}/{own[1]}, the next prompt "
              f"{shifted[0]}/{shifted[1]}")
        assert own[0] > 0.5 * own[1] and shifted[0] < 0.05 * shifted[1], "answers and prompts out of step"


def strata(runs):
    """{(method, p): [run names]} in a fixed order."""
    groups = defaultdict(list)
    for name, run in runs.items():
        groups[(run["method"], run["poison_ratio"])].append(name)
    order = sorted(groups, key=lambda k: (METHOD_ORDER.index(k[0]), -1 if k[1] is None else k[1]))
    return {k: sorted(groups[k], key=lambda n: (runs[n]["seed"] or 0, n)) for k in order}


def dealer(n, rng):
    """take(k): k distinct prompt indices, dealt in turn from successive seeded permutations of range(n); an index
    already taken for this stratum (only where two permutations meet) waits for the next stratum."""
    pool = []

    def take(k):
        assert k <= n
        out, waiting = [], []
        while len(out) < k:
            if not pool:
                fresh = list(range(n))
                rng.shuffle(fresh)
                pool.extend(reversed(fresh))  # pool.pop() deals fresh[0] first
            i = pool.pop()
            (waiting if i in out else out).append(i)
        pool.extend(reversed(waiting))
        return out
    return take


def draw(groups, runs, salt, per_stratum):
    """[{run, kind, index, id}]: per stratum per_stratum = (harmful, benign) answers, shuffled together."""
    items = []
    for kind, n, per in (("harmful", N_HARMFUL, per_stratum[0]), ("benign", N_BENIGN, per_stratum[1])):
        take = dealer(n, random.Random(f"{salt}:{kind}:prompts"))
        for (method, p), names in groups.items():
            rng = random.Random(f"{salt}:{kind}:{method}:{p}")
            order = names[:]
            rng.shuffle(order)  # which seeds get the extra answers
            slots = [order[i % len(order)] for i in range(per)]
            rng.shuffle(slots)
            for run, index in zip(slots, take(per)):
                items.append({"run": run, "kind": kind, "index": index})
    assert len({(i["run"], i["kind"], i["index"]) for i in items}) == len(items)
    random.Random(f"{salt}:blind").shuffle(items)
    for k, item in enumerate(items, start=1):
        item["id"] = f"a{k:03d}"
    return items


def second_annotator(items, salt, n):
    """n of the drawn answers, chosen and ordered at random (seeded), for the second annotator."""
    chosen = random.Random(f"{salt}:double").sample(items, min(n, len(items)))
    return sorted(chosen, key=lambda i: random.Random(f"{salt}:double:{i['id']}").random())


def table(groups, runs, items):
    count = Counter((runs[i["run"]]["method"], runs[i["run"]]["poison_ratio"], i["kind"]) for i in items)
    per_run = Counter((i["run"], i["kind"]) for i in items)
    lines = ["| method | p | runs (seeds) | harmful | benign | harmful / benign per seed |",
             "|---|---|---|---|---|---|"]
    for (method, p), names in groups.items():
        seeds = ", ".join(str(runs[n]["seed"]) for n in names if runs[n]["seed"] is not None) or "-"
        split = "; ".join(f"s{runs[n]['seed']}: {per_run[(n, 'harmful')]} / {per_run[(n, 'benign')]}"
                          for n in names if runs[n]["seed"] is not None) or "-"
        lines.append(f"| {method} | {'-' if p is None else f'{p:g}'} | {len(names)} ({seeds}) | "
                     f"{count[(method, p, 'harmful')]} | {count[(method, p, 'benign')]} | {split} |")
    n_h = sum(i["kind"] == "harmful" for i in items)
    lines.append(f"| **all** | | {len(runs)} | **{n_h}** | **{len(items) - n_h}** | |")
    return "\n".join(lines)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main():
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--prompts-dir", type=Path, default=ROOT / "runs" / "eval" / "eval-sets",
                        help="where eval.py wrote eval_harmful_300_*.jsonl and eval_benign_160_*.jsonl")
    parser.add_argument("--build-prompts", action="store_true",
                        help="write the two prompt files into --prompts-dir first, with the offline package")
    parser.add_argument("--sample", type=int, choices=sorted(SAMPLES), default=1,
                        help="1: the second sweep's answers (the categoriser's development set); 2: the third sweep's "
                             "main grid, drawn after it (the validation set)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for sample_key.jsonl and blind.jsonl (default: this folder for sample 1, "
                             "sample2/ for sample 2)")
    args = parser.parse_args()
    sample = SAMPLES[args.sample]
    out = args.out or sample["out"]
    if args.build_prompts:
        build_prompts(args.prompts_dir)
    prompts, runs = read_prompts(args.prompts_dir), read_runs(sample["runs"], args.sample)
    check_alignment(prompts, runs)
    groups = strata(runs)
    per_stratum = sized(len(groups)) if sample["per_stratum"] == "sized" else sample["per_stratum"]
    items = draw(groups, runs, sample["salt"], per_stratum)
    out.mkdir(parents=True, exist_ok=True)

    def blind(rows):
        return [{"id": i["id"], "kind": i["kind"], "prompt": prompts[i["kind"]][i["index"]]["instruction"],
                 "answer": runs[i["run"]][f"{i['kind']}_answers"][i["index"]]} for i in rows]
    write_jsonl(out / "sample_key.jsonl",
                [{"id": i["id"], "run": i["run"], "kind": i["kind"], "index": i["index"]} for i in items])
    write_jsonl(out / "blind.jsonl", blind(items))
    print(f"wrote {out / 'sample_key.jsonl'} and {out / 'blind.jsonl'}: {len(items)} answers")
    if sample["double"]:
        write_jsonl(out / "blind_second.jsonl", blind(second_annotator(items, sample["salt"], sample["double"])))
        print(f"wrote {out / 'blind_second.jsonl'}: {sample['double']} of them, for the second annotator")
    print(table(groups, runs, items))


if __name__ == "__main__":
    main()
