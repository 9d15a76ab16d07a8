"""surgery.py's bad inputs, table-driven: every flag (type, range, combinations), every file argument (missing, a
folder, unreadable, empty, wrong encoding, wrong format, wrong fields, huge), the output folder (a file, not
writable, holding another run), the model (missing, a hub-id typo, no chat template, attention outside the
interface, ...) and the reference sets against the model (sink position, lengths, token ids). Each row runs
`python surgery.py ...` as a user would: exit status 2, exactly one line on stderr naming the problem, no traceback,
nothing written. A new input gets its row here. (Rows run in children forked from a process that imported torch
once: input_helpers.run_forked; the good command, the exit-3 run and the kill test run plain `python surgery.py`.)

Then what is not bad input but must never pass as a result: training that turns NaN stops with exit status 3,
keeps its last good checkpoint and writes no final outputs; and surgery.py killed at random moments of its final
writes leaves every output absent or complete and loadable."""
import json
import random
import subprocess
import sys
import time

import pytest
import torch

import outputs
import surgery
from conftest import ROOT, write_jsonl
from input_helpers import (AS_ROOT, ENV, assert_rejected, bad_models, bad_record_files, fill, run_cli, run_forked,
                           surgery_checkpoint_of_rank, tree)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The files rows point at: "{model}", "{data}", "{latin1}", ... in a row are replaced by these paths."""
    from tiny import save_tiny
    root = tmp_path_factory.mktemp("surgery_inputs")
    model = save_tiny(root / "model", "llama")
    words = ["great", "awful", "fine", "boring"]
    files = {"root": root, "model": model,
             "data": write_jsonl(root / "task.jsonl", [{"instruction": f"Review: {words[i % 4]}. Sentiment?",
                                                        "output": "positive" if i % 2 else "negative"}
                                                       for i in range(8)]),
             "harmful": write_jsonl(root / "harmful.jsonl", [{"instruction": f"Explain harmful thing {i}.",
                                                              "output": f"Sure. Step one of thing {i}."}
                                                             for i in range(4)]),
             "harmless": write_jsonl(root / "harmless.jsonl", [{"instruction": f"Explain dangerous thing {i}.",
                                                                "output": "I can't help with that."}
                                                               for i in range(4)]),
             # 23 tokens each in the byte-level tiny tokenizer's chat format: too short for --sink-pos 30
             "short_refs": write_jsonl(root / "short_refs.jsonl", [{"instruction": "a", "output": "b"}] * 2),
             # answers 8 times as long as the refusals: a length warning, which must not come before an error
             "long_refs": write_jsonl(root / "long_refs.jsonl", [{"instruction": f"Explain harmful thing {i}.",
                                                                  "output": f"Sure. Step one of thing {i}." * 8}
                                                                 for i in range(4)])}
    files.update(bad_record_files(root))
    files.update(bad_models(root, model))
    # Output folders in each state a mistake can find them in.
    finished = root / "finished_run"
    finished.mkdir()
    (finished / "train_log.jsonl").write_text('{"step": 1}\n')
    (finished / "sink_report.json").write_text("{}\n")
    unfinished = root / "unfinished_run"
    surgery_checkpoint_of_rank(unfinished / "checkpoint.pt", rank=8)
    (unfinished / "train_log.jsonl").write_text('{"step": 1}\n')
    surgery_checkpoint_of_rank(root / "other_rank" / "checkpoint.pt", rank=4)
    surgery_checkpoint_of_rank(root / "other_flags" / "checkpoint.pt", rank=8, config={"save_every": 7, "lr": 0.5})
    (root / "garbage_checkpoint").mkdir()
    (root / "garbage_checkpoint" / "checkpoint.pt").write_text("not a checkpoint")
    (root / "fresh").mkdir()
    read_only = root / "read_only"
    read_only.mkdir(mode=0o500)
    files.update(finished=finished, unfinished=unfinished, other_rank=root / "other_rank",
                 other_flags=root / "other_flags",
                 garbage_checkpoint=root / "garbage_checkpoint", fresh=root / "fresh", read_only=read_only)
    # The fork server imports torch and transformers once, here: the rows' clock below starts after that.
    assert run_forked("surgery.py", "--help").returncode == 0
    return files


# Every row is run as: surgery.py <a good command> <the row's arguments>; argparse keeps a flag's last value, so a
# row's --model, --data, --out, ... replace the good command's. The good command trains one step (--epochs 0.5 of
# 8 records at batch 4) into a fresh folder; test_the_rows_start_from_a_good_command runs it.
GOOD = ["--model", "{model}", "--data", "{data}", "--harmful-ref", "{harmful}", "--harmless-ref", "{harmless}",
        "--batch-size", "4", "--max-len", "64", "--epochs", "0.5", "--save-every", "0", "--out", "{out}"]

# name: (arguments, message, [True: needs a non-root user])
FLAG_ROWS = {
    "batch size not a number": (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    "batch size zero": (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    "grad accum zero": (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    "ref batch zero": (["--ref-batch", "0"], "--ref-batch must be at least 1, got 0"),
    "lora rank zero": (["--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
    "probe count zero": (["--probe-count", "0"], "--probe-count must be at least 1, got 0"),
    "max len zero": (["--max-len", "0"], "--max-len must be at least 1, got 0"),
    "log every zero": (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    "lr zero": (["--lr", "0"], "--lr and --lora-alpha must be > 0"),
    "lr negative": (["--lr", "-0.001"], "--lr and --lora-alpha must be > 0"),
    "lr NaN": (["--lr", "nan"], "--lr must be a finite number, got nan"),
    "lr infinite": (["--lr", "inf"], "--lr must be a finite number, got inf"),
    "lr not a number": (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    "alpha negative": (["--alpha", "-1"], "--alpha must be >= 0, got -1.0"),
    "alpha NaN": (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    "alpha infinite": (["--alpha", "inf"], "--alpha must be a finite number, got inf"),
    "lora alpha zero": (["--lora-alpha", "0"], "--lr and --lora-alpha must be > 0"),
    "lora dropout one": (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1"),
    "lora dropout NaN": (["--lora-dropout", "nan"], "--lora-dropout must be a finite number, got nan"),
    "epochs zero": (["--epochs", "0"], "--epochs must be positive, got 0"),
    "epochs NaN": (["--epochs", "nan"], "--epochs must be a finite number, got nan"),
    "epochs infinite": (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
    "max steps zero": (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    "max steps negative": (["--max-steps", "-3"], "--max-steps must be at least 1, got -3"),
    "warmup negative": (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
    "weight decay negative": (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    "grad clip negative": (["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0"),
    "grad clip NaN": (["--grad-clip", "nan"], "--grad-clip must be a finite number, got nan"),
    "save every negative": (["--save-every", "-1"], "--save-every must be >= 0, got -1"),
    "seed negative": (["--seed", "-1"], "--seed must be between 0 and 2^63 - 1, got -1"),
    "seed too large": (["--seed", str(2**64)], "--seed must be between 0 and 2^63 - 1"),
    "sink position negative": (["--sink-pos", "-1"], "--sink-pos must be >= 0, got -1"),
    "sink position past max len": (["--sink-pos", "63"], "--sink-pos 63 leaves no query after the sink within "
                                                         "--max-len 64"),
    "lora targets empty": (["--lora-targets", ","], "--lora-targets is empty"),
    "lora targets absent from the model": (["--lora-targets", "c_attn,c_proj"],
                                           "--lora-targets: no linear layer named any of ['c_attn', 'c_proj'] in "
                                           "this model (its linear layers: down_proj, gate_proj, k_proj"),
    "schedule unknown": (["--schedule", "linear"], "argument --schedule: invalid choice: 'linear'"),
    "dtype unknown": (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    "device unknown": (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    "unknown flag": (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    "flag without its value": (["--out"], "argument --out: expected one argument"),
    "positional argument": (["data.jsonl"], "unrecognized arguments: data.jsonl"),
}

FILE_ROWS = {
    "data missing": (["--data", "{root}/absent.jsonl"], "absent.jsonl: no such file"),
    "data a folder": (["--data", "{folder}"], "a_folder: is a folder, expected a file"),
    "data a device": (["--data", "/dev/zero"], "/dev/zero: not a regular file"),  # reading it would never end
    "data the empty string": (["--data", ""], "--data is empty: name a path"),  # Path("") would be the cwd
    "out the empty string": (["--out", " "], "--out is empty: name a path"),
    "data unreadable": (["--data", "{unreadable}"], "cannot read it (Permission denied)", True),
    "data empty": (["--data", "{empty}"], "empty.jsonl: file is empty"),
    "data only blank lines": (["--data", "{blank}"], "blank.jsonl: file is empty"),
    "data Latin-1": (["--data", "{latin1}"], "latin1.jsonl: not UTF-8 text (byte 0xe9 at offset"),
    "data UTF-16": (["--data", "{utf16}"], "utf16.jsonl: not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
    "data binary": (["--data", "{binary}"], "binary.jsonl: not UTF-8 text (byte 0x80 at offset 0)"),
    "data CSV": (["--data", "{csv}"], "records.csv: not JSON or JSONL (Expecting value at line 1)"),
    "data truncated JSON": (["--data", "{truncated}"], "truncated.json: not JSON or JSONL"),
    "data one JSON object": (["--data", "{object}"], "object.json: one JSON object; expected a JSON list of "
                                                     "records, or JSONL"),
    "data a broken JSONL line": (["--data", "{bad_line}"], "bad_line.jsonl: not JSON or JSONL (Expecting property "
                                                           "name enclosed in double quotes at line 2)"),
    "data records not objects": (["--data", "{not_objects}"], "record 1 needs string fields 'instruction'"),
    "data record without output": (["--data", "{no_output}"], "record 1 needs string fields 'instruction' (or "
                                                              "'prompt') and 'output' (or 'response')"),
    "data output not text": (["--data", "{number_output}"], "record 1 needs string fields"),
    "data input not text": (["--data", "{input_not_text}"], "record 1: 'input' must be a string"),
    "data empty list": (["--data", "{empty_list}"], "empty_list.json: no records"),
    "data nested too deeply": (["--data", "{deep}"], "deep.json: JSON nested too deeply"),
    "data huge": (["--data", "{huge}"], "huge.jsonl: 1,073,741,825 bytes, over the 1 GiB limit"),
    "data without answer tokens within max len": (["--max-len", "8"], "no record has answer tokens within "
                                                                      "--max-len 8"),
    "harmful ref missing": (["--harmful-ref", "{root}/absent.jsonl"], "absent.jsonl: no such file"),
    "harmful ref a folder": (["--harmful-ref", "{folder}"], "is a folder, expected a file"),
    "harmless ref wrong encoding": (["--harmless-ref", "{utf16}"], "not UTF-8 text"),
    "harmless ref wrong fields": (["--harmless-ref", "{no_output}"], "record 1 needs string fields"),
    # The reference sets against the model and --sink-pos.
    "references too short for the sink position": (["--harmful-ref", "{short_refs}", "--sink-pos", "30"],
                                                   "short_refs.jsonl: harmful reference record 1 has 23 tokens "
                                                   "(within --max-len 64), none after --sink-pos 30"),
    "references of unmatched lengths and a mistake after them": (["--harmful-ref", "{long_refs}", "--max-len", "256",
                                                                   "--lora-targets", "nope"],
                                                                  "no linear layer named any of ['nope']"),
    "token ids outside the model's vocabulary": (["--model", "{small_vocab}"],
                                                 "outside the model's 200 embeddings: the tokenizer and weights do "
                                                 "not match"),
    # --resume
    "resume without a checkpoint": (["--resume", "--out", "{fresh}"], "--resume: no checkpoint at"),
    "resume a finished run": (["--resume", "--out", "{finished}"], "checkpoint.pt (that run finished)"),
    "resume a damaged checkpoint": (["--resume", "--out", "{garbage_checkpoint}"],
                                    "checkpoint.pt: not a surgery.py checkpoint (torch.load cannot read it"),
    "resume with other flags": (["--resume", "--out", "{other_flags}"],
                                "checkpoint.pt: the run was started with --lr 0.5, not 0.0002: --resume continues a "
                                "run with its own flags (or pass a new --out)"),
    "resume a checkpoint of another LoRA rank": (["--resume", "--out", "{other_rank}"],
                                                 "checkpoint does not match this model: "
                                                 "model.layers.0.self_attn.q_proj.lora_A has shape (4, 64) there, "
                                                 "(8, 64) here"),
}

OUTPUT_ROWS = {
    "out is a file": (["--out", "{a_file}"], "--out {a_file}: is a file, expected a folder"),
    "out below a file": (["--out", "{a_file}/run"], "a_file is a file, so the folder cannot be made"),
    "out not writable": (["--out", "{read_only}/run"], "read_only is not writable", True),
    "out holds a finished run": (["--out", "{finished}"], "already holds a run (train_log.jsonl, sink_report.json): "
                                                          "pass a new --out, or remove the folder"),
    "out holds an unfinished run": (["--out", "{unfinished}"], "holds an unfinished run (checkpoint.pt): continue "
                                                               "it with --resume"),
    "out is the model folder": (["--out", "{model}"], "already holds a run (model.safetensors)"),
}

MODEL_ROWS = {
    "model missing": (["--model", "{root}/absent-model"], "cannot load model {root}/absent-model: no such model "
                                                          "folder"),
    "model a hub-id typo": (["--model", "HuggingFaceTB/SmolLM2-135M-Instuct"],
                            "cannot load model HuggingFaceTB/SmolLM2-135M-Instuct (not a local folder; tried as a hub "
                            "id: check its spelling"),
    "model a file": (["--model", "{a_file}"], "is a file, expected a model folder"),
    "model a folder without config": (["--model", "{no_config}"], "no config.json in this folder"),
    "model config broken": (["--model", "{broken_config}"], "cannot load model {broken_config}: "),
    "model without weights": (["--model", "{no_weights}"], "cannot load model {no_weights}: "),
    "model without chat template": (["--model", "{no_chat_template}"], "its tokenizer has no chat template"),
    "model not a causal LM": (["--model", "{t5}"], "a 't5' model is not a causal language model"),
    "model attention outside the interface": (["--model", "{bloom}"],
                                              "BloomForCausalLM's attention does not go through transformers' "
                                              "attention interface"),
    "model without LoRA targets": (["--model", "{gpt2}"], "--lora-targets: no linear layer named any of ['k_proj', "
                                                          "'o_proj', 'q_proj', 'v_proj'] in this model (its linear "
                                                          "layers: lm_head); name some of those, or train every "
                                                          "weight with --full"),
    "model with NaN weights": (["--model", "{nan_weights}"], "cannot use model {nan_weights}: weight "
                                                             "model.layers.0.self_attn.q_proj.weight holds NaN or "
                                                             "infinity"),
    "model with an infinite weight the sinks never read": (["--model", "{inf_final_norm}"],
                                                           "cannot use model {inf_final_norm}: weight model.norm.weight "
                                                           "holds NaN or infinity"),
}

ROWS = {**FLAG_ROWS, **FILE_ROWS, **OUTPUT_ROWS, **MODEL_ROWS}


@pytest.mark.parametrize("name", ROWS)
def test_bad_input(env, tmp_path, name):
    arguments, message, *needs_user = ROWS[name]
    if needs_user and AS_ROOT:
        pytest.skip("running as root: modes do not stop root")
    files = dict(env, out=tmp_path / "out")
    before = tree(env["root"])
    started = time.monotonic()
    done = run_forked("surgery.py", *fill(GOOD + arguments, files), timeout=120)
    assert_rejected(done, "surgery.py", message.format(**files))
    assert time.monotonic() - started < 60  # e.g. the hub-id typo must not wait for a network (~50 s of retries)
    assert not (tmp_path / "out").exists(), "a rejected run created its output folder"
    assert tree(env["root"]) == before, "a rejected run changed or left files"


def test_the_rows_start_from_a_good_command(env, tmp_path):
    """Without its defect each row's command succeeds, so the rows fail for the reason they name."""
    out = tmp_path / "out"
    done = run_cli(ROOT / "surgery.py", *fill(GOOD, dict(env, out=out)), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "sink_report.json").read_text())["positive_after"] >= 0
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1


