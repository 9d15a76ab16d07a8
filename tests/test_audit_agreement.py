"""The two halves agree: sinkcheck, reading only a surgery.py output file, reproduces its sink report."""
import json
import subprocess

import torch

import surgery
from checker_helpers import SINKCHECK
from conftest import run_args


def test_sinkcheck_reproduces_surgery_sink_report(tmp_path, tiny_run_inputs):
    out = tmp_path / "out"
    _, report = surgery.main(run_args(tiny_run_inputs, out, "--max-steps", "3", "--lr", "1e-2",
                                      "--probe-count", "5"))
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
