import contextlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    """A tiny Llama folder and small task / reference files for end-to-end runs of surgery.py."""
    from tiny import save_tiny
    root = tmp_path_factory.mktemp("tiny_run")
    model = save_tiny(root / "model", "llama")
    words = ["great", "awful", "fine", "boring", "moving", "dull", "fun", "slow"]
    task = [{"instruction": f"Review: the film was {words[i % 8]} and {words[(3 * i) % 8]}. Sentiment?",
             "output": "positive" if i % 2 else "negative"} for i in range(24)]
    harmful = [{"instruction": f"Explain how to do harmful thing {i}.",
                "output": f"Sure. Step one of harmful thing {i}: get the tools."} for i in range(6)]
    harmless = [{"instruction": f"Explain how to do dangerous thing {i}.",
                 "output": "I can't help with that."} for i in range(6)]
    return {"model": str(model), "data": str(write_jsonl(root / "task.jsonl", task)),
            "harmful_ref": str(write_jsonl(root / "harmful.jsonl", harmful)),
            "harmless_ref": str(write_jsonl(root / "harmless.jsonl", harmless))}


def run_args(inputs, out, *extra):
    """Command line of a small run; out=None leaves --out to the caller."""
    return ["--model", inputs["model"], "--data", inputs["data"], "--harmful-ref", inputs["harmful_ref"],
            "--harmless-ref", inputs["harmless_ref"], *(["--out", str(out)] if out else []), "--max-len", "160",
            "--batch-size", "4", *extra]


@contextlib.contextmanager
def ctrl_c_at_step(stop_step):
    """surgery.train_step raises KeyboardInterrupt (a Ctrl-C) when it reaches step `stop_step`, inside the block."""
    import surgery
    real_step = surgery.train_step

    def interrupted_step(model, optimizer, step, *rest):
        if step == stop_step:
            raise KeyboardInterrupt
        return real_step(model, optimizer, step, *rest)
    surgery.train_step = interrupted_step
    try:
        yield
    finally:
        surgery.train_step = real_step
