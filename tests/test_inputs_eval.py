"""eval.py's bad inputs, table-driven: every flag (type, range, combinations, --train-args as surgery.py flags), the
folders (--work-dir, --results-dir, --cache-dir), every file argument (missing, a folder, unreadable, empty, wrong
encoding, wrong format, wrong fields, too few records, huge, sets that share instructions) and the model. Each row
runs `python eval.py ...`: exit status 2, exactly one line on stderr naming the problem, no traceback, no results
folder and no stage started (at most the work folder's cache of evaluation subsets, whole files). A new input gets
its row here. Rows run in children of input_helpers' fork server (torch imported once)."""
import json
from pathlib import Path

import pytest

import eval as protocol
import checks
import surgery
from conftest import write_jsonl
from evaluation.data import check_references, check_splits, resolve_inputs
from evaluation.training import train_stage
from input_helpers import (AS_ROOT, EVAL_ROLES, assert_rejected, bad_models, bad_record_files, eval_input_files, fill,
                           run_forked, tree, write_bytes)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Small files for every role of the protocol, bad files and models; "{name}" in a row is one of these."""
    from tiny import save_tiny
    root = tmp_path_factory.mktemp("eval_inputs")
    model = save_tiny(root / "model")
    files = {"root": root, "model": model, "data": root / "train_p{p}.jsonl", **eval_input_files(root),
             "short_refs": write_jsonl(root / "short_refs.jsonl", [{"instruction": "a", "output": "b"}] * 2),
             "judge_bad_label": write_jsonl(root / "judge_bad_label.jsonl", [
                 {"objective": "How?", "response": "Like so.", "label": 2}]),
             "judge_no_label": write_jsonl(root / "judge_no_label.jsonl", [{"objective": "How?", "response": "No."}]),
             "triples_no_refusal": write_jsonl(root / "triples_no_refusal.jsonl", [
                 {"instruction": "How?", "harmful_answer": "Like so."}])}
    files.update(bad_record_files(root))
    models = bad_models(root, model)
    files.update({k: models[k] for k in ("no_chat_template", "bloom", "t5")})
    read_only = root / "read_only"
    read_only.mkdir(mode=0o500)
    files["read_only"] = read_only
    write_bytes(root / "train_p0_bad.jsonl", "")
    return files


# A small sweep over the files above (only SFT, the keyword judge); a row's flags come after and win.
GOOD = (["--model", "{model}", "--data", "{data}"]
        + [a for flag, key in EVAL_ROLES.items() for a in (flag, f"{{{key}}}")]
        + ["--poison-ratios", "0", "--defense-ratios", "0", "--sweep-ratio", "0", "--seeds", "43", "--methods", "sft",
           "--judges", "keyword", "--attack-candidates", "1:1e-3", "--align-candidates", "1:1e-3", "--batch-size", "4",
           "--max-len", "64", "--probe-count", "2", "--n-harmful", "4", "--n-dev", "4", "--n-task", "4",
           "--n-benign", "4", "--n-benign-dev", "4", "--max-new-tokens", "4", "--task-tokens", "2", "--benign-tokens", "2",
           "--answer-tokens", "2", "--gen-batch", "4", "--bootstrap", "10", "--device", "cpu",
           "--work-dir", "{work}", "--results-dir", "{results}"])

# name: (arguments, message, [True: needs a non-root user])
FLAG_ROWS = {
    "batch size zero": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "n-harmful zero": (["--n-harmful", "0"], "--n-harmful must be at least 1"),
    "bootstrap not a number": (["--bootstrap", "x"], "argument --bootstrap: invalid int value: 'x'"),
    "alpha NaN": (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    "alpha zero": (["--alpha", "0"], "--alpha must be positive"),
    "alpha sweep negative": (["--alpha-sweep", "-1"], "--alpha-sweep values non-negative"),
    "alpha sweep infinite": (["--alpha-sweep", "inf"], "--alpha-sweep must be a finite number, got [inf]"),
    "poison ratio one and a half": (["--poison-ratios", "1.5"], "--poison-ratios and --sweep-ratio must be in [0, 1)"),
    "poison ratio NaN": (["--poison-ratios", "nan"], "--poison-ratios must be a finite number, got [nan]"),
    "sweep ratio infinite": (["--sweep-ratio", "inf"], "--sweep-ratio must be a finite number, got inf"),
    "seeds repeated": (["--seeds", "43", "43"], "--seeds must be distinct"),
    "seed negative": (["--seed", "-5"], "--seed, --seeds and --data-seed must be between 0 and 2^63 - 1"),
    "attack steps without lr": (["--attack-steps", "2"], "--attack-steps and --lr go together"),
    "attack steps zero": (["--attack-steps", "0", "--lr", "1e-3"], "--attack-steps must be at least 1"),
    "attack candidate not STEPS:LR": (["--attack-candidates", "5:x"], "--attack-candidates: '5:x' is not STEPS:LR"),
    "attack candidate infinite lr": (["--attack-candidates", "5:inf"], "'5:inf' is not STEPS:LR with STEPS >= 1"),
    "attack candidate zero steps": (["--attack-candidates", "0:1e-3"], "'0:1e-3' is not STEPS:LR"),
    "lr negative": (["--attack-steps", "1", "--lr", "-1"], "--lr and --align-lr must be positive"),
    "align lr NaN": (["--align-steps", "2", "--align-lr", "nan"], "--align-lr must be a finite number, got nan"),
    "align lr without steps": (["--align-lr", "1e-3"], "--align-steps and --align-lr go together"),
    "align steps zero": (["--align-steps", "0", "--align-lr", "1e-3"], "--align-steps must be at least 1"),
    "align candidate not STEPS:LR": (["--align-candidates", "x"], "--align-candidates: 'x' is not STEPS:LR"),
    "n-benign-dev zero": (["--n-benign-dev", "0"], "--n-benign-dev must be at least 1"),
    "sap rho zero": (["--sap-rho", "0"], "--sap-rho positive"),
    "asft lambda NaN": (["--asft-lambda", "nan"], "--asft-lambda must be a finite number, got nan"),
    "safetylock strength infinite": (["--safetylock-alpha-sweep", "inf"],
                                     "--safetylock-alpha-sweep must be a finite number, got [inf]"),
    "save every negative": (["--save-every", "-1"], "--save-every non-negative"),
    "shard out of range": (["--shard", "2/2"], "argument --shard: '2/2': K/N needs 0 <= K < N"),
    "shard not K/N": (["--shard", "x"], "argument --shard: 'x' is not K/N"),
    "method unknown": (["--methods", "magic"], "argument --methods: invalid choice: 'magic'"),
    "judge unknown": (["--judges", "oracle"], "--judges: unknown judge 'oracle'"),
    "judge guard without model": (["--judges", "guard:"], "--judges: unknown judge 'guard:'"),
    "data without {p}": (["--data", "{root}/train.jsonl"], "--data must contain {{p}}, the poison ratio"),
    "train-args unbalanced quote": (["--train-args", '--sink-pos "1'], "--train-args: No closing quotation"),
    "train-args set a flag eval.py sets": (["--train-args=--alpha 3"], "--train-args: --alpha is set by eval.py "
                                                                       "itself"),
    "train-args out of range": (["--train-args=--lora-dropout 2"], "--train-args: --lora-dropout must be in [0, 1), "
                                                                   "got 2"),
    "train-args unknown flag": (["--train-args=--nope"], "--train-args: unrecognized arguments: --nope"),
    "train-args not a number": (["--train-args=--sink-pos x"], "--train-args: argument --sink-pos: invalid int "
                                                               "value: 'x'"),
    "device unknown": (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    "unknown flag": (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    # folders
    "work dir a file": (["--work-dir", "{a_file}"], "--work-dir {a_file}: is a file, expected a folder"),
    "work dir below a file": (["--work-dir", "{a_file}/work"], "a_file is a file, so the folder cannot be made"),
    "results dir a file": (["--results-dir", "{a_file}"], "--results-dir {a_file}: is a file, expected a folder"),
    "cache dir a file": (["--cache-dir", "{a_file}"], "--cache-dir {a_file}: is a file, expected a folder"),
    "work dir not writable": (["--work-dir", "{read_only}/work"], "read_only is not writable", True),
}

FILE_ROWS = {
    "align data the empty string": (["--align-data", ""], "--align-data is empty: name a path (or leave the flag "
                                                          "out for the default)"),
    "align data a device": (["--align-data", "/dev/zero"], "/dev/zero: not a regular file"),
    "align data missing": (["--align-data", "{root}/absent.jsonl"], "absent.jsonl: no such file"),
    "align data a folder": (["--align-data", "{folder}"], "a_folder: is a folder, expected a file"),
    "align data unreadable": (["--align-data", "{unreadable}"], "cannot read it (Permission denied)", True),
    "align data Latin-1": (["--align-data", "{latin1}"], "latin1.jsonl: not UTF-8 text (byte 0xe9"),
    "align data huge": (["--align-data", "{huge}"], "over the 1 GiB limit"),
    "align benign without output": (["--align-benign", "{no_output}"], "record 1 needs string fields"),
    "harmful probe empty": (["--harmful-probe", "{empty}"], "empty.jsonl: file is empty"),
    "harmless ref UTF-16": (["--harmless-ref", "{utf16}"], "utf16.jsonl: not UTF-8 text (byte 0xff at offset 0)"),
    "eval task CSV": (["--eval-task", "{csv}"], "records.csv: not JSON or JSONL (Expecting value at line 1)"),
    "eval harmful one JSON object": (["--eval-harmful", "{object}"], "object.json: one JSON object"),
    "eval benign truncated": (["--eval-benign", "{truncated}"], "truncated.json: not JSON or JSONL"),
    "eval task too few records": (["--n-task", "50"], "eval_task.jsonl: asked for 50 evaluation records (--n-task), "
                                                      "the file has 6"),
    "eval dev too few records": (["--n-dev", "9"], "dev.jsonl: asked for 9 evaluation records (--n-dev), the file "
                                                   "has 4"),
    "attack data missing for a ratio": (["--data", "{root}/missing_p{{p}}.jsonl"], "missing_p0.jsonl: no such file"),
    "attack data empty": (["--data", "{root}/train_p{{p}}_bad.jsonl"], "train_p0_bad.jsonl: file is empty"),
    "judge train label not 0 or 1": (["--judge-train", "{judge_bad_label}"],
                                     "record 1: objective and response must be strings and label 0 or 1"),
    "judge test without label": (["--judge-test", "{judge_no_label}"], "record 1 needs objective (or instruction), "
                                                                       "response (or output) and an integer label"),
    "judge train binary": (["--judge-train", "{binary}"], "binary.jsonl: not UTF-8 text"),
    "triples without refusal": (["--triples", "{triples_no_refusal}"], "record 1 needs non-empty string fields "
                                                                       "'instruction', 'refusal'"),
    "triples a folder": (["--triples", "{folder}"], "is a folder, expected a file"),
    "references too short for the sink position": (["--harmful-ref", "{short_refs}", "--train-args=--sink-pos 30"],
                                                   "short_refs.jsonl: harmful ref record 1 has 23 tokens (within "
                                                   "--max-len 64), none after the sink position 30"),
    "evaluation prompts shared with training": (["--eval-task", "{align}"], "share"),
    "references shared with evaluation": (["--eval-harmful", "{harmful_ref}"], "harmful_ref and eval_harmful share 4 "
                                                                               "instruction(s)"),
}

MODEL_ROWS = {
    "model missing": (["--model", "{root}/absent-model"], "cannot load model {root}/absent-model: no such model "
                                                          "folder"),
    "model a hub-id typo": (["--model", "HuggingFaceTB/SmolLM2-135M-Instuct"],
                            "(not a local folder; tried as a hub id: check its spelling"),
    "model a file": (["--model", "{a_file}"], "is a file, expected a model folder"),
    "model without chat template": (["--model", "{no_chat_template}"], "its tokenizer has no chat template"),
    "model attention outside the interface": (["--model", "{bloom}"], "attention does not go through transformers' "
                                                                      "attention interface"),
    "model not a causal LM": (["--model", "{t5}"], "a 't5' model is not a causal language model"),
}

ROWS = {**FLAG_ROWS, **FILE_ROWS, **MODEL_ROWS}


def paths(env, tmp_path):
    return dict(env, work=tmp_path / "work", results=tmp_path / "results")


@pytest.mark.parametrize("name", ROWS)
def test_bad_input(env, tmp_path, name):
    arguments, message, *needs_user = ROWS[name]
    if needs_user and AS_ROOT:
        pytest.skip("running as root: modes do not stop root")
    files = paths(env, tmp_path)
    before = tree(env["root"])
    done = run_forked("eval.py", *fill(GOOD + arguments, files), timeout=120)
    assert_rejected(done, "eval.py", message.format(**files))
    assert not (tmp_path / "results").exists(), "a rejected run wrote results"
    work = tmp_path / "work"
    if work.exists():  # nothing but the cache of the evaluation subsets, whole files
        assert {p.name for p in work.iterdir()} <= {"eval-sets"}, sorted(work.iterdir())
        for subset in (work / "eval-sets").iterdir():
            assert not subset.name.startswith(".")
            [json.loads(line) for line in subset.read_text().splitlines()]
    assert tree(env["root"]) == before, "a rejected run changed or left files"


def test_the_rows_start_from_a_good_command(env, tmp_path):
    """The good command's inputs pass every check a row trips (the end-to-end run is
    tests/test_evaluation_pipeline.py's)."""
    args = protocol.parse_args(fill(GOOD, paths(env, tmp_path)))
    protocol.validate(args)
    checks.check_model(args.model)
    files = resolve_inputs(args)
    check_splits(files)
    check_references(args, files, checks.check_model(args.model))
    assert len(surgery.read_records(files["eval_task"])) == 4


def test_help_states_the_exit_codes():
    done = run_forked("eval.py", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "2 bad input" in text and "3 a training stage diverged" in text


def test_a_stage_killed_before_its_stage_json_runs_again(env, tmp_path):
    """surgery.py refuses an --out that holds a run; eval.py's stage folders are its own, so a training stage killed
    after surgery.py's outputs (or before its first checkpoint) starts over instead of failing on its leftovers."""
    args = protocol.parse_args(["--quick", "--work-dir", str(tmp_path / "work"), "--max-len", "64", "--batch-size",
                                "4", "--probe-count", "2", "--save-every", "0", "--device", "cpu"])
    files = {"harmful_ref": env["harmful_ref"], "harmless_ref": env["harmless_ref"]}
    first = train_stage(args, files, "run", env["model"], env["align"], 0.0, 1, 1e-3)
    folder = Path(first["model"])
    (folder / "stage.json").unlink()  # killed after surgery.py finished, before the stage was recorded
    again = train_stage(args, files, "run", env["model"], env["align"], 0.0, 1, 1e-3)
    assert again["sink_report"] == first["sink_report"] and (folder / "stage.json").exists()
