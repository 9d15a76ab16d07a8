"""SurgeryTrainer / SurgeryMixin (surgery_trainer.py): the method inside transformers' Trainer and TRL's SFTTrainer.

Tiny random models (tests/tiny.py) on the CPU. On that model shorter sequences have larger sink values, so short
"harmful" and longer "harmless" references give every head d_h > 0 and the penalty something to push.
"""
import math
import os
import socket

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

import checks
import surgery
import surgery_trainer
from surgery_trainer import SurgeryConfigError, SurgeryMixin, SurgeryTrainer
from tiny import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:SurgeryTrainer. the reference sets differ in length")

# Every answer is 8 bytes ("positive" / "negative"): every example has as many answer tokens.
TASK = [{"instruction": f"Review {i}: the film was {'very ' * (i % 3)}good. Sentiment?",
         "output": "positive" if i % 2 else "negative"} for i in range(16)]
HARMFUL = [{"instruction": f"Say {i}", "output": "ok"} for i in range(4)]
HARMLESS = [{"instruction": f"Explain thing {i} in detail", "output": "Sure, here are the steps."} for i in range(4)]


def task_data(tokenizer):
    return [dict(zip(("input_ids", "labels"), surgery.encode(tokenizer, r, 96))) for r in TASK]


class Collate:
    """Right-padded batches with labels, as surgery.py pads them."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, rows):
        return surgery.pad_batch([r["input_ids"] for r in rows], self.pad_id, [r["labels"] for r in rows])


def arguments(out, **overrides):
    kw = dict(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, max_steps=3,
              per_device_train_batch_size=2, learning_rate=1e-2, seed=0, disable_tqdm=True)
    kw.update(overrides)
    return TrainingArguments(**kw)


def trainer(out, cls=SurgeryTrainer, model=None, attn="sdpa", args=None, eval_rows=0, **kw):
    if model is None:
        model, tokenizer = tiny_model("llama", attn_implementation=attn)
        model.requires_grad_(True)
    else:
        model, tokenizer = model
    if cls is not Trainer:
        kw = {"harmful_refs": HARMFUL, "harmless_refs": HARMLESS, **kw}
    return cls(model=model, args=args or arguments(out), train_dataset=task_data(tokenizer),
               eval_dataset=task_data(tokenizer)[:eval_rows] or None, data_collator=Collate(tokenizer.pad_token_id),
               processing_class=tokenizer, **kw)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- alpha 0 is the parent; alpha > 0 trains the penalty and logs it ------------------------------------------------

def test_alpha_zero_is_the_parent_trainer_weight_for_weight(tmp_path):
    plain = trainer(tmp_path / "plain", Trainer, attn="eager")
    plain.train()
    surgery_run = trainer(tmp_path / "surgery", attn="eager", alpha=0)
    rows = []
    surgery_run.model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)
    surgery_run.train()
    assert rows and set(rows) == {2}  # task rows only: no reference row rides along
    assert surgery_run.model.config._attn_implementation == "eager"  # the model as it was given
    a, b = weights(plain.model), weights(surgery_run.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max_difference(a, weights(tiny_model("llama")[0])) > 1e-3  # it trained
    logs = surgery_run.state.log_history
    assert [entry["loss"] for entry in logs if "loss" in entry] == [e["loss"] for e in plain.state.log_history
                                                                     if "loss" in e]
    assert "sink_penalty" not in logs[0] and logs[0]["ref_harmful_median_tokens"] > 0


def test_penalty_moves_the_weights_and_is_logged_with_the_reference_lengths(tmp_path):
    base = trainer(tmp_path / "a0", alpha=0)
    base.train()
    run = trainer(tmp_path / "a300", alpha=300, eval_rows=4, args=arguments(
        tmp_path / "a300", eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4))
    run.train()
    assert run.model.config._attn_implementation == surgery.SINK_ATTENTION
    assert max_difference(weights(base.model), weights(run.model)) > 1e-3
    train_logs = [entry for entry in run.state.log_history if "loss" in entry]
    assert len(train_logs) == 3 and all(entry["sink_penalty"] > 0 for entry in train_logs)
    assert all(0 < entry["positive_heads"] <= run.surgery_heads == 8 for entry in train_logs)
    assert train_logs[0]["sink_penalty"] > train_logs[-1]["sink_penalty"]  # the penalty is pushed down
    lengths = checks.reference_lengths(*run.reference_ids)
    assert train_logs[0]["ref_harmful_median_tokens"] == lengths["harmful"]["median"]
    assert train_logs[0]["ref_harmless_median_tokens"] == lengths["harmless"]["median"]
    assert sum("ref_harmful_median_tokens" in entry for entry in run.state.log_history) == 1  # once
    eval_logs = [entry for entry in run.state.log_history if "eval_loss" in entry]
    assert eval_logs and not any("sink_penalty" in entry for entry in eval_logs)


def test_reference_length_mismatch_warns(tmp_path):
    with pytest.warns(UserWarning, match="differ in length"):
        trainer(tmp_path, alpha=1)


# --- the loss: the parent's task loss plus alpha times the penalty of the step's draw ------------------------------

@pytest.mark.parametrize("sink_pos", [0, 1])
@pytest.mark.parametrize("scaled_by_items", [True, False])
def test_trainer_loss_is_the_parent_loss_plus_the_penalty_of_the_same_draw(tmp_path, sink_pos, scaled_by_items):
    """One forward over task and reference rows gives the parent's task loss (with and without num_items_in_batch),
    the penalty surgery.sink_penalty(surgery.sink_divergence(...)) of the step's draw, and the gradients of separate
    passes; without num_items_in_batch the Trainer divides the loss by the accumulation steps, and the penalty is
    scaled up to stay whole (fp32, 1e-6)."""
    run = trainer(tmp_path, alpha=300, sink_pos=sink_pos, ref_batch=2)
    model = run.model.train()
    batch = Collate(run.processing_class.pad_token_id)(task_data(run.processing_class)[:3])
    n_items = int((batch["labels"][:, 1:] != -100).sum()) if scaled_by_items else None
    run.current_gradient_accumulation_steps = 2
    factor = 1 if scaled_by_items else 2
    run.state.global_step = 5
    harmful, harmless = run.reference_draw(5)
    assert len({b["input_ids"].shape[1] for b in (batch, harmful, harmless)}) == 3  # the joint batch pads rows
    results = {}
    for name in ("separate", "joint"):
        model.zero_grad()
        if name == "joint":
            run._surgery_penalty_step = None
            loss = run.compute_loss(model, dict(batch), num_items_in_batch=n_items)
            penalty = run.surgery_last["penalty"]
            assert run.surgery_last["step"] == 5
        else:
            task = Trainer.compute_loss(run, model, dict(batch), num_items_in_batch=n_items)
            penalty = surgery.sink_penalty(surgery.sink_divergence(model, harmful, harmless, sink_pos))
            loss = task + 300 * factor * penalty
            results["task"] = task.detach()
        loss.backward()
        results[name] = loss.detach(), penalty.detach(), [p.grad.clone() for p in model.parameters()]
    (loss_s, pen_s, grads_s), (loss_j, pen_j, grads_j) = results["separate"], results["joint"]
    assert pen_s > 0 and results["task"] > 0
    assert (pen_s - pen_j).abs() < 1e-6 and (loss_s - loss_j).abs() < 1e-6 * loss_s
    scale_of_gradients = max(g.abs().max() for g in grads_s)
    assert max((a - b).abs().max() for a, b in zip(grads_s, grads_j)) < 1e-6 * scale_of_gradients
    # the draw is surgery.py's: the step's seed, ref_batch sequences of each set
    draw = torch.Generator().manual_seed(surgery.step_seed(run.args, 5, 0))
    expected = surgery.reference_batch(run.reference_ids[0], 2, draw, run.processing_class.pad_token_id, "cpu")
    assert torch.equal(expected["input_ids"], harmful["input_ids"])


@pytest.mark.parametrize("loss_kwargs", [True, False])
def test_gradient_accumulation_puts_one_penalty_in_each_step(tmp_path, loss_kwargs):
    """Two micro-batches of 2 give the weights of one batch of 4 (same examples, one penalty per step), whether the
    Trainer normalises the loss by the step's token count or divides each micro-batch's mean by the accumulation."""
    runs = []
    for name, batch, accumulation in (("accumulated", 2, 2), ("whole", 4, 1)):
        run = trainer(tmp_path / name, alpha=300, args=arguments(
            tmp_path / name, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
            optim="sgd"))
        run.model_accepts_loss_kwargs = loss_kwargs
        run.train()
        runs.append(run)
    accumulated, whole = runs
    assert max_difference(weights(accumulated.model), weights(whole.model)) < 1e-5
    logged = [[e["sink_penalty"] for e in run.state.log_history if "loss" in e] for run in runs]
    assert len(logged[0]) == 3 and max(abs(a - b) for a, b in zip(*logged)) < 1e-6


def test_activation_checkpointing_trains_the_same(tmp_path):
    """A checkpointed layer replays its forward in backward; the reference micro-batch replays with the sink
    channel, so the penalty's gradient is unchanged."""
    runs = []
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        run = trainer(tmp_path / name, alpha=300, args=arguments(tmp_path / name, optim="sgd",
                                                                 activation_checkpointing=checkpointing))
        run.train()
        runs.append(run)
    assert runs[1].model.is_activation_checkpointing
    assert max_difference(weights(runs[0].model), weights(runs[1].model)) < 1e-6