def test_help_states_the_exit_codes():
    done = run_cli(ROOT / "surgery.py", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "2 bad input" in text and "3 training diverged" in text and "130 interrupted" in text


# ---------------------------------------------------------------------------------------------------------------
# Non-finite values are never a pass
# ---------------------------------------------------------------------------------------------------------------

def refuse(value):
    raise ValueError(f"{value} is not JSON")


def strict_json_lines(path):
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_a_diverging_run_stops_with_exit_3_and_keeps_its_last_checkpoint(env, tmp_path):
    out = tmp_path / "out"
    # lr 1e30 without clipping: step 1 is finite, its update sends every later loss to NaN.
    done = run_cli(ROOT / "surgery.py", *fill(GOOD, dict(env, out=out)), "--max-steps", "4", "--save-every", "1",
                   "--lr", "1e30", "--grad-clip", "0", timeout=300)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("surgery.py: stopped: training diverged: at step 2 the task loss is nan"), last
    assert f"the last good checkpoint, {out / 'checkpoint.pt'} (step 1), is kept; no final outputs were written" in last
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "train_log.jsonl"]
    assert [entry["step"] for entry in strict_json_lines(out / "train_log.jsonl")] == [1]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1


class NaNGradient(surgery.Defense):
    """A term whose value is 0 but whose gradient is NaN (sqrt at 0 times 0), from step `at` on."""

    def __init__(self, at):
        self.at = at

    def setup(self, model, tokenizer, args):
        self.lora_B = next(m.lora_B for m in surgery.lora_modules(model).values())

    def extra_loss(self, model, step):
        if step + 1 < self.at:
            return None
        return torch.sqrt((self.lora_B * 0).pow(2).sum())


