"""Bad input by class, not by case (issue 21). The tables (tests/test_inputs_*.py, tests/test_checker_bad_inputs.py)
hold one row per case; here each class of mistake has a generator of cases, run across every command that reads
files or flags: surgery.py, eval.py, answer.py, sinkcheck, and `python -m defenses.asft`, `defenses.sap`,
`defenses.safetylock build` / `apply`. Every case is held to the same promise (assert_promise): exit status 2,
exactly one line on stderr with the command's prefix, no traceback, no hang (every command runs under a timeout),
and nothing created or changed (the case's inputs hashed before and after, the shared folders' listings unchanged,
the output absent).

    loaders      model folders broken in one field or file each (config values of the wrong type or range,
                 safetensors truncated at several offsets, a tokenizer.json of the wrong shape, a weight missing,
                 renamed, unexpected or of another shape), checkpoints given to --resume whose fields have the
                 wrong type or range, or that are truncated, and LoRA adapter folders broken the same ways
    not files    a FIFO, a folder, a character device (directly or through a symlink), a socket, wherever a file is
                 read: every data, reference, triple, judge, lock and probe file, files inside a model folder,
                 the checkpoint and its shards, a resumed run's files
    outputs      an output that is (or resolves to) one of the command's inputs, or that exists and is no regular
                 file (a file output) or no folder (a folder output)
    surrogates   valid JSON whose string holds a lone surrogate escape ("\\ud800"), in every field and file that
                 is text, as a JSONL line or inside a JSON list
    flags        every numeric flag beyond its bound, every path flag given an empty string, and every flag of
                 every parser abbreviated (also inside eval.py's --train-args): refused, never guessed

Python commands run in children of input_helpers' fork server (torch imported once), sinkcheck as a process.
"""
import hashlib
import json
import os
import random
import re
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import torch

import common
from checker_helpers import SINKCHECK
from conftest import write_jsonl
from input_helpers import ENV, EVAL_ROLES, TRIPLES, defense_input_files, eval_input_files, fill, run_forked

TIMEOUT = 60  # seconds for any one command: a FIFO that blocks a reader fails its case instead of hanging it

# ---------------------------------------------------------------------------------------------------------------
# The commands, their good command lines, and the promise
# ---------------------------------------------------------------------------------------------------------------

LOOP = ["--model", "{aligned}", "--data", "{data}", "--harmful-ref", "{harmful}", "--harmless-ref", "{harmless}",
        "--batch-size", "4", "--max-len", "64", "--max-steps", "1", "--save-every", "0", "--out", "{out}/run"]
EVAL = (["--model", "{model}", "--data", "{root}/train_p{{p}}.jsonl"]
        + [a for flag, key in EVAL_ROLES.items() for a in (flag, f"{{{key}}}")]
        + ["--poison-ratios", "0", "--defense-ratios", "0", "--sweep-ratio", "0", "--seeds", "43", "--methods", "sft",
           "--judges", "keyword", "--attack-candidates", "1:1e-3", "--align-candidates", "1:1e-3", "--batch-size",
           "4", "--max-len", "64", "--probe-count", "2", "--n-harmful", "4", "--n-dev", "4", "--n-task", "4",
           "--n-benign", "4", "--n-benign-dev", "4", "--max-new-tokens", "4", "--task-tokens", "2",
           "--benign-tokens", "2", "--answer-tokens", "2", "--gen-batch", "4", "--bootstrap", "10", "--device", "cpu",
           "--work-dir", "{out}/work", "--results-dir", "{out}/results"])

# name: (argv before the case's own flags, argv after them). A case's flags come last where argparse keeps the last
# value (surgery.py, eval.py, safetylock), and before `--` for the loop defenses' own flags.
COMMANDS = {
    "surgery.py": (["surgery.py", "--model", "{model}", "--data", "{data}", "--harmful-ref", "{harmful}",
                    "--harmless-ref", "{harmless}", "--batch-size", "4", "--max-len", "64", "--max-steps", "1",
                    "--save-every", "0", "--out", "{out}/run"], []),
    "eval.py": (["eval.py", *EVAL], []),
    "asft": (["-m", "defenses.asft", "--base", "{model}"], ["--", *LOOP]),
    "sap": (["-m", "defenses.sap", "--triples", "{triples}"], ["--", *LOOP]),
    "build": (["-m", "defenses.safetylock", "build", "--model", "{aligned}", "--triples", "{triples}", "--max-len",
               "64", "--out", "{out}/lock.st"], []),
    "apply": (["-m", "defenses.safetylock", "apply", "--model", "{model}", "--lock", "{lock}", "--out",
               "{out}/locked"], []),
    "sinkcheck": (["{model}", "--probes", "{probes}", "--json", "{out}/report.json"], []),
    "answer.py": (["answer.py", "--model", "{model}", "--adapter", "{adapter}", "--prompts", "{prompts}",
                   "--max-new-tokens", "2", "--device", "cpu", "--out", "{out}/answers.jsonl"], []),
}
PREFIX = re.compile(r"^(surgery\.py|eval\.py|answer\.py|(python -m )?defenses\.(asft|sap|safetylock)( build| apply)?|"
                    r"sinkcheck): error: ")


def argv_of(command, own=(), loop=()):
    """The command line of `command` with a case's own flags (and, for the loop defenses, surgery.py's flags after
    `--`; for surgery.py `loop` is its own)."""
    head, tail = COMMANDS[command]
    if command in ("asft", "sap"):
        return [*head, *own, *tail, *loop]
    return [*head, *own, *loop, *tail]


def run(command, argv, files):
    argv = fill(argv, files)
    if command == "sinkcheck":
        env = dict(ENV, PYTHONWARNINGS="ignore")
        done = subprocess.run([SINKCHECK, *argv], capture_output=True, text=True, timeout=TIMEOUT, env=env)
        return done
    return run_forked(*argv, timeout=TIMEOUT)