# --- peft and TRL -------------------------------------------------------------------------------------------------

def test_peft_lora_model_trains_the_adapters_with_the_penalty(tmp_path):
    from peft import LoraConfig, get_peft_model
    results = {}
    for alpha in (0, 300):
        model, tokenizer = tiny_model("llama", attn_implementation="eager")
        base = weights(model)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, init_lora_weights=False))
        run = trainer(tmp_path / str(alpha), model=(peft_model, tokenizer), alpha=alpha)
        run.train()
        state = weights(run.model)
        frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in state.items()
                  if "lora_" not in k}
        assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)  # untouched
        results[alpha] = {k: v for k, v in state.items() if "lora_" in k}
        expected = "eager" if alpha == 0 else surgery.SINK_ATTENTION
        assert model.config._attn_implementation == expected  # switched through the peft wrapper
    assert max_difference(results[0], results[300]) > 1e-4
    assert [e for e in run.state.log_history if "loss" in e][0]["sink_penalty"] > 0


def test_trl_sft_trainer_through_the_mixin(tmp_path):
    trl = pytest.importorskip("trl", reason="trl is a tests-only requirement (requirements.txt)")
    from datasets import Dataset
    from peft import LoraConfig

    class SurgerySFTTrainer(SurgeryMixin, trl.SFTTrainer):
        pass

    with pytest.raises(SurgeryConfigError, match="padding-free"):  # the reference rows ride as padded rows
        SurgerySFTTrainer(model=tiny_model("llama")[0], harmful_refs=HARMFUL, harmless_refs=HARMLESS,
                          args=trl.SFTConfig(str(tmp_path), use_cpu=True, padding_free=True))
    model, tokenizer = tiny_model("llama", attn_implementation="sdpa")
    rows = [{"prompt": [{"role": "user", "content": r["instruction"]}],
             "completion": [{"role": "assistant", "content": r["output"]}]} for r in TASK[:8]]
    config = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                           max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, seed=0, disable_tqdm=True,
                           max_length=128)
    run = SurgerySFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                               target_modules=["q_proj", "v_proj"]),
                            harmful_refs=HARMFUL, harmless_refs=HARMLESS, alpha=300)
    assert model.config._attn_implementation == surgery.SINK_ATTENTION
    # SFTTrainer's own loss (its fused LM head) on the task rows, plus the penalty of the draw
    batch = run._prepare_inputs(next(iter(run.get_train_dataloader())))
    run.model.train()
    with torch.no_grad():
        run._surgery_penalty_step = None
        joint = run.compute_loss(run.model, dict(batch))
        task = trl.SFTTrainer.compute_loss(run, run.model, dict(batch))
        penalty = surgery.sink_penalty(surgery.sink_divergence(run.model, *run.reference_draw(0), 0))
    assert abs(joint - (task + 300 * penalty)) < 1e-5 and penalty > 0
    run._surgery_values.clear()
    run.train()
    logs = [e for e in run.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(e["sink_penalty"] > 0 and "mean_token_accuracy" in e for e in logs)
    assert any("lora_B" in name and p.abs().max() > 0 for name, p in run.model.named_parameters())


# --- data parallel through the Trainer's engine ---------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel_run(out, world):
    """3 SGD steps of full fine-tuning with the penalty: per process a batch of 2, and in one process two
    micro-batches of 2 (the same 4 examples per step)."""
    extra = dict(ddp_backend="gloo") if world > 1 else dict(gradient_accumulation_steps=2)
    run = trainer(out, alpha=300, args=arguments(out, optim="sgd", **extra))
    run.train()
    return run


def ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    run = parallel_run(f"{out}/ddp", world)
    assert isinstance(run.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    torch.save({"state": weights(run.accelerator.unwrap_model(run.model)), "logs": run.state.log_history},
               f"{out}/rank{rank}.pt")


def test_two_process_ddp_equals_one_process(tmp_path):
    """Under DDP (torch.multiprocessing, gloo: as torchrun) every rank draws the same references and computes the
    same penalty; the gradients are averaged: the weights of one process with the same 4 examples per step.
    (FSDP through the Trainer's options cannot run on CPU: accelerate 1.15 turns the FSDP plugin on for
    accelerator devices only, and on CPU processes trains DDP instead.)"""
    torch.multiprocessing.spawn(ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single = parallel_run(tmp_path / "single", 1)
    reference = weights(single.model)
    assert max_difference(reference, weights(tiny_model("llama")[0])) > 1e-3
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in reference)
    assert max_difference(ranks[0]["state"], reference) < 1e-5
    single_logs = [e["sink_penalty"] for e in single.state.log_history if "loss" in e]
    logged = [e["sink_penalty"] for e in ranks[0]["logs"] if "loss" in e]
    assert len(logged) == 3 and max(abs(a - b) for a, b in zip(logged, single_logs)) < 1e-6


# --- bad input: one clear error at construction ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": math.nan}, "alpha must be a finite number >= 0"),
    ({"alpha": math.inf}, "alpha must be a finite number >= 0"),
    ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
    ({"alpha": "300"}, "alpha must be a finite number >= 0"),
    ({"harmful_refs": []}, "harmful_refs: no records"),
    ({"harmless_refs": []}, "harmless_refs: no records"),
    ({"harmful_refs": None}, "harmful_refs: expected a list of records"),
    ({"harmless_refs": [{"instruction": "hi"}]}, "harmless_refs: record 1 needs string fields"),
    ({"harmful_refs": HARMFUL + [{"instruction": "x", "output": "y"}], "sink_pos": 25},
     r"harmful_refs: record 5 has 2\d tokens \(within max_ref_len 256\), none after sink_pos 25"),
    ({"harmful_refs": [[5, 6, 7], [5]], "sink_pos": 0}, "harmful_refs: record 2 has 1 tokens"),
    ({"harmful_refs": [[5, 6, 10 ** 6]]}, "outside the model's 259 embeddings"),
    ({"harmful_refs": "/nonexistent/refs.jsonl"}, "/nonexistent/refs.jsonl"),
    ({"ref_batch": 0}, "ref_batch must be an integer >= 1"),
    ({"sink_pos": 4, "max_ref_len": 5}, "max_ref_len 5 leaves no token after sink_pos 4"),
])
def test_bad_arguments_are_one_error_at_construction(tmp_path, kwargs, message):
    with pytest.raises(SurgeryConfigError, match=message) as error:
        trainer(tmp_path, **kwargs)
    assert isinstance(error.value, ValueError) and isinstance(error.value, surgery.UserError)
    assert "\n" not in str(error.value)


