"""The bad inputs of `python -m defenses.asft`, `defenses.sap` and `defenses.safetylock build|apply`, table-driven:
each defense's own flags (type, range), its files and folders (missing, a file where a folder is expected and the
reverse, wrong encoding or format, wrong fields, a lock that is not one, a model of another family, --out the model
itself) and surgery.py's flags after `--`. Each row: exit status 2, exactly one line on stderr naming the problem
(prefixed by the command, or by surgery.py for what its loop finds), no traceback, nothing written. A new input
gets its row here. Rows run in children of input_helpers' fork server (torch imported once)."""
import pytest
import torch

from conftest import write_jsonl
from input_helpers import (AS_ROOT, TRIPLES, assert_rejected, bad_models, bad_record_files, defense_input_files, fill,
                           run_forked, tree)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from defenses import safetylock
    root = tmp_path_factory.mktemp("defense_inputs")
    files = {"root": root, **defense_input_files(root),
             "one_triple": write_jsonl(root / "one_triple.jsonl", TRIPLES[:1]),
             "triples_no_answer": write_jsonl(root / "triples_no_answer.jsonl", [
                 {"instruction": "How?", "refusal": "No.", "harmful_answer": ""}])}
    files.update(bad_record_files(root))
    model = files["model"]
    models = bad_models(root, model)
    files.update({k: models[k] for k in ("no_chat_template", "bloom", "gpt2", "no_weights")})
    lock = safetylock.build(model, TRIPLES, max_len=64)
    files["lock"] = safetylock.save_lock(root / "lock.safetensors", lock)
    files["locked"] = safetylock.apply(model, files["lock"], root / "locked")
    read_only = root / "read_only"
    read_only.mkdir(mode=0o500)
    files["read_only"] = read_only
    return files


# surgery.py's side of the loop defenses: one step of a small run; a row's flags after `--` replace these.
LOOP = ["--model", "{aligned}", "--data", "{data}", "--harmful-ref", "{harmful}", "--harmless-ref", "{harmless}",
        "--batch-size", "4", "--max-len", "64", "--max-steps", "1", "--save-every", "0", "--out", "{out}"]

# name: (command line, error prefix, message, [True: needs a non-root user])
ASFT_ROWS = {
    "asft without --base": (["--", *LOOP], "python -m defenses.asft", "the following arguments are required: --base"),
    "asft base missing": (["--base", "{root}/absent", "--", *LOOP], "defenses.asft", "absent: no such model folder"),
    "asft base a file": (["--base", "{a_file}", "--", *LOOP], "defenses.asft", "a_file: is a file, expected a model "
                                                                               "folder"),
    "asft base without weights": (["--base", "{no_weights}", "--", *LOOP], "defenses.asft",
                                  "no_weights: no model.safetensors (or model.safetensors.index.json) in this folder"),
    "asft aligned missing": (["--base", "{model}", "--aligned", "{root}/absent", "--", *LOOP], "defenses.asft",
                             "absent: no such model folder"),
    "asft lambda not a number": (["--base", "{model}", "--lambda", "x", "--", *LOOP], "python -m defenses.asft",
                                 "argument --lambda: invalid float value: 'x'"),
    "asft lambda negative": (["--base", "{model}", "--lambda", "-1", "--", *LOOP], "defenses.asft",
                             "AsFT: lambda must be finite and >= 0, got -1.0"),
    "asft lambda NaN": (["--base", "{model}", "--lambda", "nan", "--", *LOOP], "defenses.asft",
                        "AsFT: lambda must be finite and >= 0, got nan"),
    "asft unknown flag": (["--base", "{model}", "--nope", "--", *LOOP], "python -m defenses.asft",
                          "unrecognized arguments: --nope"),
    "asft base of another family": (["--base", "{gpt2}", "--", *LOOP], "surgery.py",
                                    "no tensor model.layers.0.self_attn.q_proj.weight (and 7 more): not the same "
                                    "model family"),
    "asft base identical to the aligned model": (["--base", "{aligned}", "--", *LOOP], "surgery.py",
                                                 "are identical in every adapted layer, so there is no alignment "
                                                 "direction"),
    "asft with --full": (["--base", "{model}", "--", *LOOP, "--full"], "surgery.py",
                         "AsFT penalises the LoRA update B A of each adapted layer: run it without --full"),
    "asft bad surgery.py flag": (["--base", "{model}", "--", *LOOP, "--lr", "nan"], "surgery.py",
                                 "--lr must be a finite number, got nan"),
    "asft surgery.py data missing": (["--base", "{model}", "--", *LOOP, "--data", "{root}/absent.jsonl"],
                                     "surgery.py", "absent.jsonl: no such file"),
}

