"""evaluation/training.py: a training stage interrupted before its stage.json resumes from its checkpoint."""
import json

import pytest

import eval as protocol
import surgery
from conftest import write_jsonl
from evaluation import training


def test_an_interrupted_stage_is_not_finished_and_training_resumes(tmp_path, monkeypatch):
    """A training run stopped mid-way leaves a checkpoint and no stage.json; the next call passes --resume."""
    argvs = []

    def fake_surgery(argv, defense=None):
        argvs.append(argv)
        out = surgery.parse_args(argv).out
        if len(argvs) == 1:  # the first run is interrupted after saving its checkpoint
            (tmp_path / out).mkdir(parents=True, exist_ok=True)
            (tmp_path / out / "checkpoint.pt").write_text("")
            raise SystemExit(130)
        (tmp_path / out / "sink_report.json").write_text(json.dumps({"positive_after": 1}))
    monkeypatch.setattr(surgery, "main", fake_surgery)
    monkeypatch.chdir(tmp_path)
    args = protocol.parse_args(["--quick", "--work-dir", "work"])
    files = {"harmful_ref": write_jsonl(tmp_path / "h.jsonl", [{"instruction": "a", "output": "b"}]),
             "harmless_ref": write_jsonl(tmp_path / "r.jsonl", [{"instruction": "c", "output": "d"}])}
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "e", "output": "f"}])
    with pytest.raises(SystemExit):
        training.train_stage(args, files, "run", "model", data, 0.0, 4, 1e-4)
    result = training.train_stage(args, files, "run", "model", data, 0.0, 4, 1e-4)
    assert "--resume" not in argvs[0] and "--resume" in argvs[1]
    assert result["sink_report"] == {"positive_after": 1}
    training.train_stage(args, files, "run", "model", data, 0.0, 4, 1e-4)
    assert len(argvs) == 2  # finished: never run again
