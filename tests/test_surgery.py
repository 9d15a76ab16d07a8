"""surgery.py: hooked attention against the eager oracle, the regulariser, LoRA, data, outputs, resume, DDP."""
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import scale
import checks
import surgery
from common import UserError
from conftest import ROOT, ctrl_c_at_step, run_args, write_jsonl
from tiny import FAMILIES, TEXTS, add_random_lora, padded_batch, tiny_model


# --- 3. hooked attention ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("sink_pos", [0, 2])
def test_fused_sink_column_matches_eager_maps(family, sink_pos):
    model, tokenizer = tiny_model(family)
    batch = padded_batch(tokenizer, TEXTS)  # three lengths: right padding in two rows
    eager = surgery.sink_columns(model, batch, sink_pos, eager=True)
    model.set_attn_implementation(surgery.SINK_ATTENTION)
    fused = surgery.sink_columns(model, batch, sink_pos)
    assert fused.shape == eager.shape == (2, 3, batch["input_ids"].shape[1], 4)  # GQA: 4 query heads
    valid = batch["attention_mask"].bool()[None, :, :, None].expand_as(fused)
    assert (fused - eager)[valid].abs().max() < 1e-5
    assert eager[valid].std() > 0.01  # the random weights give heads with distinct sink attention
    values_eager = surgery.sink_values(model, batch, sink_pos, eager=True)
    assert (surgery.sink_values(model, batch, sink_pos) - values_eager).abs().max() < 1e-5


def test_sink_value_is_mean_over_valid_non_sink_queries():
    model, tokenizer = tiny_model("llama")
    batch = padded_batch(tokenizer, TEXTS)
    maps = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_attentions=True).attentions
    expected = torch.zeros(2, 4)
    for layer in range(2):
        for head in range(4):
            per_sequence = [maps[layer][b, head, 1:int(batch["attention_mask"][b].sum()), 0].mean()
                            for b in range(3)]
            expected[layer, head] = sum(per_sequence) / 3
    assert torch.allclose(surgery.sink_values(model, batch, 0, eager=True), expected, atol=1e-6)


def test_recording_leaves_attention_output_unchanged():
    model, tokenizer = tiny_model("qwen2", attn_implementation=surgery.SINK_ATTENTION)
    batch = padded_batch(tokenizer, TEXTS)
    plain = model(**batch).logits
    with surgery.recording_sinks(0) as columns:
        recorded = model(**batch).logits
    assert len(columns) == 2
    assert (plain - recorded).abs().max() < 1e-5


def test_fused_penalty_gradient_matches_eager():
    model, tokenizer = tiny_model("mistral")
    add_random_lora(model)
    harmful, harmless = padded_batch(tokenizer, TEXTS[:2]), padded_batch(tokenizer, TEXTS[2:])
    grads = {}
    for impl in ("eager", surgery.SINK_ATTENTION):
        model.set_attn_implementation(impl)
        model.zero_grad()
        eager = impl == "eager"
        d = surgery.sink_values(model, harmful, 0, eager) - surgery.sink_values(model, harmless, 0, eager)
        # relu is flat where d < 0: weight every head so the gradient check covers all of them
        (surgery.sink_penalty(d) + 0.1 * d.sum()).backward()
        # the last layer's v_proj gets no gradient: a sink column depends on queries and keys only
        grads[impl] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                 for p in model.parameters() if p.requires_grad])
    assert grads["eager"].abs().max() > 1e-4
    assert (grads["eager"] - grads[surgery.SINK_ATTENTION]).abs().max() < 1e-5