def test_a_model_outside_the_attention_interface_is_refused(tmp_path):
    model, tokenizer = tiny_model("llama")

    class Legacy(type(model)):
        _supports_attention_backend = False
    model.__class__ = Legacy
    with pytest.raises(SurgeryConfigError, match="does not go through transformers' attention interface"):
        trainer(tmp_path, model=(model, tokenizer))


def test_records_need_a_tokenizer_with_a_chat_template(tmp_path):
    model, tokenizer = tiny_model("llama")
    with pytest.raises(SurgeryConfigError, match="pass processing_class=tokenizer"):
        SurgeryTrainer(model=model, args=arguments(tmp_path), harmful_refs=HARMFUL, harmless_refs=HARMLESS)
    tokenizer.chat_template = None
    with pytest.raises(SurgeryConfigError, match="no chat template"):
        SurgeryTrainer(model=model, args=arguments(tmp_path), processing_class=tokenizer, harmful_refs=HARMFUL,
                       harmless_refs=HARMLESS)


def test_reentrant_activation_checkpointing_is_refused(tmp_path):
    with pytest.raises(SurgeryConfigError, match="reentrant"):
        trainer(tmp_path, args=arguments(tmp_path, activation_checkpointing=True,
                                         activation_checkpointing_kwargs={"use_reentrant": True}))


def test_references_from_files_and_token_ids(tmp_path):
    import json
    path = tmp_path / "harmful.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["instruction"], "response": r["output"]}) + "\n"
                            for r in HARMFUL))
    from_file = trainer(tmp_path, harmful_refs=str(path))
    from_list = trainer(tmp_path)
    assert from_file.reference_ids == from_list.reference_ids
    from_ids = trainer(tmp_path, harmful_refs=from_list.reference_ids[0], harmless_refs=from_list.reference_ids[1])
    assert from_ids.reference_ids == from_list.reference_ids


def test_lazy_import_from_surgery():
    assert surgery.SurgeryTrainer is SurgeryTrainer and surgery.SurgeryMixin is SurgeryMixin
    assert issubclass(SurgeryTrainer, transformers.Trainer) and surgery_trainer.SurgeryTrainer is SurgeryTrainer
