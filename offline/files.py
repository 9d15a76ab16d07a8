"""The splits as JSONL files: the train sets, the references and the evaluation protocol's inputs, written
atomically (common.write_jsonl) under the cache's data/seed<SEED>/ folder or a given one."""
import json
from pathlib import Path

from common import check_encodable, read_text_file, write_jsonl

from .sources import cache_root
from .splits import _train_records, build_splits

DEFAULT_TRAIN_SIZE = 200
DEFAULT_POISON_RATIO = 0.1


def read_jsonl(path):
    """The records of a JSONL file, read the one way every input is (common.read_text_file: a regular file, UTF-8,
    every string text); an empty file has none."""
    text = read_text_file(path)
    check_encodable(text, path)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def data_dir(cache_dir=None, seed=0) -> Path:
    return cache_root(cache_dir) / "data" / f"seed{seed}"


def _ratio_tag(p):
    return f"{p:g}"


def poisoned_train(poison_ratio=DEFAULT_POISON_RATIO, n_train=DEFAULT_TRAIN_SIZE, cache_dir=None, seed=0,
                   out_dir=None) -> Path:
    """Train JSONL of n_train records, round(poison_ratio * n_train) of them harmful; shared benign/poison prefixes."""
    records = _train_records(build_splits(seed), poison_ratio, n_train, seed)
    folder = Path(out_dir) if out_dir else data_dir(cache_dir, seed)
    return write_jsonl(folder / f"train_p{_ratio_tag(poison_ratio)}_n{n_train}.jsonl", records)


def default_data(cache_dir=None, poison_ratio=DEFAULT_POISON_RATIO, seed=0, n_train=DEFAULT_TRAIN_SIZE,
                 out_dir=None) -> dict:
    """Paths of surgery.py's default inputs: keys train, harmful_ref, harmless_ref."""
    splits = build_splits(seed)
    folder = Path(out_dir) if out_dir else data_dir(cache_dir, seed)
    return {
        "train": poisoned_train(poison_ratio, n_train, cache_dir=cache_dir, seed=seed, out_dir=folder),
        "harmful_ref": write_jsonl(folder / "harmful_ref.jsonl", splits.harmful_ref),
        "harmless_ref": write_jsonl(folder / "harmless_ref.jsonl", splits.harmless_ref),
    }


def eval_data(cache_dir=None, seed=0, out_dir=None) -> dict:
    """Paths of the evaluation protocol's other inputs: align (refusals and sentiment pairs), align_benign (benign
    instructions whose answers the protocol generates with the base model), eval_harmful (reported),
    eval_harmful_dev (for choosing the attack regime only), eval_task, eval_benign (over-refusal),
    harmful_probe / harmless_probe (held-out probes), judge_train, judge_test.

    Train sets for the attack come from poisoned_train(p, n, seed=seed) and the references from default_data.
    """
    splits = build_splits(seed)
    folder = Path(out_dir) if out_dir else data_dir(cache_dir, seed)
    return {name: write_jsonl(folder / f"{name}.jsonl", getattr(splits, name))
            for name in ("align", "align_benign", "eval_harmful", "eval_harmful_dev", "eval_task", "eval_benign",
                         "eval_benign_dev", "harmful_probe", "harmless_probe", "judge_train", "judge_test")}