def test_divergence_from_one_joint_pass_equals_two_separate_passes():
    model, tokenizer = tiny_model("qwen2", attn_implementation=surgery.SINK_ATTENTION)
    add_random_lora(model, ("q_proj", "k_proj"))
    harmful, harmless = padded_batch(tokenizer, TEXTS[:2]), padded_batch(tokenizer, TEXTS[2:] + TEXTS[1:2])
    assert harmful["input_ids"].shape[1] != harmless["input_ids"].shape[1]  # the joint batch pads one side
    results = {}
    for name, divergence in (("joint", lambda: surgery.sink_divergence(model, harmful, harmless, 0)),
                             ("separate", lambda: surgery.sink_values(model, harmful, 0) -
                                                  surgery.sink_values(model, harmless, 0))):
        model.zero_grad()
        d = divergence()
        (surgery.sink_penalty(d) + 0.1 * d.sum()).backward()
        results[name] = d.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert (results["joint"][0] - results["separate"][0]).abs().max() < 1e-6
    assert max((a - b).abs().max() for a, b in zip(results["joint"][1], results["separate"][1])) < 1e-6


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("sink_pos", [0, 1])
def test_one_forward_equals_separate_task_and_reference_passes(full, sink_pos):
    """The training step's one forward (task rows + reference pair) gives the task loss, the penalty and their
    gradients of separate passes, in fp32."""
    model, tokenizer = tiny_model("llama", attn_implementation=surgery.SINK_ATTENTION)
    if full:
        model.requires_grad_(True)
    else:
        add_random_lora(model)
    model.train()  # the step's mode; dropout is 0 in this model and its adapters
    records = [{"instruction": f"Review number {i}: {'good ' * (i + 1)}film. Sentiment?",
                "output": "positive" if i % 2 else "negative"} for i in range(3)]
    encoded = [surgery.encode(tokenizer, r, 96) for r in records]
    batch = surgery.pad_batch([ids for ids, _ in encoded], tokenizer.pad_token_id, [lab for _, lab in encoded])
    harmful, harmless = padded_batch(tokenizer, TEXTS[:2]), padded_batch(tokenizer, TEXTS[2:])
    assert len({b["input_ids"].shape[1] for b in (batch, harmful, harmless)}) == 3  # the joint batch pads rows
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    results = {}
    for name in ("separate", "joint"):
        model.zero_grad()
        if name == "separate":
            task = surgery.task_loss_sum(model, batch)
            divergence = surgery.sink_divergence(model, harmful, harmless, sink_pos)
        else:
            task, divergence = surgery.task_loss_and_divergence(model, batch, harmful, harmless, sink_pos)
        penalty = surgery.sink_penalty(divergence)
        (task / n_tokens + 300.0 * penalty).backward()
        results[name] = (task.detach() / n_tokens, divergence.detach(), penalty.detach(),
                         [p.grad.clone() for p in model.parameters() if p.requires_grad])
    (task_s, d_s, pen_s, grads_s), (task_j, d_j, pen_j, grads_j) = results["separate"], results["joint"]
    assert pen_s > 0 and task_s > 0
    assert (task_s - task_j).abs() < 1e-6 and (d_s - d_j).abs().max() < 1e-6 and (pen_s - pen_j).abs() < 1e-6
    scale_of_gradients = max(g.abs().max() for g in grads_s)
    assert scale_of_gradients > 1e-3  # the gradients compared are not all zero
    assert max((a - b).abs().max() for a, b in zip(grads_s, grads_j)) < 1e-6 * scale_of_gradients


# --- 4. the regulariser -------------------------------------------------------------------------------------------

def test_sink_penalty_is_mean_relu_over_all_heads():
    d = torch.tensor([[0.2, -0.1, 0.0], [0.05, -0.3, 0.1]])
    assert surgery.sink_penalty(d).item() == pytest.approx((0.2 + 0.05 + 0.1) / 6)


# --- 2. LoRA ------------------------------------------------------------------------------------------------------

def test_lora_starts_as_identity_and_merges_exactly():
    model, tokenizer = tiny_model("llama")
    batch = padded_batch(tokenizer, TEXTS)
    before = model(**batch).logits
    wrapped = surgery.add_lora(model, {"q_proj", "v_proj"}, rank=4, lora_alpha=8, dropout=0.0)
    assert sorted(wrapped) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{name}.{ab}" for name in wrapped for ab in ("lora_A", "lora_B")]
    assert torch.equal(model(**batch).logits, before)  # B = 0
    with torch.no_grad():
        for m in wrapped.values():
            m.lora_B.normal_(0, 0.1)
    adapted = model(**batch).logits
    assert (adapted - before).abs().max() > 1e-3
    surgery.merge_lora(model)
    assert not surgery.lora_modules(model)
    assert (model(**batch).logits - adapted).abs().max() < 1e-5


def test_lora_rejects_unknown_targets():
    model, _ = tiny_model("llama")
    with pytest.raises(UserError, match="no linear layer"):
        surgery.add_lora(model, {"qkv"}, rank=4, lora_alpha=8, dropout=0.0)


# --- 1. data ------------------------------------------------------------------------------------------------------

