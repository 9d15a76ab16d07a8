"""evaluation/data.py: the files eval.py actually trains, references and evaluates on, and the check that roles that
must not meet share no instruction."""
import json

import pytest

import eval as protocol
import offline
import surgery
from common import UserError
from conftest import write_jsonl
from evaluation import data


@pytest.mark.parametrize("preset", [[], ["--quick"]])
def test_protocol_files_share_no_instruction(tmp_path, preset):
    args = protocol.parse_args([*preset, "--model", "unused", "--work-dir", str(tmp_path)])
    files = data.resolve_inputs(args)
    assert set(files["train"]) == set(args.poison_ratios) | set(args.defense_ratios) | {args.sweep_ratio}
    assert len(surgery.read_records(files["eval_harmful"])) == args.n_harmful
    assert len(surgery.read_records(files["eval_benign"])) == args.n_benign
    assert len(surgery.read_records(files["eval_task"])) == args.n_task
    roles = {role for role, _, _ in data.role_files(files)}
    assert roles == {"train", "reference", "eval", "judge-train", "judge-test"}
    assert data.shared_instructions(files) == []


def test_a_shared_instruction_is_refused(tmp_path):
    eval_file = offline.eval_data()["eval_harmful"]
    leaked = json.loads(eval_file.read_text().splitlines()[0])["instruction"]
    align = surgery.read_records(offline.eval_data()["align"])
    write_jsonl(tmp_path / "align.jsonl", align + [{"instruction": "  " + leaked.upper(), "output": "No."}])
    args = protocol.parse_args(["--model", "unused", "--work-dir", str(tmp_path), "--align-data",
                                str(tmp_path / "align.jsonl"), "--n-harmful", "413"])
    files = data.resolve_inputs(args)
    with pytest.raises(UserError, match="align and eval_harmful share 1 instruction"):
        data.check_splits(files)
