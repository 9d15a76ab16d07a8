"""offline.cli, run as `python -m offline`: the command line writes every split, deterministically per seed."""
import subprocess
import sys

import pytest

import offline
from conftest import ROOT


def test_command_line_is_deterministic_per_seed(tmp_path):
    def run(out, seed):
        done = subprocess.run([sys.executable, "-m", "offline", "--out", str(out), "--seed", str(seed),
                               "--poison-ratios", "0.1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return {path.name: path.read_bytes() for path in sorted(out.iterdir())}, done.stdout
    first, stdout = run(tmp_path / "a", 0)
    again, _ = run(tmp_path / "b", 0)
    other, _ = run(tmp_path / "c", 1)
    assert first == again
    assert {"train_p0.1_n200.jsonl", "harmful_ref.jsonl", "harmless_ref.jsonl", "align.jsonl", "align_benign.jsonl",
            "eval_harmful.jsonl", "eval_harmful_dev.jsonl", "eval_task.jsonl", "eval_benign.jsonl", "eval_benign_dev.jsonl",
            "harmful_probe.jsonl", "harmless_probe.jsonl", "judge_train.jsonl", "judge_test.jsonl"} == set(first)
    assert first["train_p0.1_n200.jsonl"] != other["train_p0.1_n200.jsonl"]
    assert str(tmp_path / "a" / "eval_task.jsonl") in stdout
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        offline.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--cache-dir", "--seed", "--n-train", "--poison-ratios", "--model"):
        assert flag in text