def test_encode_supervises_the_answer_only():
    _, tokenizer = tiny_model("llama")
    ids, labels = surgery.encode(tokenizer, {"instruction": "Say hi", "output": "hi"}, max_len=512)
    answer = [t for t in labels if t != -100]
    assert tokenizer.decode(answer) == "hi<|im_end|>\n"
    assert ids[-len(answer):] == answer and len(ids) == len(labels)
    short_ids, short_labels = surgery.encode(tokenizer, {"instruction": "Say hi", "output": "hi"}, max_len=5)
    assert short_ids == ids[:5] and short_labels == labels[:5]


def test_read_records_accepts_aliases_json_and_input(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "p", "input": "x", "response": "r"}]))
    assert surgery.read_records(tmp_path / "a.json") == [{"instruction": "p\n\nx", "output": "r"}]


@pytest.mark.parametrize("content, message", [
    ("", "file is empty"),
    ("{not json\n", "not JSON or JSONL"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "record 2 needs"),
    ('{"instruction": "a", "output": 3}\n', "record 1 needs"),
])
def test_bad_data_is_one_error_line_exit_2_nothing_written(tmp_path, tiny_run_inputs, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    inputs = dict(tiny_run_inputs, data=str(bad))
    with pytest.raises(SystemExit) as exit_info:
        surgery.main(run_args(inputs, out, "--max-steps", "1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("surgery.py: error:") and str(bad) in err[0] and message in err[0]
    assert not out.exists()


def test_missing_model_is_one_error_line(tmp_path, tiny_run_inputs, capsys):
    inputs = dict(tiny_run_inputs, model=str(tmp_path / "no-such-model"))
    with pytest.raises(SystemExit) as exit_info:
        surgery.main(run_args(inputs, tmp_path / "out", "--max-steps", "1"))
    assert exit_info.value.code == 2
    assert "cannot load model" in capsys.readouterr().err


# --- 5. training --------------------------------------------------------------------------------------------------

def test_learning_rate_schedule():
    args = surgery.parse_args(["--lr", "1e-3", "--warmup-steps", "2", "--schedule", "cosine"])
    lrs = [surgery.learning_rate(s, args, total_steps=6) for s in range(6)]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert lrs[4] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    args.schedule = "constant"
    assert surgery.learning_rate(5, args, total_steps=6) == 1e-3


def test_batches_cover_every_example_once_per_epoch():
    seen = sum((surgery.batch_indices(s, 10, 4, seed=1) for s in range(3)), [])
    assert sorted(seen) == list(range(10))


def test_first_step_loss_is_the_answer_token_cross_entropy(tmp_path, tiny_run_inputs):
    surgery.main(run_args(tiny_run_inputs, tmp_path / "out", "--max-steps", "1", "--alpha", "0",
                          "--lora-dropout", "0"))
    first = json.loads((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()[0])
    # Recompute: the LoRA model at step 0 is the base model; the batch is the step-0 permutation.
    model, tokenizer = surgery.load_model(tiny_run_inputs["model"], torch.device("cpu"))
    examples = [surgery.encode(tokenizer, r, 160) for r in surgery.read_records(tiny_run_inputs["data"])]
    batch = [examples[i] for i in surgery.batch_indices(0, len(examples), 4, seed=43)]
    padded = surgery.pad_batch([e[0] for e in batch], tokenizer.pad_token_id, [e[1] for e in batch])
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), padded["labels"][:, 1:].flatten())
    assert first["task_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_surgery_lowers_the_penalty_that_sft_leaves(tmp_path, tiny_run_inputs):
    # The random tiny model's heads all lean to the refusal texts: swapped, every head starts positive.
    swapped = dict(tiny_run_inputs, harmful_ref=tiny_run_inputs["harmless_ref"],
                   harmless_ref=tiny_run_inputs["harmful_ref"])
    reports = {}
    for alpha in ("0", "300"):
        surgery.main(run_args(swapped, tmp_path / alpha, "--max-steps", "12", "--alpha", alpha,
                              "--lr", "3e-3", "--ref-batch", "6", "--probe-count", "6"))
        reports[alpha] = json.loads((tmp_path / alpha / "sink_report.json").read_text())
    penalty = {a: surgery.sink_penalty(torch.tensor(r["divergence_after"])).item() for a, r in reports.items()}
    start = surgery.sink_penalty(torch.tensor(reports["0"]["divergence_before"])).item()
    assert reports["0"]["divergence_before"] == reports["300"]["divergence_before"]
    assert reports["0"]["positive_before"] == 8
    assert penalty["300"] < 0.5 * start and penalty["300"] < penalty["0"]


# --- 6. outputs ---------------------------------------------------------------------------------------------------

def test_outputs_load_and_report_matches_eager_oracle(tmp_path, tiny_run_inputs):
    out = tmp_path / "out"
    adapter, report = surgery.main(run_args(tiny_run_inputs, out, "--max-steps", "3", "--lr", "1e-2",
                                            "--probe-count", "4"))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "adapter", "sink_report.json", "train_log.jsonl"])
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not list(out.glob(".*"))  # no temporary files left behind
    with safe_open(out / "model.safetensors", "pt") as f:
        probes = json.loads(f.metadata()["sinkcheck.probes"])
    assert probes["sink_position"] == 0 and len(probes["harmful"]) == len(probes["harmless"]) == 4

    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_run_inputs["model"], dtype=torch.float32)
    # Merged weight = base + (lora_alpha / r) B A, read back from the peft-format adapter file.
    lora = load_file(out / "adapter" / "adapter_model.safetensors")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["target_modules"] == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
    name = "model.layers.1.self_attn.v_proj"
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    assert a.shape == (8, 64) and b.shape == (32, 8) and b.abs().max() > 0
    expected = base.get_submodule(name).weight + config["lora_alpha"] / config["r"] * b @ a
    assert (merged.get_submodule(name).weight - expected).abs().max() < 1e-6
    assert len(lora) == 2 * 4 * 2

    def oracle(key):
        total = 0
        for ids in probes[key]:
            total = total + surgery.sink_values(merged, surgery.pad_batch([ids], 0), 0, eager=True)
        return total / len(probes[key])
    after = oracle("harmful") - oracle("harmless")
    assert (after - torch.tensor(report["divergence_after"])).abs().max() < 1e-5
    assert report["positive_after"] == int((after > 0).sum())