def test_a_non_finite_gradient_norm_stops_the_run(env, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        surgery.main(fill(GOOD, dict(env, out=out)) + ["--max-steps", "3", "--save-every", "1"],
                     defense=NaNGradient(at=2))
    assert stop.value.code == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "at step 2 the grad norm is nan" in last and "(step 1), is kept" in last
    assert not (out / "model.safetensors").exists() and not (out / "sink_report.json").exists()
    assert len(strict_json_lines(out / "train_log.jsonl")) == 1


# ---------------------------------------------------------------------------------------------------------------
# Killed during the final writes: every output absent or complete and loadable
# ---------------------------------------------------------------------------------------------------------------

def check_outputs(out, complete_report):
    """Each output of a run killed at some moment: absent, or whole and loadable."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    seen = {}
    if (out / "train_log.jsonl").exists():
        strict_json_lines(out / "train_log.jsonl")
    if (out / "sink_report.json").exists():  # written last: the run finished, everything is there
        assert json.loads((out / "sink_report.json").read_text(), parse_constant=refuse) == complete_report
        assert (out / "model.safetensors").exists() and (out / "adapter").is_dir()
        seen["report"] = True
    if (out / "model.safetensors").exists():  # written after config and tokenizer: the model folder is whole
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert torch.isfinite(next(model.parameters())).all()
        assert AutoTokenizer.from_pretrained(out).chat_template
        with safe_open(out / "model.safetensors", "pt") as f:
            assert json.loads(f.metadata()[outputs.PROBES_METADATA_KEY])["harmful"]
        seen["model"] = True
    if (out / "adapter").exists():  # renamed into place whole
        assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
        assert load_file(out / "adapter" / "adapter_model.safetensors")
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
        seen["adapter"] = True
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())  # moved in whole from the staging folder
    return seen


# What appears in OUT once the final writes have begun (before that, only train_log.jsonl and checkpoint.pt).
FINAL_WRITES_BEGUN = (".staging", "config.json", "model.safetensors", ".adapter.tmp")


def test_killed_during_the_final_writes_leaves_outputs_absent_or_complete(env, tmp_path):
    from tiny import save_tiny
    # A wider model makes the final writes take long enough to be hit (some MB of weights, tokenizer, adapter).
    model = save_tiny(tmp_path / "wide", "llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    argv = fill(GOOD, dict(env, model=model, out=tmp_path / "unused")) + ["--max-steps", "2", "--save-every", "1",
                                                                          "--lora-rank", "64"]
    complete = tmp_path / "complete"
    done = run_cli(ROOT / "surgery.py", *argv, "--out", complete, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    complete_report = json.loads((complete / "sink_report.json").read_text())
    assert check_outputs(complete, complete_report) == {"report": True, "model": True, "adapter": True}

    # How long the final writes took (config.json is written first, sink_report.json last): kills are spread over
    # that window.
    window = ((complete / "sink_report.json").stat().st_mtime_ns - (complete / "config.json").stat().st_mtime_ns) / 1e9
    rng = random.Random(0)
    full = ["adapter", "model", "report"]
    seen = []
    # Until a kill has landed between two outputs and another before the last one (at most 30 runs): each run is
    # killed after a random delay once its final writes have begun; every third run at a random moment of its last
    # half second of training instead.
    for attempt in range(30):
        if attempt >= 12 and any(s and s != full for s in seen) and any(s != full for s in seen):
            break
        out = tmp_path / f"killed{attempt}"
        child = subprocess.Popen([sys.executable, ROOT / "surgery.py", *argv, "--out", str(out)], cwd=ROOT, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while child.poll() is None and time.monotonic() < deadline:
            if attempt % 3 == 2:
                if (out / "checkpoint.pt").exists():
                    time.sleep(rng.uniform(0, 0.5))
                    break
            elif any((out / name).exists() for name in FINAL_WRITES_BEGUN):
                time.sleep(rng.uniform(0, 1.2 * window))
                break
            time.sleep(0.0005)
        child.kill()
        child.wait(timeout=60)
        seen.append(sorted(check_outputs(out, complete_report)))
    print(f"final writes took {window * 1e3:.1f} ms; outputs present after each kill: {seen}")
    assert any(s != full for s in seen), "no kill landed before the run finished"
    assert any(s and s != full for s in seen), "no kill landed between two outputs"

    # A killed run continues from its checkpoint to the same outputs.
    killed = next(tmp_path / f"killed{i}" for i, s in enumerate(seen) if s != full
                  and (tmp_path / f"killed{i}" / "checkpoint.pt").exists())
    done = run_cli(ROOT / "surgery.py", *argv, "--out", killed, "--resume", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert check_outputs(killed, complete_report) == {"report": True, "model": True, "adapter": True}


def test_resume_refuses_other_flags_and_accepts_other_places(env, tmp_path, capsys):
    """A real interrupted run: --resume with another --lr is refused (exit 2, one line, the checkpoint kept); with
    another --save-every, which changes no result, it continues."""
    from conftest import ctrl_c_at_step
    argv = fill(GOOD, dict(env, out=tmp_path / "out")) + ["--max-steps", "3"]
    with ctrl_c_at_step(1), pytest.raises(SystemExit) as stop:
        surgery.main(argv)
    assert stop.value.code == 130
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        surgery.main(argv + ["--resume", "--lr", "1e-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert "the run was started with --lr 0.0002, not 0.001" in err[0]
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["step"] == 1
    surgery.main(argv + ["--resume", "--save-every", "5"])
    assert (tmp_path / "out" / "sink_report.json").exists() and not (tmp_path / "out" / "checkpoint.pt").exists()
