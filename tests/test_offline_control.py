"""offline/control.py: the harm-blind control's pairs keep Surgery's instructions and match its refusals' lengths."""
import types

import pytest

from offline import control


def test_control_pairs_keep_instructions_and_match_lengths(monkeypatch):
    refs = [{"instruction": f"harmful request {i}", "output": "I cannot help with that request, sorry." + "!" * i}
            for i in range(5)]
    monkeypatch.setattr(control, "build_splits", lambda seed: types.SimpleNamespace(
        harmful_ref=[dict(r, output="harm") for r in refs], harmless_ref=refs))
    sources = {"a": [f"short {i}" for i in range(200)], "b": ["a much longer passage of novel text " * 3] * 50}
    xm, xr = control.control_pairs(sources, "a", "b")
    for ref, m, r in zip(refs, xm, xr):
        assert m["instruction"] == r["instruction"] == ref["instruction"]
        for answer in (m["output"], r["output"]):  # cut at the first word boundary at or past the refusal's length
            assert len(answer) >= len(ref["output"]) and len(answer.rsplit(" ", 1)[0]) < len(ref["output"])
    texts = " ".join(m["output"] for m in xm).split()
    assert len(texts) == len(set(texts)) * 2  # "short i" pairs: no text used twice
    with pytest.raises(ValueError):
        control.control_pairs({"a": ["x"], "b": ["y"]}, "a", "b")