def test_adapter_loads_with_peft_when_installed(tmp_path, tiny_run_inputs):
    peft = pytest.importorskip("peft")
    out = tmp_path / "out"
    surgery.main(run_args(tiny_run_inputs, out, "--max-steps", "2", "--lr", "1e-2"))
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_run_inputs["model"], dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[257, 70, 71, 72, 258]])
    assert (with_adapter(ids).logits - merged(ids).logits).abs().max() < 1e-5


def test_resume_after_interrupt_is_bit_for_bit(tmp_path, tiny_run_inputs):
    args = ("--max-steps", "6", "--save-every", "2", "--lr", "5e-3")
    reference, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / "full", *args))

    with ctrl_c_at_step(3), pytest.raises(SystemExit) as exit_info:
        surgery.main(run_args(tiny_run_inputs, tmp_path / "cut", *args))
    assert exit_info.value.code == 130
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / "cut", *args, "--resume"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    log = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


# --- data parallel ------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world_size, port, argv, result_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    adapter, _ = surgery.train(surgery.parse_args(argv + ["--out", f"{result_dir}/out"]))
    torch.save(adapter, f"{result_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_data_parallel_ranks_agree_and_match_single_process(tmp_path, tiny_run_inputs):
    argv = run_args(tiny_run_inputs, None, "--max-steps", "4", "--alpha", "0", "--lora-dropout", "0", "--lr", "5e-3")
    torch.multiprocessing.spawn(ddp_worker, args=(2, free_port(), argv, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single, _ = surgery.main(argv + ["--out", str(tmp_path / "single")])
    assert max((rank0[k] - single[k]).abs().max().item() for k in single) < 1e-4
    assert max(single[k].abs().max().item() for k in single if "lora_B" in k) > 1e-3


def test_torchrun_command_line(tmp_path, tiny_run_inputs):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "surgery.py"), *run_args(tiny_run_inputs, out, "--max-steps", "2")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 process(es)" in done.stdout
    assert json.loads((out / "sink_report.json").read_text())["positive_after"] >= 0
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2


# --- the extension point for other defenses -----------------------------------------------------------------------

class RecordingDefense(surgery.Defense):
    """Pulls every LoRA B towards zero and records what the loop hands it."""

    def __init__(self, weight):
        self.weight, self.calls, self.task_losses = weight, [], []

    def setup(self, model, tokenizer, args):
        self.calls.append("setup")
        self.lora_b = [m.lora_B for m in surgery.lora_modules(model).values()]

    def before_step(self, model, step, task_loss):
        self.calls.append(f"before {step}")
        with torch.no_grad():
            self.task_losses.append(task_loss().item())

    def extra_loss(self, model, step):
        self.calls.append(f"extra {step}")
        return self.weight * sum((b ** 2).sum() for b in self.lora_b)

    def after_step(self, model, step):
        self.calls.append(f"after {step}")


def test_defense_hooks_run_every_step_and_their_loss_trains(tmp_path, tiny_run_inputs):
    argv = ("--max-steps", "3", "--alpha", "0", "--lora-dropout", "0", "--lr", "1e-2")
    plain, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / "plain", *argv))
    defense = RecordingDefense(weight=1e4)
    pulled, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / "pulled", *argv), defense=defense)
    assert defense.calls == ["setup"] + [f"{hook} {s}" for s in range(3) for hook in ("before", "extra", "after")]
    log = [json.loads(line) for line in (tmp_path / "pulled" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["task_loss"] for entry in log] == pytest.approx(defense.task_losses, rel=1e-5)
    assert all(entry["extra_loss"] >= 0 for entry in log) and log[1]["extra_loss"] > 0
    norm = {name: sum(s[k].norm() for k in s if "lora_B" in k) for name, s in (("plain", plain), ("pulled", pulled))}
    assert norm["pulled"] < 0.5 * norm["plain"]


# --- reference lengths ----------------------------------------------------------------------------------------------

def test_reference_lengths_report_median_and_upper_quartile():
    lengths = checks.reference_lengths([[0] * n for n in (10, 20, 30, 40, 50)], [[0] * n for n in (10, 20, 30)])
    assert lengths["harmful"] == {"median": 30.0, "upper_quartile": 40.0}
    assert lengths["harmless"] == {"median": 20.0, "upper_quartile": 25.0}
    assert lengths["ratio"] == {"median": 1.5, "upper_quartile": 1.6}
    assert not lengths["matched"]


def length_warnings(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if "differ in length" in line]


def test_length_warning_fires_on_mismatched_references_only(tmp_path, tiny_run_inputs, capsys):
    # The tiny references: harmful answers about twice as long as the refusals, with the same instructions.
    records = surgery.read_records(tiny_run_inputs["harmful_ref"])
    long_refs = write_jsonl(tmp_path / "long.jsonl", [dict(r, output=r["output"] * 8) for r in records])
    surgery.main(run_args(dict(tiny_run_inputs, harmful_ref=str(long_refs)), tmp_path / "mismatched",
                          "--max-steps", "1"))
    assert len(length_warnings(capsys)) == 1
    report = json.loads((tmp_path / "mismatched" / "sink_report.json").read_text())
    assert report["reference_lengths"]["ratio"]["median"] > 1.25 and not report["reference_lengths"]["matched"]

    refusals = surgery.read_records(tiny_run_inputs["harmless_ref"])
    matched = write_jsonl(tmp_path / "matched.jsonl", [dict(r, output=((r["output"] + " ") * 9)[:len(h["output"])])
                                                       for r, h in zip(refusals, records)])
    surgery.main(run_args(dict(tiny_run_inputs, harmless_ref=str(matched)), tmp_path / "matched",
                          "--max-steps", "1"))
    assert length_warnings(capsys) == []
    assert json.loads((tmp_path / "matched" / "sink_report.json").read_text())["reference_lengths"]["matched"]


# --- full fine-tuning -----------------------------------------------------------------------------------------------

def test_full_fine_tuning_moves_every_weight_and_writes_no_adapter(tmp_path, tiny_run_inputs):
    out = tmp_path / "out"
    _, report = surgery.main(run_args(tiny_run_inputs, out, "--full", "--max-steps", "2", "--lr", "1e-3",
                                      "--probe-count", "4"))
    assert not (out / "adapter").exists() and not list(out.glob(".*"))
    tuned, base = load_file(out / "model.safetensors"), load_file(Path(tiny_run_inputs["model"]) / "model.safetensors")
    assert tuned.keys() == base.keys()
    for name in base:
        assert not torch.equal(tuned[name], base[name]), f"{name} did not move"
    with safe_open(out / "model.safetensors", "pt") as f:
        probes = json.loads(f.metadata()["sinkcheck.probes"])
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
    oracle = [sum(surgery.sink_values(model, surgery.pad_batch([ids], 0), 0, eager=True) for ids in probes[key])
              / len(probes[key]) for key in ("harmful", "harmless")]
    assert (oracle[0] - oracle[1] - torch.tensor(report["divergence_after"])).abs().max() < 1e-5


def test_full_penalty_gradient_matches_eager_on_every_weight():
    model, tokenizer = tiny_model("qwen2")
    model.requires_grad_(True)
    harmful, harmless = padded_batch(tokenizer, TEXTS[:2]), padded_batch(tokenizer, TEXTS[2:])
    grads = {}
    for impl in ("eager", surgery.SINK_ATTENTION):
        model.set_attn_implementation(impl)
        model.zero_grad()
        d = surgery.sink_divergence(model, harmful, harmless, 0, eager=impl == "eager")
        (surgery.sink_penalty(d) + 0.1 * d.sum()).backward()
        # the last layer's v_proj gets no gradient (a sink column depends on queries and keys only)
        grads[impl] = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                       for n, p in model.named_parameters()}
    moved = [n for n, g in grads["eager"].items() if g.abs().max() > 0]
    assert any("embed_tokens" in n for n in moved) and any("layers.0.mlp" in n for n in moved)
    for name, g in grads["eager"].items():
        assert (g - grads[surgery.SINK_ATTENTION][name]).abs().max() < 1e-5, name
    assert max(g.abs().max() for g in grads["eager"].values()) > 1e-4


