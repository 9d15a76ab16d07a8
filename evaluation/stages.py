"""The cache: one folder per stage, named by a hash of everything its result depends on; the protocol's fingerprint,
and the committed run JSONs that carry it.

Every stage lives in WORK_DIR/<stage>-<hash of its config>/ and is finished when its stage.json exists; a finished
stage is never recomputed. A run whose JSON in RESULTS_DIR/json/ carries the current fingerprint is finished on any
machine (the stage cache under --work-dir is not committed).
"""
import contextlib
import fcntl
import hashlib
import json
import re
import time
from pathlib import Path

import torch

from common import UserError, read_input_bytes, read_json, write_json


def file_digest(path):
    """The digest of an input file, read the one way every input is (common.read_input_bytes)."""
    return hashlib.sha256(read_input_bytes(path, max_bytes=None)).hexdigest()[:16]


def safe_name(text):
    """A judge's name as a part of a stage's folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def device_for(args):
    """Where a stage runs its model: CUDA when available, unless --device cpu."""
    return torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")


def stage_dir(work_dir, name, config):
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return Path(work_dir) / f"{name}-{key}"


@contextlib.contextmanager
def stage_lock(folder):
    """One process at a time per stage: sweeps split with --shard share the cache and wait for each other."""
    lock = folder.parent / ".locks" / f"{folder.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_stage(work_dir, name, config, compute):
    """compute(folder) -> JSON-able result, run only when the stage has no stage.json yet."""
    folder = stage_dir(work_dir, name, config)
    with stage_lock(folder):
        return _cached_stage(folder, name, config, compute)


def _cached_stage(folder, name, config, compute):
    done = folder / "stage.json"
    if done.exists():
        print(f"[cached] {name}  ({folder})", flush=True)
        return json.loads(done.read_text())["result"]
    print(f"[run]    {name}  ({folder})", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config, strict=False)
    start = time.perf_counter()
    result = compute(folder)
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_json(done, {"config": config, "result": result}, strict=False)
    return result


# The flags one run's result depends on (besides its own method, p, alpha and seed, which its name holds, and the
# attack regime). Not here: the lists that only say which runs exist (--poison-ratios, --seeds, --methods, ...),
# where things go, how many processes share the sweep, how intervals are drawn. A new flag that changes results
# belongs here.
RESULT_FLAGS = ("model", "data", "n_train", "data_seed", "answer_tokens", "batch_size",
                "max_len", "lora_rank", "probe_count", "seed", "train_args", "asft_lambda", "sap_rho", "judges",
                "judge_encoder", "n_harmful", "n_task", "n_benign", "max_new_tokens", "task_tokens", "benign_tokens")


def protocol_fingerprint(args, files):
    """A digest of every flag and input file a result depends on: a committed run JSON with the same fingerprint
    (and regime) is a finished run, on any machine (the stage cache under --work-dir is not committed)."""
    flags = {k: getattr(args, k) for k in RESULT_FLAGS}
    if args.n_align_benign is not None:  # only when set, so that the fingerprints of earlier results stay valid
        flags["n_align_benign"] = args.n_align_benign
    inputs = {k: (file_digest(v) if k != "train" else {f"{p:g}": file_digest(q) for p, q in v.items()})
              for k, v in files.items() if k != "model"}
    inputs["model"] = str(files["model"])
    return hashlib.sha256(json.dumps([flags, inputs], sort_keys=True, default=str).encode()).hexdigest()[:16]


def extend_fingerprint(fingerprint, *more):
    """The fingerprint of a later step: the earlier fingerprint and what the step chose (JSON-able)."""
    return hashlib.sha256(json.dumps([fingerprint, *more]).encode()).hexdigest()[:16]


def committed_records(results, fingerprint):
    """{run name: record} of the run JSONs in RESULTS_DIR/json/ (results: RESULTS_DIR) made with this fingerprint."""
    found = {}
    for path in sorted((results / "json").glob("*.json")):
        try:
            record = read_json(path)
        except UserError:  # not a run JSON (or not a regular file): not a finished run
            continue
        if isinstance(record, dict) and record.get("fingerprint") == fingerprint:
            found[record["run"]] = record
    return found