def snapshot(folder):
    """{relative path: what it is} of everything under a folder, links not followed: a regular file by size and
    modification time, a link by its target, a FIFO or socket by its kind."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        info = os.lstat(path)
        out[str(path.relative_to(folder))] = (
            (info.st_size, info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else
            ("link", os.readlink(path)) if stat.S_ISLNK(info.st_mode) else stat.S_IFMT(info.st_mode))
    return out


def digests(paths):
    """sha256 of every regular file among these paths (a folder: the files in it), links followed, nothing else
    opened (a FIFO would block)."""
    out = {}
    for path in paths:
        path = Path(path)
        items = sorted(path.rglob("*")) if path.is_dir() else [path]
        for item in items:
            try:
                if stat.S_ISREG(os.stat(item).st_mode):
                    out[str(item)] = hashlib.sha256(item.read_bytes()).hexdigest()
            except OSError:
                pass
    return out


def named_paths(argv, files):
    """The existing paths a filled command line names (its inputs, and its outputs if they exist)."""
    return [a for a in fill(argv, files) if a.startswith("/") and os.path.lexists(a.replace("{p}", "0"))]


def check_case(command, argv, files, expect, out):
    """Run one case and hold it to the promise: exit 2, one line with the command's prefix naming `expect` (a
    string, or a tuple of which one must appear), no traceback, inputs unchanged, nothing left in `out` and nothing
    changed in the shared folder of good inputs or in the case's own folder."""
    cases = Path(files["cases"])
    watched = [files["root"]] + sorted({cases / Path(a).relative_to(cases).parts[0] for a in named_paths(argv, files)
                                        if Path(a).is_relative_to(cases) and Path(a) != cases})
    listing = {str(w): snapshot(w) for w in watched}
    hashes = digests(named_paths(argv, files))
    done = run(command, argv, files)
    line = done.stderr.strip()
    assert done.returncode == 2, (done.returncode, done.stdout[-1500:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert PREFIX.match(line), line
    expect = expect if isinstance(expect, tuple) else (expect,)
    assert any(e.format(**files) in line for e in expect), (expect, line)
    assert digests(named_paths(argv, files)) == hashes, "an input changed"
    assert {str(w): snapshot(w) for w in watched} == listing, "a shared folder changed"
    assert not out.exists() or not any(out.iterdir()), f"a rejected command wrote {sorted(out.iterdir())}"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "/dev/null was replaced"
    return line


# ---------------------------------------------------------------------------------------------------------------
# The inputs: good files for every command, and the cases' bad ones
# ---------------------------------------------------------------------------------------------------------------

def write(path, content):
    Path(path).write_bytes(content if isinstance(content, bytes) else content.encode())
    return Path(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The good inputs of every command under "root" (never changed by a case), and "cases", where a test puts its
    bad inputs. "{name}" in a command line is one of these paths."""
    from defenses import safetylock
    root = tmp_path_factory.mktemp("classes")
    cases = tmp_path_factory.mktemp("class_cases")
    # the loop defenses and SafetyLock share eval.py's triples; eval.py's references are e_*.jsonl beside theirs
    files = {"root": root, "cases": cases, **defense_input_files(root, triples=False),
             **eval_input_files(root, refs=("e_harmful.jsonl", "e_harmless.jsonl")),
             "probes": write(root / "probes.json", json.dumps({"sink_position": 0, "harmful": [[257, 1, 2, 3, 4]],
                                                               "harmless": [[257, 5, 6, 7, 8]]})),
             "text_probes": write_jsonl(root / "probes.jsonl", [
                 {"instruction": "How do I pick a lock?", "output": "Sure: first...", "harmful": True},
                 {"instruction": "How do I pick a lock?", "output": "I can't help with that.", "harmful": False}])}
    files["lock"] = safetylock.save_lock(root / "lock.safetensors",
                                         safetylock.build(files["model"], TRIPLES, max_len=64))
    trained = run_forked(*fill(argv_of("surgery.py", loop=["--alpha", "0", "--out", str(root / "adapter_run")]),
                               dict(files, out=root)), timeout=TIMEOUT)
    assert trained.returncode == 0, trained.stderr[-3000:]
    files["adapter"] = root / "adapter_run" / "adapter"  # answer.py's: a peft LoRA folder of the tiny model
    files["prompts"] = write(root / "prompts.txt", "How do I bake bread?\nReview: fine. Sentiment?\n")
    assert run_forked("surgery.py", "--help").returncode == 0  # the fork server's imports, before any clock
    return files


@pytest.fixture
def out(tmp_path):
    """The case's output folder, empty (outside the shared folders): it must stay empty."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def fresh(files, out, **more):
    return dict(files, out=out, **more)


def case_folder(files, name):
    """A new folder for one case's bad inputs, under "cases" (a short name: a socket's path has a length limit)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name)[:24]
    folder = Path(files["cases"]) / f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def copy_model(source, target):
    shutil.copytree(source, target, symlinks=True)
    return Path(target)


def test_good_commands_pass(files, tmp_path):
    """Without its defect every case's command succeeds (eval.py: every check before its first stage passes; its
    end-to-end run is tests/test_evaluation_pipeline.py's), so the cases fail for the reason they name."""
    import eval as protocol
    import checks
    from evaluation.data import check_references, check_splits, resolve_inputs
    for command in COMMANDS:
        out = tmp_path / command
        out.mkdir()
        argv = argv_of(command)
        if command == "eval.py":
            args = protocol.parse_args(fill(argv[1:], fresh(files, out)))
            protocol.validate(args)
            check_references(args, resolve_inputs(args), checks.check_model(args.model))
            check_splits(resolve_inputs(args))
            continue
        done = run(command, argv, fresh(files, out))
        assert done.returncode == 0, (command, done.stderr[-3000:])
        assert any(out.iterdir()), command


# ---------------------------------------------------------------------------------------------------------------
# Class 1: loaders. Any exception of the libraries underneath is one line naming the file and the cause.
# ---------------------------------------------------------------------------------------------------------------

CONFIG_FIELDS = ("num_attention_heads", "num_key_value_heads", "hidden_size", "num_hidden_layers", "vocab_size",
                 "head_dim", "intermediate_size", "max_position_embeddings")
CONFIG_VALUES = (0, -1, 10**12, "4", 2.5)


def changed_config(field, value):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config[field] = value
        (folder / "config.json").write_text(json.dumps(config))
    return change


def truncated_weights(offset):
    def change(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:offset if offset >= 0 else len(data) + offset])
    return change


def changed_tokenizer(document):
    def change(folder):
        (folder / "tokenizer.json").write_text(json.dumps(document))
    return change


def changed_weights(how):
    def change(folder):
        from safetensors.torch import load_file, save_file
        tensors = load_file(folder / "model.safetensors")
        key = "model.layers.0.self_attn.k_proj.weight"
        if how == "missing":
            del tensors[key]
        elif how == "renamed":
            tensors[key.replace("k_proj", "kk_proj")] = tensors.pop(key)
        elif how == "unexpected":
            tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(4)
        elif how == "another shape":
            tensors[key] = tensors[key].reshape(tensors[key].shape[::-1]).contiguous()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return change


def broken_models():
    """(name, kind, change(folder)) for model folders broken in one field or file each. kind says which readers
    meet the defect: "config", "weights" (the safetensors headers), "tensors" (the weights' names and shapes as
    the model is loaded), "tokenizer"."""
    for field in CONFIG_FIELDS:
        for value in CONFIG_VALUES:
            yield f"config {field}={value!r}", "config", changed_config(field, value)
    for offset in (0, 4, 8, 100, 2000, -10):
        yield f"weights truncated at {offset}", "weights", truncated_weights(offset)
    for document in ({"model": 3}, [], {"added_tokens": "x", "model": {}}, "tokenizer"):
        yield f"tokenizer.json {json.dumps(document)}", "tokenizer", changed_tokenizer(document)
    for how in ("missing", "renamed", "unexpected", "another shape"):
        yield f"a weight {how}", "tensors", changed_weights(how)


BROKEN_MODELS = {name: (kind, change) for name, kind, change in broken_models()}

# Which commands meet which defect, and with which flag the model is given. asft reads the base model's tensors
# by name (no config, no tokenizer); apply reads the config and the tensors but loads no tokenizer and adds no
# weight; eval.py checks the config, the headers and the tokenizer before its first stage (a weight's name is its
# first stage's to find); sinkcheck reads the config and the tensors it needs (text probes: the tokenizer).
MODEL_READERS = {
    "surgery.py": ("config", "weights", "tensors", "tokenizer"),
    "build": ("config", "weights", "tensors", "tokenizer"),
    "sap": ("config", "weights", "tensors", "tokenizer"),
    "eval.py": ("config", "weights", "tokenizer"),
    "apply": ("config", "weights"),
    "asft": ("weights",),
    "sinkcheck": ("config", "weights", "tokenizer"),
    "answer.py": ("config", "weights", "tensors", "tokenizer"),
}


def meets(command, name, kind):
    """Whether `command` reads what case `name` (of `kind`) breaks: MODEL_READERS, less the config fields sinkcheck
    never reads (the context length: sinkcheck's probes are as long as they are)."""
    return kind in MODEL_READERS[command] and not (command == "sinkcheck" and "max_position_embeddings" in name)


def model_argv(command, folder, text_probes=False):
    """The command line of `command` on this model folder (sinkcheck: with text probes, which need its tokenizer)."""
    if command == "surgery.py":
        return argv_of(command, loop=["--model", str(folder)])
    if command == "sap":
        return argv_of(command, loop=["--model", str(folder)])
    if command == "asft":
        return argv_of(command, own=["--base", str(folder)])
    if command in ("build", "apply", "eval.py", "answer.py"):
        return argv_of(command, own=["--model", str(folder)])
    return [str(folder), "--probes", "{text_probes}" if text_probes else "{probes}", "--json", "{out}/report.json"]


@pytest.mark.parametrize("name", BROKEN_MODELS)
def test_loaders_turn_any_library_error_into_one_line(files, out, name):
    """Each broken model through surgery.py, and through one more command that reads that part of the folder (in
    turn, so that every command meets every kind of defect); a truncated weights file through every command."""
    kind, change = BROKEN_MODELS[name]
    folder = copy_model(files["model"], case_folder(files, name) / "model")
    change(folder)
    others = [c for c in MODEL_READERS if meets(c, name, kind) and c != "surgery.py"]
    chosen = others if kind == "weights" else [others[list(BROKEN_MODELS).index(name) % len(others)]]
    for command in ["surgery.py", *chosen]:
        line = check_case(command, model_argv(command, folder, text_probes=kind == "tokenizer"), fresh(files, out),
                          str(folder), out)
        assert "model" in line or "config.json" in line or "tokenizer" in line or "safetensors" in line, line


def test_a_library_load_report_never_reaches_stderr(files, out):
    """transformers' load report (missing, unexpected, mismatched keys) is many lines on stderr: the loaders
    silence it and refuse the model in one line instead (and a good model loads with nothing on stderr)."""
    import contextlib
    import io
    import checks
    folder = copy_model(files["model"], case_folder(files, "load report") / "model")
    changed_weights("unexpected")(folder)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(common.UserError, match="is in the weights but not"):
        checks.load_model(folder, "cpu", torch.float32, "sdpa")
    with contextlib.redirect_stderr(err):
        checks.load_model(files["model"], "cpu", torch.float32, "sdpa")
    assert err.getvalue() == ""


def checkpoint_changes():
    """(name, change(state) -> state) for checkpoints whose fields have the wrong type or range."""
    def setting(**fields):
        return lambda state: {**state, **fields}

    def weight(how):
        def change(state):
            name = sorted(state["trainable"])[0]
            w = state["trainable"][name]
            state["trainable"][name] = {"NaN": w.clone().fill_(float("nan")), "integers": w.long(),
                                        "transposed": w.t().contiguous()}[how]
            return state
        return change

    def group(**fields):
        def change(state):
            state["optimizer"]["param_groups"][0].update(fields)
            return state
        return change

    def moment(how):
        def change(state):
            entry = next(iter(state["optimizer"]["state"].values()))
            if how == "another shape":
                entry["exp_avg"] = torch.zeros(3)
            elif how == "NaN":
                entry["exp_avg_sq"] = entry["exp_avg_sq"].clone().fill_(float("nan"))
            elif how == "negative step":
                entry["step"] = torch.tensor(-1.0)
            elif how == "step zero":
                entry["step"] = torch.tensor(0.0)
            elif how == "step a string":
                entry["step"] = "one"
            elif how == "of an unknown weight":
                state["optimizer"]["state"]["model.nowhere.lora_A"] = entry
            return state
        return change

    for value in ("1", 1.5, -1, True, 10**12, None):
        yield f"step {value!r}", setting(step=value)
    yield "trainable a list", lambda state: {**state, "trainable": list(state["trainable"].values())}
    for how in ("NaN", "integers", "transposed"):
        yield f"a weight {how}", weight(how)
    yield "optimizer a list", setting(optimizer=[])
    yield "optimizer without parameter groups", lambda state: {**state, "optimizer": {"state": {}}}
    for field, value in (("lr", "fast"), ("lr", float("nan")), ("betas", (1.5, 0.9)), ("eps", -1.0),
                         ("amsgrad", "yes"), ("params", ["model.nowhere"])):
        yield f"optimizer {field} {value!r}", group(**{field: value})
    for how in ("another shape", "NaN", "negative step", "step zero", "step a string", "of an unknown weight"):
        yield f"optimizer moment {how}", moment(how)
    yield "config a list", setting(config=["lr", 0.5])
    yield "defense state a list", setting(defense=[1, 2])


CHECKPOINT_CHANGES = dict(checkpoint_changes())
RESUME = ["surgery.py", "--model", "{model}", "--data", "{data}", "--harmful-ref", "{harmful}", "--harmless-ref",
          "{harmless}", "--batch-size", "4", "--max-len", "64", "--max-steps", "3", "--save-every", "0", "--alpha",
          "0"]


@pytest.fixture(scope="module")
def interrupted(files, tmp_path_factory):
    """A real run folder, interrupted after step 1 (checkpoint.pt, train_log.jsonl), with --alpha 0 so that SAP can
    resume it too."""
    import surgery
    from conftest import ctrl_c_at_step
    folder = tmp_path_factory.mktemp("interrupted") / "run"
    with ctrl_c_at_step(1), pytest.raises(SystemExit) as stop:
        surgery.main(fill(RESUME[1:], files) + ["--out", str(folder)])
    assert stop.value.code == 130 and (folder / "checkpoint.pt").is_file()
    return folder


def resume_case(files, interrupted, name, change=None, raw=None):
    """A copy of the interrupted run whose checkpoint.pt is changed (a loaded state through `change`, or raw bytes
    through `raw`)."""
    folder = case_folder(files, name) / "run"
    shutil.copytree(interrupted, folder)
    checkpoint = folder / "checkpoint.pt"
    if change is not None:
        torch.save(change(torch.load(checkpoint, weights_only=True)), checkpoint)
    if raw is not None:
        checkpoint.write_bytes(raw(checkpoint.read_bytes()))
    return folder


def test_an_unchanged_checkpoint_resumes(files, interrupted, tmp_path):
    """The cases below fail for what they change: the interrupted run itself resumes to the end."""
    folder = tmp_path / "run"
    shutil.copytree(interrupted, folder)
    done = run("surgery.py", RESUME + ["--out", str(folder), "--resume"], files)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (folder / "sink_report.json").exists() and not (folder / "checkpoint.pt").exists()


@pytest.mark.parametrize("name", CHECKPOINT_CHANGES)
def test_resume_checks_every_field_of_a_checkpoint(files, interrupted, out, name):
    folder = resume_case(files, interrupted, name, change=CHECKPOINT_CHANGES[name])
    check_case("surgery.py", RESUME + ["--out", str(folder), "--resume"], fresh(files, out),
               ("checkpoint.pt: not a checkpoint of this run", "checkpoint.pt: the run was started with",
                "checkpoint.pt: checkpoint does not match", "checkpoint.pt: not a surgery.py checkpoint"), out)


@pytest.mark.parametrize("offset", [0, 10, 200, -200, -10])
def test_resume_refuses_a_truncated_checkpoint(files, interrupted, out, offset):
    folder = resume_case(files, interrupted, f"truncated {offset}", raw=lambda data: data[:offset] if offset >= 0
                         else data[:len(data) + offset])
    check_case("surgery.py", RESUME + ["--out", str(folder), "--resume"], fresh(files, out),
               "checkpoint.pt: not a surgery.py checkpoint", out)


def test_sap_resume_refuses_a_defense_state_not_its_own(files, interrupted, out):
    def change(state):
        state["defense"] = {"probe_optimizer": {"state": "x", "param_groups": 3}}
        return state
    folder = resume_case(files, interrupted, "sap defense state", change=change)
    loop = fill(RESUME[1:], files) + ["--out", str(folder), "--resume"]
    check_case("sap", ["-m", "defenses.sap", "--triples", "{triples}", "--", *loop], fresh(files, out),
               "its SAP state cannot be restored", out)


def adapter_changes():
    """(name, change(folder)) for LoRA adapter folders broken in one field or file each: config values of the wrong
    type or range or settings the merge does not do, weights truncated, non-finite, of another rank or shape,
    unpaired or not LoRA tensors."""
    from safetensors.torch import load_file, save_file

    def config(**fields):
        def change(folder):
            document = json.loads((folder / "adapter_config.json").read_text())
            document.update(fields)
            (folder / "adapter_config.json").write_text(json.dumps(document))
        return change

    def config_text(text):
        return lambda folder: write(folder / "adapter_config.json", text)

    def tensors(how):
        def change(folder):
            state = load_file(folder / "adapter_model.safetensors")
            a = sorted(k for k in state if ".lora_A." in k)[0]
            b = a.replace(".lora_A.", ".lora_B.")
            if how == "NaN":
                state[a] = state[a].clone().fill_(float("nan"))
            elif how == "integers":
                state[b] = state[b].long()
            elif how == "another rank":
                state[a], state[b] = state[a][:-1].contiguous(), state[b][:, :-1].contiguous()
            elif how == "another shape":
                state[a] = torch.cat([state[a], state[a]], 1)
            elif how == "a lone lora_A":
                del state[b]
            elif how == "a DoRA magnitude":
                state[a.replace(".lora_A.weight", ".lora_magnitude_vector.weight")] = torch.ones(4)
            elif how == "empty":
                state = {}
            save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        return change

    def truncated(offset):
        def change(folder):
            data = (folder / "adapter_model.safetensors").read_bytes()
            (folder / "adapter_model.safetensors").write_bytes(data[:offset if offset >= 0 else len(data) + offset])
        return change

    for value in (0, -1, "8", 2.5, True, None):
        yield f"r {value!r}", config(r=value)
    for value in ("16", None, float("inf")):
        yield f"lora_alpha {value!r}", config(lora_alpha=value)
    yield "peft_type IA3", config(peft_type="IA3")
    for field, value in (("use_dora", True), ("rank_pattern", {"q_proj": 4}), ("alpha_pattern", {"q_proj": 8}),
                         ("fan_in_fan_out", True)):
        yield f"{field} {value!r}", config(**{field: value})
    yield "config a list", config_text("[1, 2]")
    yield "config not JSON", config_text("{r: 8")
    yield "config nested too deeply", config_text("[" * 100000 + "]" * 100000)
    for offset in (0, 8, 100, -10):
        yield f"weights truncated at {offset}", truncated(offset)
    for how in ("NaN", "integers", "another rank", "another shape", "a lone lora_A", "a DoRA magnitude", "empty"):
        yield f"a tensor: {how}", tensors(how)


ADAPTER_CHANGES = dict(adapter_changes())


def adapter_case(files, name, change=None):
    folder = case_folder(files, name) / "adapter"
    shutil.copytree(files["adapter"], folder)
    if change is not None:
        change(folder)
    return folder


def adapter_argv(folder):
    return ["answer.py", "--model", "{model}", "--adapter", str(folder), "--prompts", "{prompts}", "--max-new-tokens",
            "2", "--device", "cpu", "--out", "{out}/answers.jsonl"]


def test_an_unchanged_adapter_answers(files, tmp_path):
    """The adapter cases fail for what they change: a copy of the adapter answers."""
    out = tmp_path / "out"
    out.mkdir()
    done = run("answer.py", adapter_argv(adapter_case(files, "unchanged")), fresh(files, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("name", ADAPTER_CHANGES)
def test_an_adapter_is_checked_in_every_field(files, out, name):
    folder = adapter_case(files, name, ADAPTER_CHANGES[name])
    check_case("answer.py", adapter_argv(folder), fresh(files, out), str(folder), out)


# ---------------------------------------------------------------------------------------------------------------
# Class 2: files that are not regular files. Refused before they are opened: never a hang, never read forever.
# ---------------------------------------------------------------------------------------------------------------

def make_special(kind, path):
    """A path of this kind: a FIFO, a folder, a symlink to /dev/null, /dev/zero itself, a symlink to a FIFO, a
    socket. Returns the path to name."""
    path = Path(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "link to /dev/null":
        path.symlink_to("/dev/null")
    elif kind == "/dev/zero":
        return Path("/dev/zero")
    elif kind == "link to a FIFO":
        os.mkfifo(path.with_name(path.name + ".fifo"))
        path.symlink_to(path.with_name(path.name + ".fifo"))
    elif kind == "socket":  # bound by its name from its folder: a socket's address is short (108 bytes)
        sock, here = socket.socket(socket.AF_UNIX), os.getcwd()
        try:
            os.chdir(path.parent)
            sock.bind(path.name)
        finally:
            os.chdir(here)
            sock.close()
    return path


SPECIAL_KINDS = ("fifo", "folder", "link to /dev/null", "/dev/zero", "link to a FIFO", "socket")
# (command, where): a flag that names an input file.
FILE_SLOTS = [("surgery.py", "--data"), ("surgery.py", "--harmful-ref"), ("surgery.py", "--harmless-ref"),
              ("eval.py", "--align-data"), ("eval.py", "--eval-task"), ("eval.py", "--judge-test"),
              ("eval.py", "--triples"), ("eval.py", "--data"), ("sap", "--triples"), ("build", "--triples"),
              ("apply", "--lock"), ("sinkcheck", "PATH"), ("sinkcheck", "--probes"), ("sinkcheck", "--compare"),
              ("asft", "--data"), ("answer.py", "--prompts")]
# (command, file inside the model folder it reads)
FOLDER_SLOTS = [("surgery.py", "config.json"), ("surgery.py", "tokenizer.json"), ("surgery.py", "model.safetensors"),
                ("eval.py", "tokenizer_config.json"), ("build", "model.safetensors"), ("apply", "model.safetensors"),
                ("apply", "config.json"), ("asft", "model.safetensors"), ("sinkcheck", "model.safetensors"),
                ("sinkcheck", "config.json"), ("sinkcheck", "tokenizer.json"), ("answer.py", "tokenizer.json"),
                ("answer.py", "model.safetensors")]
NOT_A_FILE = ("not a regular file", "is a folder", "Is a directory", "is not a regular file")


def file_argv(command, where, path):
    path = str(path)
    if command == "sinkcheck":
        return {"PATH": [path, "--probes", "{probes}", "--json", "{out}/report.json"],
                "--probes": ["{model}", "--probes", path, "--json", "{out}/report.json"],
                "--compare": ["{model}", "--probes", "{probes}", "--compare", path, "--json",
                              "{out}/report.json"]}[where]
    if command == "surgery.py":
        return argv_of(command, loop=[where, path])
    if command == "asft":
        return argv_of(command, loop=[where, path])
    if command == "eval.py" and where == "--data":  # the file of p = 0 in a --data pattern
        return argv_of(command, own=["--data", str(Path(path).with_name("train_p{{p}}.jsonl"))])
    return argv_of(command, own=[where, path])


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("command, where", FILE_SLOTS)
def test_an_input_that_is_not_a_regular_file_is_refused(files, out, command, where, kind):
    if kind == "folder" and (command, where) in (("sinkcheck", "PATH"), ("sinkcheck", "--compare")):
        pytest.skip("a folder is a checkpoint there (a model folder)")
    name = f"{command} {where} {kind}"
    path = case_folder(files, name) / ("train_p0.jsonl" if where == "--data" else "input")
    if kind == "/dev/zero" and (command, where) == ("eval.py", "--data"):
        path.symlink_to("/dev/zero")  # the pattern names its files
    else:
        path = make_special(kind, path)
    expect = NOT_A_FILE + (("no .safetensors files in folder",) if kind == "folder" else ())
    check_case(command, file_argv(command, where, path), fresh(files, out), expect, out)


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/null", "socket"])
@pytest.mark.parametrize("command, inside", FOLDER_SLOTS)
def test_a_model_folder_holding_a_non_file_is_refused(files, out, command, inside, kind):
    folder = copy_model(files["model"], case_folder(files, f"{command} {inside} {kind}") / "model")
    (folder / inside).unlink()
    make_special(kind, folder / inside)
    check_case(command, model_argv(command, folder, text_probes=True), fresh(files, out),
               (f"{inside}: not a regular file", f"{inside} is not a regular file"), out)


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/null"])
@pytest.mark.parametrize("inside", ["checkpoint.pt", "train_log.jsonl"])
def test_a_resumed_run_holding_a_non_file_is_refused(files, interrupted, out, inside, kind):
    folder = resume_case(files, interrupted, f"resume {inside} {kind}")
    (folder / inside).unlink()
    make_special(kind, folder / inside)
    check_case("surgery.py", RESUME + ["--out", str(folder), "--resume"], fresh(files, out),
               f"{inside}: is a", out)


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_an_adapter_that_is_no_folder_or_holds_a_non_file_is_refused(files, out, kind):
    """--adapter names a folder: a FIFO, a device or a socket in its place, or in the place of either of its files,
    is refused before anything is opened (a folder where a file belongs too)."""
    if kind != "folder":
        path = make_special(kind, case_folder(files, f"adapter {kind}") / "adapter")
        check_case("answer.py", adapter_argv(path), fresh(files, out), "not a folder", out)
    for inside in ("adapter_config.json", "adapter_model.safetensors"):
        folder = adapter_case(files, f"adapter {inside} {kind}")
        (folder / inside).unlink()
        if kind == "/dev/zero":
            (folder / inside).symlink_to("/dev/zero")
        else:
            make_special(kind, folder / inside)
        check_case("answer.py", adapter_argv(folder), fresh(files, out), NOT_A_FILE, out)


def test_a_sharded_checkpoint_with_a_fifo_shard_is_refused(files, out):
    """sinkcheck's C++ loader opens every shard of an index: a FIFO shard is refused in Python first."""
    folder = copy_model(files["model"], case_folder(files, "fifo shard") / "model")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    os.mkfifo(folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    for command in ("sinkcheck", "surgery.py", "apply"):
        argv = ([str(folder), "--probes", "{probes}", "--json", "{out}/report.json"] if command == "sinkcheck"
                else model_argv(command, folder))
        check_case(command, argv, fresh(files, out), "model-00002-of-00002.safetensors: not a regular file", out)


def test_reading_a_fifo_never_blocks(tmp_path):
    """The one reader of every input (common.read_input_bytes) refuses a FIFO without opening it for a blocking
    read, even one put in the place of a regular file after its first check."""
    os.mkfifo(tmp_path / "fifo")
    for reader in (common.read_text_file, common.read_json_rows, common.read_input_bytes, common.check_input_file):
        with pytest.raises(common.UserError, match="not a regular file"):
            reader(tmp_path / "fifo")
    real_check = common.check_input_file
    try:  # the check passes, then the path turns out a FIFO when opened: fstat of the open file refuses it
        common.check_input_file = lambda path: os.stat(tmp_path / "regular") if (tmp_path / "regular").exists() \
            else real_check(path)
        (tmp_path / "regular").write_text("x")
        with pytest.raises(common.UserError, match="not a regular file"):
            common.read_input_bytes(tmp_path / "fifo")
    finally:
        common.check_input_file = real_check


# ---------------------------------------------------------------------------------------------------------------
# Class 3: outputs. Never an input of the command (after symlinks), never an existing non-file or non-folder.
# ---------------------------------------------------------------------------------------------------------------

def sharded_model(files, folder):
    """The tiny model with its weights in shards (no model.safetensors): a folder surgery.py would write into."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(files["model"]).save_pretrained(folder, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(files["model"]).save_pretrained(folder)
    assert not (folder / "model.safetensors").exists()
    return folder


def output_cases():
    """(name, command, argv builder(files, case folder) -> argv, expect). Each names an output that is one of the
    command's inputs (directly, through a symlink or a hard link), or an existing FIFO, device or socket where a
    file or a folder is written."""
    def link(target):
        def make(files, folder):
            (folder / "link").symlink_to(fill([target], files)[0])
            return folder / "link"
        return make

    def hard_link(target):
        def make(files, folder):
            os.link(fill([target], files)[0], folder / "hard")
            return folder / "hard"
        return make

    def special(kind):
        return lambda files, folder: make_special(kind, folder / "target")

    def path(target):
        return lambda files, folder: fill([target], files)[0]

    is_input = ("is also an input", "is a file of an input folder", "holds an input")
    not_file = ("is a FIFO", "is a character device", "is a socket", "is a folder, expected", "is a file, "
                                                                                              "expected a folder")
    for name, target, expect in (
            ("the weights", path("{model}/model.safetensors"), is_input),
            ("config.json", path("{model}/config.json"), is_input),
            ("the probes", path("{probes}"), is_input),
            ("a symlink to the weights", link("{model}/model.safetensors"), is_input),
            ("a hard link to the probes", hard_link("{probes}"), is_input),
            ("/dev/null", path("/dev/null"), not_file),
            ("a symlink to /dev/null", link("/dev/null"), not_file),
            ("a FIFO", special("fifo"), not_file),
            ("a socket", special("socket"), not_file)):
        yield f"sinkcheck --json {name}", "sinkcheck", lambda f, d, t=target: [
            "{model}", "--probes", "{probes}", "--json", str(t(f, d))], expect
    yield "sinkcheck --json the --compare checkpoint", "sinkcheck", lambda f, d: [
        "{model}", "--probes", "{probes}", "--compare", "{aligned}", "--json", fill(["{aligned}/model.safetensors"],
                                                                                   f)[0]], is_input
    def sharded_out(files, folder):
        model = sharded_model(files, folder / "sharded")
        return argv_of("surgery.py", loop=["--model", str(model), "--out", str(model)])
    yield "surgery.py --out the model folder (sharded weights)", "surgery.py", sharded_out, is_input
    for name, target, expect in (
            ("a symlink to the data", link("{data}"), not_file),
            ("/dev/null", path("/dev/null"), not_file),
            ("a symlink to /dev/null", link("/dev/null"), not_file),
            ("a FIFO", special("fifo"), not_file)):
        yield f"surgery.py --out {name}", "surgery.py", lambda f, d, t=target: argv_of(
            "surgery.py", loop=["--out", str(t(f, d))]), expect
    for name, target, expect in (
            ("the triples", path("{triples}"), is_input),
            ("the model's weights", path("{aligned}/model.safetensors"), is_input),
            ("the model's config.json", path("{aligned}/config.json"), is_input),
            ("a symlink to the triples", link("{triples}"), is_input),
            ("/dev/null", path("/dev/null"), not_file),
            ("a FIFO", special("fifo"), not_file)):
        yield f"build --out {name}", "build", lambda f, d, t=target: argv_of("build", own=["--out", str(t(f, d))]), \
            expect
    for name, target, expect in (
            ("a symlink to the model folder", link("{model}"), ("is the model folder itself",) + is_input),
            ("the folder holding the lock", path("{root}"), is_input),
            ("the lock", path("{lock}"), not_file),
            ("/dev/null", path("/dev/null"), not_file),
            ("a FIFO", special("fifo"), not_file)):
        yield f"apply --out {name}", "apply", lambda f, d, t=target: argv_of("apply", own=["--out", str(t(f, d))]), \
            expect
    for flag in ("--work-dir", "--results-dir"):
        for name, target, expect in (
                ("the model folder", path("{model}"), is_input),
                ("a symlink to the model folder", link("{model}"), is_input),
                ("an input file", path("{align}"), not_file),
                ("/dev/null", path("/dev/null"), not_file),
                ("a FIFO", special("fifo"), not_file)):
            yield f"eval.py {flag} {name}", "eval.py", lambda f, d, t=target, flag=flag: argv_of(
                "eval.py", own=[flag, str(t(f, d))]), expect
    for name, target in (("the base model folder", path("{model}")), ("a symlink to it", link("{model}"))):
        yield f"asft --out {name}", "asft", lambda f, d, t=target: argv_of("asft", loop=["--out", str(t(f, d))]), \
            is_input
    for name, target, expect in (
            ("the prompts", path("{prompts}"), is_input),
            ("a symlink to the prompts", link("{prompts}"), is_input),
            ("a hard link to the prompts", hard_link("{prompts}"), is_input),
            ("the adapter's weights", path("{adapter}/adapter_model.safetensors"), is_input),
            ("the model's config.json", path("{model}/config.json"), is_input),
            ("/dev/null", path("/dev/null"), not_file),
            ("a FIFO", special("fifo"), not_file),
            ("a socket", special("socket"), not_file)):
        yield f"answer.py --out {name}", "answer.py", lambda f, d, t=target: argv_of(
            "answer.py", own=["--out", str(t(f, d))]), expect


OUTPUT_CASES = {name: rest for name, *rest in output_cases()}


@pytest.mark.parametrize("name", OUTPUT_CASES)
def test_an_output_is_no_input_and_no_special_file(files, out, name):
    command, make_argv, expect = OUTPUT_CASES[name]
    argv = make_argv(fresh(files, out), case_folder(files, name))
    check_case(command, argv, fresh(files, out), expect, out)


def test_check_output_rules(tmp_path):
    """common.check_output in-process: each rule once, and what is allowed."""
    (tmp_path / "in.jsonl").write_text("{}\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w.safetensors").write_text("x")
    inputs = [("--data", tmp_path / "in.jsonl"), ("--model", tmp_path / "models")]
    allowed = [(tmp_path / "new.json", False), (tmp_path / "models" / "new.json", False),
               (tmp_path / "run", True), (tmp_path, True)]
    for path, folder in allowed:
        assert common.check_output("--out", path, inputs, folder=folder) == Path(path)
    refused = [("", False, "is empty"), (tmp_path / "in.jsonl", False, "is also an input"),
               (tmp_path / "models" / "w.safetensors", False, "is a file of an input folder"),
               (tmp_path / "models", True, "is also an input"), ("/dev/null", False, "is a character device"),
               ("/dev/null", True, "expected a folder"), (tmp_path / "in.jsonl", True, "expected a folder"),
               (tmp_path, False, "is a folder")]
    for path, folder, message in refused:
        with pytest.raises(common.UserError, match=message):
            common.check_output("--out", path, inputs, folder=folder)
    with pytest.raises(common.UserError, match="holds an input"):
        common.check_output("--out", tmp_path, inputs, folder=True, replaced_whole=True)


# ---------------------------------------------------------------------------------------------------------------
# Class 4: text that is valid JSON but no text (a lone surrogate escape)
# ---------------------------------------------------------------------------------------------------------------

ESCAPES = ("\\ud800", "\\udfff", "\\ud83d", "x\\udc00y", "\\ud83d\\u0041", "\\ud800\\ud800\\udc00")
# (command, flag, a good record of that file, the text fields to spoil)
TEXT_SLOTS = [
    ("surgery.py", "--data", {"instruction": "Review: fine. Sentiment?", "output": "positive", "input": "x"},
     ("instruction", "output", "input")),
    ("surgery.py", "--harmful-ref", {"instruction": "Explain harmful thing 9.", "output": "Sure."},
     ("instruction", "output")),
    ("surgery.py", "--harmless-ref", {"instruction": "Explain dangerous thing 9.", "output": "No."},
     ("output",)),
    ("eval.py", "--align-data", {"instruction": "Review a9: fine.", "output": "positive"}, ("instruction",)),
    ("eval.py", "--eval-task", {"instruction": "Review e9: fine.", "output": "negative"}, ("output",)),
    ("eval.py", "--judge-train", {"objective": "How do I do bad thing z9?", "response": "No.", "label": 0},
     ("objective", "response")),
    ("eval.py", "--triples", dict(TRIPLES[5], instruction="Explain how to do harmful thing s9."),
     ("refusal", "harmful_answer")),
    ("sap", "--triples", TRIPLES[0], ("instruction", "refusal", "harmful_answer")),
    ("build", "--triples", TRIPLES[1], ("instruction", "harmful_answer")),
    ("sinkcheck", "--probes", {"instruction": "How?", "output": "Sure.", "harmful": True}, ("instruction", "output")),
    ("answer.py", "--prompts", {"prompt": "How do I bake bread?", "id": "q1"}, ("prompt",)),
]


def surrogate_cases():
    """(name, command, flag, file text, line of the bad escape): each slot's file with one record spoiled, in turn
    in each of its fields, with each escape, as JSONL (the record on line 1, 2 or 3) or as an indented JSON list
    (sinkcheck's text probes are JSONL only)."""
    rng = random.Random(21)
    for command, flag, record, fields in TEXT_SLOTS:
        for k in range(4):
            field = fields[k % len(fields)]
            escape = ESCAPES[rng.randrange(len(ESCAPES))]
            good = [dict(record, **({"harmful": False} if command == "sinkcheck" else {})), record, record]
            as_list = command != "sinkcheck" and k % 2 == 1
            at = rng.randrange(3)
            lines = [json.dumps(r) for r in good]
            spoiled = json.dumps(record).replace(json.dumps(record[field]), json.dumps(record[field])[:-1] +
                                                 escape + '"', 1)
            lines[at] = spoiled
            if as_list:
                text, line = "[\n" + ",\n".join(lines) + "\n]\n", at + 2
            else:
                text, line = "\n".join(lines) + "\n", at + 1
            yield f"{command} {flag} {field} {escape} {'list' if as_list else 'jsonl'}", command, flag, text, line


SURROGATE_CASES = {name: rest for name, *rest in surrogate_cases()}


@pytest.mark.parametrize("name", SURROGATE_CASES)
def test_a_lone_surrogate_escape_is_refused_naming_file_and_line(files, out, name):
    command, flag, text, line = SURROGATE_CASES[name]
    path = write(case_folder(files, name) / ("train_p0.jsonl" if flag == "--data" else "records.jsonl"), text)
    json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines()]  # valid JSON
    check_case(command, file_argv(command, flag, path), fresh(files, out), f"{path}: line {line}: the escape", out)


def test_lone_surrogate_agrees_with_json_on_random_strings(tmp_path):
    """common.lone_surrogate (and sinkcheck's copy) against json itself: a string parses to something UTF-8 cannot
    encode exactly when an escape is found, on the line where it is."""
    from sinkcheck import files as sinkcheck_files
    rng = random.Random(0)
    pieces = ["a", "\\\\", "\\n", "\\u0041", "\\ud800", "\\udbff", "\\udc00", "\\udfff", "\\ud83d\\ude00",
              "\\uD83D\\uDE00", "\\\\ud800", "é", " "]
    for _ in range(2000):
        rows = ["".join(rng.choice(pieces) for _ in range(rng.randrange(6))) for _ in range(rng.randrange(1, 4))]
        text = "\n".join(f'{{"k{i}": "{row}"}}' for i, row in enumerate(rows))
        bad_lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                json.dumps(json.loads(line), ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                bad_lines.append(number)
        found = common.lone_surrogate(text)
        assert (found[0] if found else None) == (bad_lines[0] if bad_lines else None), text
        for number, line in enumerate(text.splitlines(), start=1):
            assert (sinkcheck_files.lone_surrogate(line) is not None) == (number in bad_lines), line
    # A whole pair is text, and so are escaped backslashes before "ud800".
    assert common.read_json_rows(write(tmp_path / "pair.jsonl", '{"a": "\\ud83d\\ude00 \\\\ud800"}\n')) == [
        {"a": "\U0001F600 \\ud800"}]


# ---------------------------------------------------------------------------------------------------------------
# Class 5: flags. Every numeric flag has a bound, an empty string is a value, no flag is guessed from a prefix.
# ---------------------------------------------------------------------------------------------------------------

def bound_cases():
    """(name, command, argv, expect): every bounded numeric flag just past its bound and far past it."""
    import checks
    import eval as protocol
    for flag, bound in checks.FLAG_BOUNDS.items():
        dashed = f"--{flag.replace('_', '-')}"
        for value in (bound + 1, 10**30):
            yield f"surgery.py {dashed} {value}", "surgery.py", argv_of("surgery.py", loop=[dashed, str(value)]), \
                f"{dashed} must be at most"
    for value in (checks.MAX_EPOCHS + 1, 1e300):
        yield f"surgery.py --epochs {value}", "surgery.py", argv_of(
            "surgery.py", loop=["--epochs", str(value), "--max-steps", "1"]), "--epochs must be at most"
    yield "surgery.py --lora-rank past the layers", "surgery.py", argv_of(
        "surgery.py", loop=["--lora-rank", "33"]), "--lora-rank 33 is larger than"
    yield "surgery.py --lora-rank past one target", "surgery.py", argv_of(
        "surgery.py", loop=["--lora-rank", "65", "--lora-targets", "q_proj"]), "--lora-rank 65 is larger than"
    for flag, bound in protocol.SIZE_BOUNDS.items():
        dashed = f"--{flag.replace('_', '-')}"
        value = str(bound + 1)
        own = [dashed, value, "--lr", "1e-3"] if flag == "attack_steps" else \
            [dashed, value, "--align-lr", "1e-3"] if flag == "align_steps" else [dashed, value]
        yield f"eval.py {dashed} {value}", "eval.py", argv_of("eval.py", own=own), f"{dashed} must be at most"
    for extra, expect in (("--ref-batch 1000000000", "--ref-batch must be at most"),
                          ("--epochs 1e300", "--epochs must be at most"),
                          ("--grad-accum 99999999", "--grad-accum must be at most")):
        yield f"eval.py --train-args {extra}", "eval.py", argv_of("eval.py", own=["--train-args", extra]), expect
    yield "eval.py --lora-rank past the layers", "eval.py", argv_of("eval.py", own=["--lora-rank", "33"]), \
        "--lora-rank 33 is larger than"
    yield "eval.py --attack-candidates past MAX_STEPS", "eval.py", argv_of(
        "eval.py", own=["--attack-candidates", f"{checks.MAX_STEPS + 1}:1e-3"]), "is not STEPS:LR"
    yield "sap --safety-batch", "sap", argv_of("sap", own=["--safety-batch", str(10**9)]), \
        "the safety batch must be at most"
    yield "sap --layers", "sap", argv_of("sap", own=["--layers", str(10**18)]), "probe layers must be in"
    for flag, value, expect in (("--positions", str(10**12), "--positions at most"),
                                ("--max-len", str(10**12), "--max-len must be at most"),
                                ("--seed", str(2**64), "--seed must be below 2^63"),
                                ("--heads", str(10**12), "--heads must be in")):
        yield f"build {flag} {value}", "build", argv_of("build", own=[flag, value]), expect
    for flag, value, expect in (("--threads", str(10**12), "--threads must be between"),
                                ("--top", str(2**40), "--top must be at least 1"),
                                ("--max-positive", str(2**40), "--max-positive must be between")):
        yield f"sinkcheck {flag} {value}", "sinkcheck", argv_of("sinkcheck") + [flag, value], expect
    for flag in ("--max-new-tokens", "--batch-size"):
        for value in ("0", "65537", str(10**30)):
            yield f"answer.py {flag} {value}", "answer.py", argv_of("answer.py", own=[flag, value]), \
                "--max-new-tokens and --batch-size must be between"
    yield "answer.py --max-new-tokens past the context", "answer.py", argv_of(
        "answer.py", own=["--max-new-tokens", "500"]), "passes the model's context of 512 tokens"


def empty_string_cases():
    """(name, command, argv, expect): every flag that names a path, given the empty string."""
    import eval as protocol
    for flag in ("--model", "--data", "--harmful-ref", "--harmless-ref", "--out"):
        yield f"surgery.py {flag}", "surgery.py", argv_of("surgery.py", loop=[flag, ""]), f"{flag} is empty"
    for name in protocol.INPUT_FLAGS + ("work_dir", "results_dir", "cache_dir"):
        flag = f"--{name.replace('_', '-')}"
        yield f"eval.py {flag}", "eval.py", argv_of("eval.py", own=[flag, ""]), f"{flag} is empty"
    yield "asft --base", "asft", argv_of("asft", own=["--base", ""]), "--base is empty"
    yield "asft --aligned", "asft", argv_of("asft", own=["--aligned", ""]), "--aligned is empty"
    yield "sap --triples", "sap", argv_of("sap", own=["--triples", ""]), "--triples is empty"
    for flag in ("--model", "--out", "--triples"):
        yield f"build {flag}", "build", argv_of("build", own=[flag, ""]), f"{flag} is empty"
    for flag in ("--model", "--lock", "--out"):
        yield f"apply {flag}", "apply", argv_of("apply", own=[flag, ""]), f"{flag} is empty"
    yield "sinkcheck PATH", "sinkcheck", ["", "--probes", "{probes}", "--json", "{out}/report.json"], "PATH is empty"
    for flag in ("--probes", "--json", "--compare"):
        yield f"sinkcheck {flag}", "sinkcheck", argv_of("sinkcheck") + [flag, ""], f"{flag} is empty"
    for flag in ("--prompts", "--out", "--model", "--adapter"):
        yield f"answer.py {flag}", "answer.py", argv_of("answer.py", own=[flag, ""]), f"{flag} is empty"


def parser_flags(command):
    """The long flags of a command's parser, read from its --help: (flag, takes a value)."""
    head = {"surgery.py": ["surgery.py"], "eval.py": ["eval.py"], "asft": ["-m", "defenses.asft"],
            "sap": ["-m", "defenses.sap"], "build": ["-m", "defenses.safetylock", "build"],
            "apply": ["-m", "defenses.safetylock", "apply"], "answer.py": ["answer.py"]}
    if command == "sinkcheck":
        text = subprocess.run([SINKCHECK, "--help"], capture_output=True, text=True, timeout=TIMEOUT).stdout
    else:
        text = run_forked(*head[command], "--help", timeout=TIMEOUT).stdout
    flags = {}
    for m in re.finditer(r"^  (?:-\w, )?(--[a-z][a-z0-9-]*)( [A-Z{\[])?", text, re.MULTILINE):
        if m.group(1) != "--help":
            flags.setdefault(m.group(1), bool(m.group(2)))
    return flags


ABBREVIATED = ("surgery.py", "eval.py", "asft", "sap", "build", "apply", "sinkcheck", "answer.py")


@pytest.mark.parametrize("command", ABBREVIATED)
def test_every_flag_abbreviated_is_refused(files, out, command):
    """Every long flag of the command's parser without its last letter: an unknown flag, never the flag it
    abbreviates (`--alph 0` once trained plain SFT as --alpha 0)."""
    flags = parser_flags(command)
    assert len(flags) >= 2, flags
    cases = 0
    for flag, takes_value in flags.items():
        short = flag[:-1]
        if short in flags:
            continue  # itself a flag
        extra = [short, "1"] if takes_value else [short]
        argv = (argv_of(command) + extra if command == "sinkcheck" else
                argv_of(command, own=extra) if command != "surgery.py" else argv_of(command, loop=extra))
        check_case(command, argv, fresh(files, out), f"unrecognized arguments: {short}", out)
        cases += 1
    assert cases >= len(flags) - 1


def test_train_args_abbreviated_are_refused(files, out):
    """eval.py checks --train-args against surgery.py's own parser: every surgery.py flag abbreviated there is
    refused before the first stage (each would have been read as the flag it abbreviates)."""
    flags = parser_flags("surgery.py")
    for flag, takes_value in flags.items():
        short = flag[:-1]
        if short in flags:
            continue
        extra = f"{short} 1" if takes_value else short
        check_case("eval.py", argv_of("eval.py", own=[f"--train-args={extra}"]), fresh(files, out),
                   f"--train-args: unrecognized arguments: {short}", out)


FLAG_CASES = {name: rest for name, *rest in [*bound_cases(), *empty_string_cases()]}


@pytest.mark.parametrize("name", FLAG_CASES)
def test_a_flag_out_of_bounds_or_empty_is_refused(files, out, name):
    command, argv, expect = FLAG_CASES[name]
    check_case(command, argv, fresh(files, out), expect, out)


def test_parsers_allow_no_abbreviation():
    """common.ArgumentParser, and the subcommand parsers made from it, refuse abbreviations by default."""
    parser = common.ArgumentParser(prog="tool")
    parser.add_argument("--alpha", type=float)
    commands = parser.add_subparsers(dest="command")
    sub = commands.add_parser("build")
    sub.add_argument("--model")
    assert parser.parse_args(["--alpha", "1"]).alpha == 1
    for argv in (["--alph", "0"], ["build", "--mod", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