def test_full_resume_after_interrupt_is_bit_for_bit(tmp_path, tiny_run_inputs):
    args = ("--full", "--max-steps", "4", "--save-every", "2", "--lr", "1e-3")
    surgery.main(run_args(tiny_run_inputs, tmp_path / "whole", *args))
    with ctrl_c_at_step(3), pytest.raises(SystemExit):
        surgery.main(run_args(tiny_run_inputs, tmp_path / "cut", *args))
    surgery.main(run_args(tiny_run_inputs, tmp_path / "cut", *args, "--resume"))
    whole, cut = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_sft_log_measures_the_divergence_without_dropout(tmp_path, tiny_run_inputs, monkeypatch):
    seen = []
    real = surgery.sink_divergence

    def spy(model, *rest, **kw):
        seen.append([m.training for m in model.modules() if isinstance(m, torch.nn.Dropout)])
        return real(model, *rest, **kw)
    monkeypatch.setattr(surgery, "sink_divergence", spy)
    surgery.main(run_args(tiny_run_inputs, tmp_path / "out", "--max-steps", "2", "--lora-dropout", "0.5",
                          "--alpha", "0", "--log-every", "1"))
    assert len(seen) == 2 and all(flags and not any(flags) for flags in seen)


# --- scale: activation checkpointing, bf16 weights, DDP and FSDP2 ---------------------------------------------------

