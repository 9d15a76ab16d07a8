"""answer.py: an adapter merged as surgery.py merged it (and as peft loads it), and answers to a prompt file."""
import json

import pytest
import torch
from safetensors.torch import load_file

import answer
import surgery
from conftest import run_args, write_jsonl


@pytest.fixture(scope="module")
def trained(tiny_run_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("answer") / "run"
    surgery.main(run_args(tiny_run_inputs, out, "--max-steps", "2", "--alpha", "0", "--lr", "5e-2",
                          "--probe-count", "4"))
    return out


def test_merged_adapter_equals_the_runs_merged_model(tiny_run_inputs, trained):
    model, _ = surgery.load_model(tiny_run_inputs["model"], "cpu")
    answer.merge_adapter(model, trained / "adapter")
    merged = load_file(str(trained / "model.safetensors"))
    state = model.state_dict()
    moved = [k for k in merged if not torch.equal(merged[k], load_file(f"{tiny_run_inputs['model']}/model.safetensors")
                                                  .get(k, merged[k]))]
    assert moved  # the adapter changed some weights
    for key, tensor in merged.items():  # bit for bit: a released fp32 adapter rebuilds the run's model exactly
        assert torch.equal(state[key], tensor), key


def test_peft_loads_the_same_adapter(tiny_run_inputs, trained):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_run_inputs["model"])
    by_peft = peft.PeftModel.from_pretrained(base, str(trained / "adapter")).merge_and_unload().state_dict()
    model, _ = surgery.load_model(tiny_run_inputs["model"], "cpu")
    answer.merge_adapter(model, trained / "adapter")
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(by_peft[key], tensor, rtol=1e-6, atol=1e-7)


def test_rslora_scale_agrees_with_peft(tiny_run_inputs, trained, tmp_path):
    """use_rslora scales B A by lora_alpha / sqrt(r), not lora_alpha / r: the merge agrees with peft's either way."""
    import shutil
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "rslora"
    shutil.copytree(trained / "adapter", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, use_rslora=True)))
    base = AutoModelForCausalLM.from_pretrained(tiny_run_inputs["model"])
    by_peft = peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload().state_dict()
    model, _ = surgery.load_model(tiny_run_inputs["model"], "cpu")
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    answer.merge_adapter(model, folder)
    moved = 0
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(by_peft[key], tensor, rtol=1e-6, atol=1e-7)
        moved += not torch.equal(plain[key], tensor)
    assert moved and config["r"] > 1  # sqrt(r) != r: the case tells the two scales apart


def test_prompt_files_by_name_and_first_line(tmp_path):
    """.json and .jsonl files are records (a JSON list too); any other name is plain text unless its first line
    is a JSON record, so a text prompt that starts with "[" stays a prompt."""
    records = [{"prompt": "Hi?"}, {"instruction": "Bye?", "id": 2}]
    cases = {"q.json": json.dumps(records, indent=1), "q.jsonl": "\ufeff" + "\n".join(map(json.dumps, records)),
             "q.txt": "\n".join(map(json.dumps, records)) + "\n", "plain.txt": "[INST] Hi? [/INST]\n\n  Bye?  \n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        expected = ["[INST] Hi? [/INST]", "Bye?"] if name == "plain.txt" else ["Hi?", "Bye?"]
        assert answer.read_prompts(tmp_path / name) == expected, name


def test_answers_a_text_and_a_jsonl_prompt_file(tiny_run_inputs, trained, tmp_path):
    from evaluation.generation import generate
    questions = ["Review: the film was great. Sentiment?", "How do I bake bread?"]
    text = tmp_path / "q.txt"
    text.write_text("\n".join(questions) + "\n\n")
    jsonl = write_jsonl(tmp_path / "q.jsonl", [{"prompt": questions[0]}, {"instruction": questions[1]}])
    model, tokenizer = surgery.load_model(str(trained), "cpu")
    expected = generate(model, tokenizer, questions, 8, 2, "oracle")
    for prompts in (text, jsonl):
        out = tmp_path / f"{prompts.stem}{prompts.suffix}.answers.jsonl"
        answer.main(["--model", tiny_run_inputs["model"], "--adapter", str(trained / "adapter"), "--prompts",
                     str(prompts), "--out", str(out), "--max-new-tokens", "8", "--device", "cpu"])
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert rows == [{"prompt": q, "answer": a} for q, a in zip(questions, expected)]


@pytest.mark.parametrize("case", ["no prompt", "bad json line", "adapter missing", "adapter of another shape",
                                  "out is the prompt file"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_run_inputs, trained, tmp_path, capsys):
    prompts = tmp_path / "q.txt"
    prompts.write_text("Hello?\n")
    out, adapter = tmp_path / "a.jsonl", trained / "adapter"
    if case == "no prompt":
        prompts.write_text("\n \n")
    if case == "bad json line":
        prompts.write_text('{"prompt": "Hello?"}\n{"prompt": \n')
    if case == "adapter missing":
        adapter = tmp_path / "none"
    if case == "adapter of another shape":
        adapter = tmp_path / "wide"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text((trained / "adapter" / "adapter_config.json").read_text())
        from safetensors.torch import save_file
        save_file({k: torch.cat([v, v], 0 if "lora_B" in k else 1)
                   for k, v in load_file(str(trained / "adapter" / "adapter_model.safetensors")).items()},
                  str(adapter / "adapter_model.safetensors"))
    if case == "out is the prompt file":
        out = prompts
    before = prompts.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        answer.main(["--model", tiny_run_inputs["model"], "--adapter", str(adapter), "--prompts", str(prompts),
                     "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("answer.py: error: "), err
    assert prompts.read_bytes() == before and (out == prompts or not out.exists())