SAP_ROWS = {
    "sap rho zero": (["--rho", "0", "--", *LOOP], "defenses.sap", "SAP: rho and the probe learning rate must be > 0"),
    "sap rho NaN": (["--rho", "nan", "--", *LOOP], "defenses.sap", "SAP: rho and the probe learning rate must be > 0"),
    "sap rho infinite": (["--rho", "inf", "--", *LOOP], "defenses.sap", "SAP: rho and the probe learning rate"),
    "sap probe lr negative": (["--probe-lr", "-0.1", "--", *LOOP], "defenses.sap", "the probe learning rate must "
                                                                                   "be > 0"),
    "sap safety batch zero": (["--safety-batch", "0", "--", *LOOP], "defenses.sap", "the safety batch at least 1"),
    "sap layers not numbers": (["--layers", "a,b", "--", *LOOP], "python -m defenses.sap",
                               "argument --layers: invalid layer_list value: 'a,b'"),
    "sap layer past the model": (["--layers", "7", "--", *LOOP], "surgery.py",
                                 "SAP: probe layers must be in 0..1, got [7]"),
    "sap layer negative": (["--layers=-1", "--", *LOOP], "surgery.py", "SAP: probe layers must be in 0..1, got [-1]"),
    "sap triples missing": (["--triples", "{root}/absent.jsonl", "--", *LOOP], "defenses.sap",
                            "absent.jsonl: no such file"),
    "sap triples a folder": (["--triples", "{folder}", "--", *LOOP], "defenses.sap", "is a folder, expected a file"),
    "sap triples wrong encoding": (["--triples", "{latin1}", "--", *LOOP], "defenses.sap", "not UTF-8 text"),
    "sap triples empty": (["--triples", "{empty}", "--", *LOOP], "defenses.sap", "empty.jsonl: file is empty"),
    "sap triples wrong fields": (["--triples", "{no_output}", "--", *LOOP], "defenses.sap",
                                 "record 1 needs non-empty string fields 'instruction', 'refusal' (or 'safe') and "
                                 "'harmful_answer' (or 'unsafe')"),
    "sap triples with an empty answer": (["--triples", "{triples_no_answer}", "--", *LOOP], "defenses.sap",
                                         "record 1 needs non-empty string fields"),
    "sap bad surgery.py flag": (["--", *LOOP, "--batch-size", "0"], "surgery.py",
                                "--batch-size must be at least 1, got 0"),
}

BUILD = ["build", "--model", "{aligned}", "--triples", "{triples}", "--max-len", "64", "--out", "{out}/lock.st"]
APPLY = ["apply", "--model", "{model}", "--lock", "{lock}", "--out", "{out}/locked"]
LOCK_ROWS = {
    "safetylock without a command": ([], "python -m defenses.safetylock", "the following arguments are required: "
                                                                          "command"),
    "safetylock unknown command": (["lock"], "python -m defenses.safetylock", "argument command: invalid choice: "
                                                                              "'lock'"),
    "build without --out": (["build", "--model", "{aligned}"], "python -m defenses.safetylock build",
                            "the following arguments are required: --out"),
    "build model missing": ([*BUILD, "--model", "{root}/absent"], "defenses.safetylock",
                            "cannot load model {root}/absent: no such model folder"),
    "build model without chat template": ([*BUILD, "--model", "{no_chat_template}"], "defenses.safetylock",
                                          "its tokenizer has no chat template"),
    "build model attention outside the interface": ([*BUILD, "--model", "{bloom}"], "defenses.safetylock",
                                                    "attention does not go through transformers' attention "
                                                    "interface"),
    "build model without o_proj": ([*BUILD, "--model", "{gpt2}"], "defenses.safetylock",
                                   "GPT2LMHeadModel has no self_attn.o_proj layers"),
    "build heads zero": ([*BUILD, "--heads", "0"], "defenses.safetylock", "--heads must be at least 1, got 0"),
    "build heads past the model": ([*BUILD, "--heads", "1000"], "defenses.safetylock", "--heads must be in 1..8"),
    "build heads not a number": ([*BUILD, "--heads", "all"], "python -m defenses.safetylock build",
                                 "argument --heads: invalid int value: 'all'"),
    "build holdout one and a half": ([*BUILD, "--holdout", "1.5"], "defenses.safetylock",
                                     "the held-out share must be in (0, 1)"),
    "build holdout NaN": ([*BUILD, "--holdout", "nan"], "defenses.safetylock", "the held-out share must be in (0, 1)"),
    "build positions zero": ([*BUILD, "--positions", "0"], "defenses.safetylock", "positions and max-len >= 1"),
    "build max len zero": ([*BUILD, "--max-len", "0"], "defenses.safetylock", "positions and max-len >= 1"),
    "build alpha NaN": ([*BUILD, "--alpha", "nan"], "defenses.safetylock", "alpha finite and >= 0"),
    "build alpha negative": ([*BUILD, "--alpha", "-1"], "defenses.safetylock", "alpha finite and >= 0"),
    "build seed negative": ([*BUILD, "--seed", "-1"], "defenses.safetylock", "--seed must be >= 0, got -1"),
    "build device unknown": ([*BUILD, "--device", "abacus"], "defenses.safetylock",
                             "--device 'abacus': not a torch device"),
    "build out a folder": ([*BUILD, "--out", "{root}"], "defenses.safetylock",
                           "is a folder, expected the name of the lock file to write"),
    "build out below a file": ([*BUILD, "--out", "{a_file}/lock.st"], "defenses.safetylock",
                               "--out {a_file}: is a file, expected a folder"),
    "build out not writable": ([*BUILD, "--out", "{read_only}/lock.st"], "defenses.safetylock",
                               "read_only is not writable", True),
    "build one triple": ([*BUILD, "--triples", "{one_triple}"], "defenses.safetylock", "at least 2 triples"),
    "build triples UTF-16": ([*BUILD, "--triples", "{utf16}"], "defenses.safetylock", "not UTF-8 text"),
    "build triples CSV": ([*BUILD, "--triples", "{csv}"], "defenses.safetylock", "not JSON or JSONL"),
    "build triples huge": ([*BUILD, "--triples", "{huge}"], "defenses.safetylock", "over the 1 GiB limit"),
    "apply lock missing": ([*APPLY, "--lock", "{root}/absent.st"], "defenses.safetylock", "no such lock file"),
    "apply lock not safetensors": ([*APPLY, "--lock", "{csv}"], "defenses.safetylock", "not a safetensors file"),
    "apply lock a model's weights": ([*APPLY, "--lock", "{model}/model.safetensors"], "defenses.safetylock",
                                     "not a SafetyLock file"),
    "apply model missing": ([*APPLY, "--model", "{root}/absent"], "defenses.safetylock",
                            "absent: not a model folder (no config.json)"),
    "apply model a file": ([*APPLY, "--model", "{a_file}"], "defenses.safetylock", "not a model folder"),
    "apply model of another family": ([*APPLY, "--model", "{gpt2}"], "defenses.safetylock",
                                      "is not of the lock's model family"),
    "apply model already locked": ([*APPLY, "--model", "{locked}"], "defenses.safetylock", "is already locked"),
    "apply model without weights": ([*APPLY, "--model", "{no_weights}"], "defenses.safetylock",
                                    "no_weights: no model.safetensors"),
    "apply out is the model folder": ([*APPLY, "--out", "{model}"], "defenses.safetylock",
                                      "is the model folder itself"),
    "apply out a file": ([*APPLY, "--out", "{a_file}"], "defenses.safetylock", "is a file, expected a folder"),
    "apply out below a file": ([*APPLY, "--out", "{a_file}/locked"], "defenses.safetylock",
                               "--out {a_file}: is a file, expected a folder"),
    "apply alpha NaN": ([*APPLY, "--alpha", "nan"], "defenses.safetylock",
                        "the strength alpha must be finite and >= 0, got nan"),
    "apply alpha negative": ([*APPLY, "--alpha", "-2"], "defenses.safetylock", "must be finite and >= 0, got -2.0"),
}

