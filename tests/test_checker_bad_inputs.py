"""sinkcheck's bad inputs, table-driven: every flag (type, range), every file argument (missing, a folder where a
file is expected and the reverse, unreadable, empty, wrong encoding, wrong format), the --json target, and bad
probes. Each row: exit status 2, exactly one line on stderr naming the problem, no traceback, no output file.
Then sinkcheck killed at random moments around its --json write: the output is absent or complete."""
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from checker_helpers import SINKCHECK, run_cli, save_checker_model, write_probes

AS_ROOT = os.geteuid() == 0  # root reads files whatever their mode: the unreadable rows cannot be made


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Files the rows point at. {root}, {model}, {probes}, ... in a row's arguments are replaced by these."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = save_checker_model(root / "model", "llama", seed=4)
    files = {"root": root, "model": model, "weights": model / "model.safetensors",
             "probes": write_probes(root / "probes.json", [[257, 1, 2, 3, 4]], [[257, 5, 6, 7, 8]])}

    def text(name, content, mode=None):
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        if mode is not None:
            path.chmod(mode)
        files[name.replace(".", "_")] = path

    text("empty.json", "")
    text("empty.safetensors", b"")
    text("unreadable.json", json.dumps({"harmful": [[257, 1, 2]], "harmless": [[257, 3, 4]]}), mode=0)
    text("utf16.jsonl", json.dumps({"instruction": "a", "output": "b", "harmful": True}).encode("utf-16"))
    text("csv.txt", "instruction,output,harmful\nhow,no,true\n")
    text("binary.json", files["weights"].read_bytes()[:4096])
    text("hello.safetensors", "hello, this is not a safetensors file\n")
    text("plain.txt", "just a file\n")
    for name, obj in {
        "ids_too_big.json": {"harmful": [[257, 5000]], "harmless": [[257, 1]]},
        "ids_negative.json": {"harmful": [[257, -1]], "harmless": [[257, 1]]},
        "ids_huge.json": {"harmful": [[257, 2**31]], "harmless": [[257, 1]]},
        "ids_float.json": {"harmful": [[257, 1.5]], "harmless": [[257, 1]]},
        "empty_harmful.json": {"harmful": [], "harmless": [[257, 1, 2]]},
        "empty_harmless.json": {"harmful": [[257, 1, 2]], "harmless": []},
        "empty_sequences.json": {"harmful": [[]], "harmless": [[257, 1, 2]]},
        "sink_too_large.json": {"sink_position": 1000, "harmful": [[257, 1, 2]], "harmless": [[257, 1, 2]]},
        "sink_past_int32.json": {"sink_position": 2**40, "harmful": [[257, 1, 2]], "harmless": [[257, 1, 2]]},
        "sink_negative.json": {"sink_position": -1, "harmful": [[257, 1, 2]], "harmless": [[257, 1, 2]]},
        "sink_string.json": {"sink_position": "0", "harmful": [[257, 1, 2]], "harmless": [[257, 1, 2]]},
    }.items():
        text(name, json.dumps(obj))
    text("missing_fields.jsonl", json.dumps({"instruction": "a", "harmful": True}) + "\n")
    text("input_not_text.jsonl", json.dumps({"instruction": "a", "output": "b", "input": 5, "harmful": True}) + "\n")

    # Model folders broken in one file each.
    def model_variant(name, change):
        folder = root / name
        folder.mkdir()
        for item in model.iterdir():
            (folder / item.name).write_bytes(item.read_bytes())
        change(folder)
        files[name] = folder

    def config_folder(folder):
        (folder / "config.json").unlink()
        (folder / "config.json").mkdir()

    model_variant("config_is_folder", config_folder)
    model_variant("config_empty", lambda f: (f / "config.json").write_text(""))
    model_variant("config_latin1", lambda f: (f / "config.json").write_bytes(
        (f / "config.json").read_text().replace('"llama"', '"llama\xe9"').encode("latin-1")))
    model_variant("config_unreadable", lambda f: (f / "config.json").chmod(0))
    model_variant("weights_unreadable", lambda f: (f / "model.safetensors").chmod(0))
    model_variant("index_empty", lambda f: (f / "model.safetensors.index.json").write_text(""))
    model_variant("index_is_folder", lambda f: (f / "model.safetensors.index.json").mkdir())
    model_variant("no_weights", lambda f: (f / "model.safetensors").unlink())
    text("a_file", "x")
    return files