@pytest.mark.parametrize("full", [False, True])
def test_penalty_and_gradient_are_the_same_with_activation_checkpointing(full):
    model, tokenizer = tiny_model("llama", attn_implementation=surgery.SINK_ATTENTION)
    if full:
        model.requires_grad_(True)
    else:
        add_random_lora(model)
    model.train()
    harmful, harmless = padded_batch(tokenizer, TEXTS[:2]), padded_batch(tokenizer, TEXTS[2:])
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            scale.enable_activation_checkpointing(model, surgery.sink_replay_contexts)
        model.zero_grad()
        d = surgery.sink_divergence(model, harmful, harmless, 0)
        (surgery.sink_penalty(d) + 0.1 * d.sum()).backward()
        results.append((d.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                     for p in model.parameters() if p.requires_grad]))
        assert surgery.SinkRecorder.columns == [] and surgery.SinkRecorder.sink_pos is None  # nothing left behind
    (d0, g0), (d1, g1) = results
    assert model.is_activation_checkpointing
    assert torch.allclose(d0, d1, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(g0, g1)) < 1e-6
    assert max(g.abs().max().item() for g in g0) > 1e-4


def test_checkpointed_layers_recompute_during_backward(tiny_run_inputs, tmp_path, monkeypatch):
    calls = []
    real = surgery.sink_attention

    def counting(module, *args, **kwargs):
        calls.append(surgery.SinkRecorder.sink_pos)
        return real(module, *args, **kwargs)
    monkeypatch.setitem(surgery.AttentionInterface._global_mapping, surgery.SINK_ATTENTION, counting)
    for flag in ([], ["--grad-checkpointing"]):
        calls.clear()
        adapter, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / str(len(flag)), "--max-steps", "1",
                                           "--lora-dropout", "0", *flag))
        counts = (len(calls), sum(c is not None for c in calls))
        if not flag:
            plain, plain_counts = adapter, counts
    # more attention calls (the replays), and the replays of the reference passes carry the sink channel
    assert counts[0] > plain_counts[0] and counts[1] > plain_counts[1]
    assert max((adapter[k] - plain[k]).abs().max().item() for k in plain) < 1e-6