ROWS = {**{k: ("defenses.asft", *v) for k, v in ASFT_ROWS.items()},
        # SAP's rows name the small triples file (not the offline default) unless they are about --triples.
        **{k: ("defenses.sap", ["--triples", "{triples}", *v[0]], *v[1:]) for k, v in SAP_ROWS.items()},
        **{k: ("defenses.safetylock", *v) for k, v in LOCK_ROWS.items()}}


@pytest.mark.parametrize("name", ROWS)
def test_bad_input(env, tmp_path, name):
    module, arguments, prefix, message, *needs_user = ROWS[name]
    if needs_user and AS_ROOT:
        pytest.skip("running as root: modes do not stop root")
    out = tmp_path / "out"
    files = dict(env, out=out)
    before = tree(env["root"])
    done = run_forked("-m", module, *fill(arguments, files), timeout=120)
    assert_rejected(done, prefix, message.format(**files))
    assert not out.exists(), "a rejected command created its output"
    assert [p.name for p in tmp_path.iterdir()] == [], "a rejected command left files"
    assert tree(env["root"]) == before, "a rejected command changed or left files"


@pytest.mark.parametrize("module, arguments", [
    ("defenses.asft", ["--base", "{model}", "--", *LOOP]),
    ("defenses.sap", ["--triples", "{triples}", "--", *LOOP]),
    ("defenses.safetylock", BUILD),
    ("defenses.safetylock", APPLY)])
def test_the_rows_start_from_good_commands(env, tmp_path, module, arguments):
    """Without its defect each row's command succeeds, so the rows fail for the reason they name."""
    out = tmp_path / "out"
    out.mkdir()
    done = run_forked("-m", module, *fill(arguments, dict(env, out=out)), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    produced = {p.name for p in out.iterdir()}
    assert produced & {"sink_report.json", "lock.st", "locked"}, produced
    if "lock.st" in produced:
        from defenses import safetylock
        assert torch.isfinite(next(iter(safetylock.load_lock(out / "lock.st")["displacements"].values()))).all()


@pytest.mark.parametrize("module", ["defenses.asft", "defenses.sap", "defenses.safetylock"])
def test_help_states_the_exit_codes(module):
    done = run_forked("-m", module, "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "2 bad input (one line on stderr, nothing written)" in text and "130 interrupted" in text
