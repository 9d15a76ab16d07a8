"""The two halves agree: sinkcheck, reading only a surgery.py output file, reproduces its sink report."""
import json
import subprocess

import pytest
import torch

import surgery
from checker_helpers import SINKCHECK
from conftest import run_args
from tiny import save_tiny


def assert_audit_reproduces_run(tmp_path, inputs, *extra):
    out = tmp_path / "out"
    _, report = surgery.main(run_args(inputs, out, "--max-steps", "3", "--lr", "1e-2", "--probe-count", "5", *extra))
    audit_json = tmp_path / "audit.json"
    done = subprocess.run([SINKCHECK, str(out / "model.safetensors"), "--json", str(audit_json)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    audit = json.loads(audit_json.read_text())
    assert audit["sink_position"] == report["sink_position"]
    difference = torch.tensor(audit["divergence"]) - torch.tensor(report["divergence_after"])
    assert difference.abs().max() < 1e-4
    assert audit["positive"] == report["positive_after"]
    # Training moved the statistic: the audit tells the trained model from its base.
    assert (torch.tensor(report["divergence_after"]) - torch.tensor(report["divergence_before"])).abs().max() > 1e-3


def test_sinkcheck_reproduces_surgery_sink_report(tmp_path, tiny_run_inputs):
    assert_audit_reproduces_run(tmp_path, tiny_run_inputs)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3", "olmo2"])
def test_sinkcheck_reproduces_surgery_sink_report_of_each_family(tmp_path, tiny_run_inputs, family):
    """The same for the other families (3 layers; Gemma 3's local layers see 8 keys of the 80-100 token probes).
    Phi-3's LoRA goes on its fused qkv_proj, so the merged fused matrix is what sinkcheck splits."""
    model = save_tiny(tmp_path / "model", family, num_hidden_layers=3)
    extra = ("--lora-targets", "qkv_proj,o_proj") if family == "phi3" else ()
    assert_audit_reproduces_run(tmp_path, dict(tiny_run_inputs, model=str(model)), *extra)