# name: (arguments, message, needs a non-root user). The model, probes and --json are added unless the row names
# them: "{model}" etc. are paths from the env fixture.
FLAG_ROWS = {
    "threads not a number": (["--threads", "two"], "argument --threads: invalid int value: 'two'"),
    "threads negative": (["--threads", "-1"], "--threads must be between 0 and 1024, got -1"),
    "threads too many": (["--threads", "100000"], "--threads must be between 0 and 1024, got 100000"),
    "top zero": (["--top", "0"], "--top must be at least 1, got 0"),
    "top negative": (["--top", "-3"], "--top must be at least 1, got -3"),
    "top not a number": (["--top", "ten"], "argument --top: invalid int value: 'ten'"),
    "max-positive negative": (["--max-positive", "-1"], "--max-positive must be between 0 and 2147483647, got -1"),
    "max-positive fractional": (["--max-positive", "1.5"], "argument --max-positive: invalid int value: '1.5'"),
    "max-positive huge": (["--max-positive", str(2**40)], "--max-positive must be between 0 and 2147483647"),
    "unknown flag": (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    "flag without its value": (["--probes"], "argument --probes: expected one argument"),
}

FILE_ROWS = {
    # PATH
    "PATH missing": (["{root}/nowhere"], "no such file or folder: "),
    "PATH a folder without weights": (["{no_weights}"], "no .safetensors files in folder"),
    "PATH a file used as a folder": (["{weights}/model.safetensors"], "no such file or folder: "),
    "PATH empty": (["{empty_safetensors}"], "is too short for a safetensors header"),
    "PATH wrong format": (["{hello_safetensors}"], "exceeds the 100 MB limit"),
    "PATH a JSON that is not an index": (["{probes}"], "no weight_map object"),
    "PATH unreadable": (["{weights_unreadable}"], "Permission denied", True),
    "index empty": (["{index_empty}"], "unexpected end of JSON at byte 0"),
    "index a folder": (["{index_is_folder}"], "is not a regular file"),
    "config.json a folder": (["{config_is_folder}"], "config.json is not a regular file"),
    "config.json empty": (["{config_empty}"], "config.json: unexpected end of JSON at byte 0"),
    "config.json wrong encoding": (["{config_latin1}"], "invalid UTF-8"),
    "config.json unreadable": (["{config_unreadable}"], "Permission denied", True),
    # --probes
    "probes missing": (["--probes", "{root}/absent.json"], "cannot read probes file"),
    "probes a folder": (["--probes", "{root}"], "Is a directory"),
    "probes unreadable": (["--probes", "{unreadable_json}"], "Permission denied", True),
    "probes empty": (["--probes", "{empty_json}"], "probes file is empty"),
    "probes wrong encoding": (["--probes", "{utf16_jsonl}"], "'utf-8' codec can't decode"),
    "probes binary": (["--probes", "{binary_json}"], "cannot read probes file"),
    "probes CSV": (["--probes", "{csv_txt}"], "line 1 is not JSON"),
    "probes records missing fields": (["--probes", "{missing_fields_jsonl}"], "line 1 needs string fields"),
    "probes record input not text": (["--probes", "{input_not_text_jsonl}"], "line 1: 'input' must be a string"),
    # --compare
    "compare missing": (["--compare", "{root}/nowhere"], "no such file or folder: "),
    "compare wrong format": (["--compare", "{hello_safetensors}"], "exceeds the 100 MB limit"),
    # --json
    "json folder missing": (["--json", "{root}/no_such_dir/out.json"], "does not exist"),
    "json folder is a file": (["--json", "{a_file}/out.json"], "is not a folder"),
    "json is a folder": (["--json", "{root}"], "is a folder, expected a file name"),
}

PROBE_ROWS = {
    "token id outside the vocabulary": ("{ids_too_big_json}",
                                        "probe token id 5000 in harmful sequence 0 is outside the vocabulary of 259"),
    "negative token id": ("{ids_negative_json}", "'harmful' sequence 0 is not a list of non-negative token ids"),
    "token id past int32": ("{ids_huge_json}", "'harmful' sequence 0 is not a list of non-negative token ids"),
    "fractional token id": ("{ids_float_json}", "'harmful' sequence 0 is not a list of non-negative token ids"),
    "empty harmful list": ("{empty_harmful_json}", "'harmful' must be a non-empty list of token id lists"),
    "empty harmless list": ("{empty_harmless_json}", "'harmless' must be a non-empty list of token id lists"),
    "only empty sequences": ("{empty_sequences_json}",
                             "no probes: the harmful set has no sequence longer than sink position 0 + 1"),
    "sink position past every sequence": ("{sink_too_large_json}",
                                          "no probes: the harmful set has no sequence longer than sink position 1000"),
    "sink position past int32": ("{sink_past_int32_json}", "'sink_position' must be a non-negative integer up to"),
    "sink position negative": ("{sink_negative_json}", "'sink_position' must be a non-negative integer"),
    "sink position a string": ("{sink_string_json}", "'sink_position' must be a non-negative integer"),
}


def fill(arguments, env):
    return [a.format(**env) for a in arguments]


def assert_rejected(done, message, out_dir):
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sinkcheck: error: ") and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == "", done.stdout
    assert list(out_dir.iterdir()) == [], "an output file (or its temporary) was left behind"


def command_for(row_args, env):
    """The full argument list: the row's, plus the model, the probes and a --json target where it names none."""
    args = list(row_args)
    first_is_path = bool(args) and not args[0].startswith("--")
    if not first_is_path:
        args = ["{model}"] + args
    if "--probes" not in args:
        args += ["--probes", "{probes}"]
    return fill(args, env)


@pytest.mark.parametrize("name", list(FLAG_ROWS) + list(FILE_ROWS))
def test_bad_argument(env, tmp_path, name):
    row = FLAG_ROWS.get(name) or FILE_ROWS[name]
    arguments, message = row[0], row[1]
    if len(row) > 2 and row[2] and AS_ROOT:
        pytest.skip("running as root: files with mode 000 are still readable")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = command_for(arguments, env)
    if "--json" not in arguments:
        args += ["--json", str(out_dir / "report.json")]
    assert_rejected(run_cli(*args), message, out_dir)


@pytest.mark.parametrize("name", PROBE_ROWS)
def test_bad_probes(env, tmp_path, name):
    probes, message = PROBE_ROWS[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    done = run_cli(env["model"], "--probes", probes.format(**env), "--json", out_dir / "report.json")
    assert_rejected(done, message, out_dir)


def test_no_arguments():
    done = run_cli()
    assert done.returncode == 2 and "the following arguments are required: PATH" in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_the_rows_start_from_a_good_command(env, tmp_path):
    """Without its defect each row's command succeeds, so the rows fail for the reason they name."""
    out = tmp_path / "report.json"
    done = run_cli(*fill(["{model}", "--probes", "{probes}", "--json", str(out), "--top", "1", "--threads", "1",
                          "--max-positive", "100"], env))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["probe_set"] == f"file:{env['probes']}"


# ---------------------------------------------------------------------------------------------------------------
# Killed while writing --json: the file is absent or complete.
# ---------------------------------------------------------------------------------------------------------------

def test_killed_around_the_json_write_leaves_no_partial_file(tmp_path):
    # Many layers and heads make the report large (tens of KB, several write calls and an fsync), and --compare
    # doubles it.
    model = save_checker_model(tmp_path / "wide", "llama", seed=6, num_hidden_layers=48, num_attention_heads=32,
                               num_key_value_heads=2)
    probes = write_probes(tmp_path / "probes.json", [[257, 1, 2, 3, 4, 5]], [[257, 6, 7, 8, 9, 10]])
    out = tmp_path / "report.json"
    args = [SINKCHECK, str(model), "--probes", str(probes), "--compare", str(model), "--threads", "1",
            "--json", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    complete = json.loads(out.read_text())
    assert len(complete["divergence"]) == 48 and len(out.read_bytes()) > 20_000

    rng = random.Random(0)
    outcomes = {"absent": 0, "complete": 0, "killed while the temporary file existed": 0}
    for attempt in range(24):
        out.unlink(missing_ok=True)
        for leftover in tmp_path.glob(".report.json.*.tmp"):
            leftover.unlink()
        kill = signal.SIGKILL if attempt % 2 == 0 else signal.SIGTERM
        child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait for the temporary file (the write has begun), then kill after a random delay of up to 3 ms; every
        # fourth run is killed at a random moment of its whole life instead.
        if attempt % 4 == 3:
            time.sleep(rng.uniform(0, 1.5))
        else:
            deadline = time.monotonic() + 60
            while child.poll() is None and time.monotonic() < deadline:
                if any(tmp_path.glob(".report.json.*.tmp")):
                    time.sleep(rng.uniform(0, 0.003))
                    if any(tmp_path.glob(".report.json.*.tmp")):
                        outcomes["killed while the temporary file existed"] += 1
                    break
        child.send_signal(kill)
        child.wait(timeout=60)
        child.stderr.read()
        child.stderr.close()
        if out.exists():
            assert json.loads(out.read_text()) == complete  # never half a file
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        if kill == signal.SIGTERM and child.returncode != 0:
            # A terminated run unwinds like Ctrl-C and removes its temporary file.
            assert not list(tmp_path.glob(".report.json.*.tmp")), "SIGTERM left a temporary file"
    assert outcomes["absent"] > 0, outcomes
    print(outcomes)


def test_json_writer_is_strict_and_leaves_nothing_on_failure(tmp_path):
    """A NaN can no longer reach the writer (non-finite weights and activations stop the audit), and if one did,
    the writer refuses it rather than writing `NaN`, which is not JSON."""
    from sinkcheck.cli import write_json_atomically
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json_atomically(tmp_path / "report.json", {"divergence": [[0.1, float("nan")]]})
    assert list(tmp_path.iterdir()) == []
    write_json_atomically(tmp_path / "report.json", {"divergence": [[0.1, -0.2]]})
    assert json.loads((tmp_path / "report.json").read_text()) == {"divergence": [[0.1, -0.2]]}
