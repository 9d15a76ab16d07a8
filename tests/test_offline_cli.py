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


BAD_FLAGS = [(["--out", "/dev/null"], "--out /dev/null: is a character device, expected a folder"),
             (["--out", "{file}"], "is a file, expected a folder"),
             (["--out", ""], "--out is empty"), (["--cache-dir", ""], "--cache-dir is empty"),
             (["--cache-dir", "{file}"], "is a file, expected a folder"),
             (["--seed", "-1"], "--seed must be in [0, 2^63)"), (["--seed", str(2**63)], "--seed must be in"),
             (["--n-train", "0"], "--n-train must be between"), (["--n-train", str(10**12)], "--n-train must be"),
             (["--poison-ratios", "0.1", "1.5"], "--poison-ratios must be fractions in [0, 1], got 1.5"),
             (["--poison-ratios", "nan"], "got nan"), (["--poison-ratios", "-0.1"], "got -0.1")]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) or "empty" for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_before_anything_is_built(tmp_path, capsys, monkeypatch, flags, message):
    """Each refused before a split is built (build_splits is never called) and nothing is written."""
    import offline.cli
    (tmp_path / "file").write_text("x")
    import offline.files
    for module in (offline.cli, offline.files):
        monkeypatch.setattr(module, "build_splits", lambda seed: pytest.fail("built a split"))
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    flags = [f.format(file=tmp_path / "file") for f in flags]
    assert offline.main(["--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m offline: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_every_flag_abbreviated_is_refused(capsys):
    for flag in ("--out", "--cache-dir", "--seed", "--n-train", "--poison-ratios", "--model"):
        with pytest.raises(SystemExit) as stop:
            offline.main([flag[:-1], "1"])
        assert stop.value.code == 2 and f"unrecognized arguments: {flag[:-1]}" in capsys.readouterr().err
