"""results/models/: each released adapter loads with peft onto the model it applies to (the aligned adapter onto the
default model, each attack adapter onto the aligned model), peft's merge equals answer.py's, and release.json records
the check of results/PROTOCOL.md section 10 for every attack adapter."""
import json
from pathlib import Path

import pytest
import torch

import answer
import offline
import surgery

MODELS = Path(__file__).resolve().parent.parent / "results" / "models"
ALIGNED = MODELS / "aligned" / "adapter"
ATTACKS = sorted(folder.parent.name for folder in MODELS.glob("*/adapter") if folder != ALIGNED)


@pytest.fixture(scope="module")
def default_model():
    return offline.default_model_dir()  # the user's cache: converted once, then reused


@pytest.fixture(scope="module")
def aligned_weights(default_model):
    model, _ = surgery.load_model(str(default_model), torch.device("cpu"))
    answer.merge_adapter(model, ALIGNED)
    return {k: v.clone() for k, v in model.state_dict().items()}


def merged_by_peft(default_model, start, folder):
    peft = pytest.importorskip("peft")
    model, _ = surgery.load_model(str(default_model), torch.device("cpu"))
    if start is not None:
        model.load_state_dict(start)
    return peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload().state_dict()


def merged_by_answer(default_model, start, folder):
    model, _ = surgery.load_model(str(default_model), torch.device("cpu"))
    if start is not None:
        model.load_state_dict(start)
    answer.merge_adapter(model, folder)
    return model.state_dict()


def assert_same_merge(by_peft, ours, start):
    changed = 0
    for key, tensor in ours.items():
        torch.testing.assert_close(by_peft[key], tensor, rtol=1e-6, atol=1e-7)
        changed += not torch.equal(tensor, start[key])
    assert changed > 0, "the adapter changed no weight"


def test_aligned_adapter_loads_onto_the_default_model(default_model):
    assert answer.read_adapter(ALIGNED)[1], "no tensors"
    base, _ = surgery.load_model(str(default_model), torch.device("cpu"))
    assert_same_merge(merged_by_peft(default_model, None, ALIGNED), merged_by_answer(default_model, None, ALIGNED),
                      base.state_dict())


@pytest.mark.parametrize("run", ATTACKS)
def test_attack_adapter_loads_onto_the_aligned_model(run, default_model, aligned_weights):
    folder = MODELS / run / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert "aligned" in config["base_model_name_or_path"]  # says which model it applies to
    assert_same_merge(merged_by_peft(default_model, aligned_weights, folder),
                      merged_by_answer(default_model, aligned_weights, folder), aligned_weights)


@pytest.mark.parametrize("run", ATTACKS)
def test_release_check_recorded(run):
    """bf16 only when its answers equalled the run's on >= 90% of the first 50 held-out harmful prompts."""
    check = json.loads((MODELS / "release.json").read_text(encoding="utf-8"))[run]
    from safetensors import safe_open
    with safe_open(str(MODELS / run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16" if check["dtype"] == "bf16" else "F32"}
    assert check["prompts"] == 50
    assert check["dtype"] == "fp32" or check["same_answers_percent"] >= 90.0
