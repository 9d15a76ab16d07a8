"""evaluation/stages.py: the stage cache."""
import json

from evaluation import stages


def test_cache_skips_a_finished_stage_and_reruns_a_changed_one(tmp_path):
    calls = []

    def compute(folder):
        calls.append(folder)
        (folder / "artifact.txt").write_text("done")
        return {"value": len(calls)}
    first = stages.cached_stage(tmp_path, "stage", {"x": 1}, compute)
    again = stages.cached_stage(tmp_path, "stage", {"x": 1}, compute)
    changed = stages.cached_stage(tmp_path, "stage", {"x": 2}, compute)
    assert len(calls) == 2 and first == again and first["value"] == 1 and changed["value"] == 2
    assert calls[0] != calls[1]
    assert json.loads((calls[0] / "config.json").read_text()) == {"x": 1}