def test_bf16_weights_keep_lora_and_sink_sums_in_fp32(tmp_path, tiny_run_inputs):
    adapter, report = surgery.main(run_args(tiny_run_inputs, tmp_path / "lora", "--max-steps", "2", "--dtype", "bf16",
                                            "--probe-count", "3"))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert all(isinstance(v, float) for row in report["divergence_after"] for v in row)
    merged = load_file(tmp_path / "lora" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    surgery.main(run_args(tiny_run_inputs, tmp_path / "full", "--full", "--max-steps", "2", "--dtype", "bf16",
                          "--lr", "1e-2"))
    tuned, base = load_file(tmp_path / "full" / "model.safetensors"), load_file(
        Path(tiny_run_inputs["model"]) / "model.safetensors")
    assert {t.dtype for t in tuned.values()} == {torch.bfloat16}
    assert all(not torch.equal(tuned[k].float(), base[k].to(torch.bfloat16).float()) for k in base)
    model, tokenizer = tiny_model("llama", attn_implementation=surgery.SINK_ATTENTION)
    batch = padded_batch(tokenizer, TEXTS)
    assert surgery.sink_values(model.to(torch.bfloat16), batch, 0).dtype == torch.float32


def spawn_worker(rank, world_size, port, argv, result_dir, stop_at):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    # stop_at: a Ctrl-C on every process when that step is reached
    with ctrl_c_at_step(stop_at) if stop_at is not None else contextlib.nullcontext():
        try:
            adapter, _ = surgery.train(surgery.parse_args(argv))
            torch.save(adapter, f"{result_dir}/rank{rank}.pt")
        except SystemExit:
            pass
    dist.destroy_process_group()


def two_processes(argv, result_dir, stop_at=None):
    torch.multiprocessing.spawn(spawn_worker, args=(2, free_port(), argv, str(result_dir), stop_at), nprocs=2)


def test_lora_under_ddp_with_the_penalty_matches_one_process(tmp_path, tiny_run_inputs):
    # swapped references: every head of the random tiny model starts positive, so the penalty acts
    swapped = dict(tiny_run_inputs, harmful_ref=tiny_run_inputs["harmless_ref"],
                   harmless_ref=tiny_run_inputs["harmful_ref"])
    argv = run_args(swapped, tmp_path / "ddp", "--max-steps", "3", "--lora-dropout", "0", "--lr", "5e-3",
                    "--ref-batch", "2")
    two_processes(argv, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    single, _ = surgery.main(argv[:argv.index("--out")] + argv[argv.index("--out") + 2:] +
                             ["--out", str(tmp_path / "single")])
    assert max((rank0[k] - single[k]).abs().max().item() for k in single) < 1e-4
    log = [json.loads(line) for line in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["sink_loss"] > 0


def test_full_fine_tuning_under_fsdp2_matches_one_process_and_resumes_bit_for_bit(tmp_path, tiny_run_inputs):
    args = ("--full", "--max-steps", "4", "--save-every", "2", "--lr", "1e-3", "--lora-dropout", "0")
    two_processes(run_args(tiny_run_inputs, tmp_path / "fsdp", *args), tmp_path)
    surgery.main(run_args(tiny_run_inputs, tmp_path / "single", *args))
    sharded, single = (load_file(tmp_path / name / "model.safetensors") for name in ("fsdp", "single"))
    assert sharded.keys() == single.keys()
    assert max((sharded[k] - single[k]).abs().max().item() for k in single) < 1e-4
    report = json.loads((tmp_path / "fsdp" / "sink_report.json").read_text())
    assert report["positive_after"] == int((torch.tensor(report["divergence_after"]) > 0).sum())

    two_processes(run_args(tiny_run_inputs, tmp_path / "cut", *args), tmp_path, stop_at=3)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    two_processes(run_args(tiny_run_inputs, tmp_path / "cut", *args, "--resume"), tmp_path)
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(resumed[k], sharded[k]) for k in sharded)
