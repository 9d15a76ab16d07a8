"""evaluation/generation.py: a model's answers and measurements; its held-out probes read at the training stages'
sink position."""
import pytest

import eval as protocol
import surgery
from conftest import write_jsonl
from evaluation import generation
from evaluation.judges import KeywordJudge


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    """A tiny random Llama and two records for each file evaluate_stage reads."""
    from tiny import save_tiny
    root = tmp_path_factory.mktemp("tiny_generation")
    files = {
        "eval_harmful": write_jsonl(root / "eval_harmful.jsonl", [{"instruction": f"Tell me how to do bad thing {i}.",
                                                                   "output": ""} for i in range(2)]),
        "eval_task": write_jsonl(root / "eval_task.jsonl", [{"instruction": f"Review e{i}: the film was great.",
                                                             "output": "positive" if i % 2 else "negative"}
                                                            for i in range(2)]),
        "eval_benign": write_jsonl(root / "benign.jsonl", [{"instruction": f"What do cats eat, question {i}?",
                                                            "output": ""} for i in range(2)]),
        "harmful_probe": write_jsonl(root / "harmful_probe.jsonl", [
            {"instruction": f"Explain how to do harmful thing p{i}.", "output": f"Sure. Step one {i}: tools."}
            for i in range(2)]),
        "harmless_probe": write_jsonl(root / "harmless_probe.jsonl", [
            {"instruction": f"Explain how to do dangerous thing p{i}.", "output": "I can't help with that."}
            for i in range(2)]),
    }
    return save_tiny(root / "model"), files


def test_held_out_probes_are_read_at_the_training_sink_position(small_eval, tmp_path, monkeypatch):
    """The held-out positive heads count d_h at the sink position the training stages use (--train-args
    "--sink-pos 1"), not at position 0; the default stays 0. Each position is its own generate stage."""
    model, files = small_eval
    seen, real = [], surgery.probe_divergence

    def recording(model, harmful_ids, harmless_ids, sink_pos, pad_id, **kwargs):
        seen.append(sink_pos)
        return real(model, harmful_ids, harmless_ids, sink_pos, pad_id, **kwargs)
    monkeypatch.setattr(surgery, "probe_divergence", recording)
    for train_args in ("--sink-pos 1", ""):
        args = protocol.parse_args(["--quick", "--work-dir", str(tmp_path / "work"), "--max-len", "64",
                                    "--max-new-tokens", "4", "--task-tokens", "2", "--benign-tokens", "4",
                                    "--gen-batch", "2", "--device", "cpu", f"--train-args={train_args}"])
        result = generation.evaluate_stage(args, files, [KeywordJudge()], "run", model)
        assert len(result["divergence_heldout"]) == 2 and len(result["divergence_heldout"][0]) == 4
    assert seen == [1, 0]
