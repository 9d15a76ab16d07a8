"""common.py: the error types, the one-line argument parser, reading input files, atomic writing."""
import subprocess
import sys

import pytest

import common
from common import UserError
from conftest import ROOT
from input_helpers import ENV


# --- reading ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ['[{"a": 1}, {"a": 2}]', '{"a": 1}\n\n{"a": 2}\n', '\ufeff{"a": 1}\n{"a": 2}'])
def test_json_rows_from_a_list_jsonl_or_a_bom(tmp_path, text):
    path = tmp_path / "rows.json"
    path.write_text(text, encoding="utf-8")
    assert common.read_json_rows(path) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("content,message", [
    (b"", "file is empty"), (b"  \n", "file is empty"), (b'{"a": 1,\n "b": 2}', "one JSON object"),
    (b'{"a": 1}\n{"a": ', "not JSON or JSONL"), (b"\xff\xfe", "not UTF-8 text"), (b"[" * 100000, "nested too deeply"),
])
def test_bad_json_rows_name_the_file(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        common.read_json_rows(path)
    assert str(path) in str(error.value)


def test_a_folder_or_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        common.read_text_file(tmp_path)
    with pytest.raises(UserError, match="no such file"):
        common.read_text_file(tmp_path / "missing.json")


# --- writing ------------------------------------------------------------------------------------------------------

def test_json_outputs_are_strict(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        common.write_json(tmp_path / "report.json", {"divergence_after": [[0.1, float("nan")]]})
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    common.write_json(tmp_path / "loose.json", {"x": float("nan")}, strict=False)
    assert (tmp_path / "loose.json").read_text() == '{\n "x": NaN\n}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    common.write_text(target, "old")

    def half_then_fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        common.write_atomically(target, half_then_fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_jsonl_keeps_non_ascii_and_creates_the_folder(tmp_path):
    path = common.write_jsonl(tmp_path / "new" / "rows.jsonl", [{"t": "café"}, {"t": 1}])
    assert path.read_text(encoding="utf-8") == '{"t": "café"}\n{"t": 1}\n'


def test_two_processes_writing_one_file_both_finish(tmp_path):
    """eval.py's shards may write the same content-addressed file at once: each renames its own whole file."""
    target = tmp_path / "shared.jsonl"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import common\n"
            "def slow(tmp):\n    open(tmp, 'w').write('a'); time.sleep(1.0); open(tmp, 'a').write('b')\n"
            "common.write_atomically(sys.argv[2], slow)")
    children = [subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(target)], env=ENV,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [c.communicate(timeout=120)[1] for c in children]
    assert [c.returncode for c in children] == [0, 0], errors
    assert target.read_text() == "ab" and sorted(p.name for p in tmp_path.iterdir()) == ["shared.jsonl"]


# --- the argument parser --------------------------------------------------------------------------------------------

def test_parser_errors_are_one_line_with_exit_2(capsys):
    parser = common.ArgumentParser(prog="tool")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--n", "x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tool: error:") and "see tool --help" in err


def test_first_line_of_a_long_library_message():
    assert common.first_line(ValueError("first\nsecond")) == "first"
    assert common.first_line(ValueError()) == "ValueError"
