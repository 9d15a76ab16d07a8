"""bench/memory_plan.py against real models: parameter counts, weight / gradient / AdamW bytes (one process and
sharded by FSDP2 as surgery.py shards), and the per-layer activation formulas against what autograd saves."""
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import memory_plan as mp  # noqa: E402
import scale  # noqa: E402
import surgery  # noqa: E402
from tiny import tiny_config  # noqa: E402


def shape_of(config):
    return mp.Shape(config.to_dict())


def plan(config, mode, gpus=(1,), *argv):
    return mp.plan_rows(shape_of(config) if not isinstance(config, mp.Shape) else config, mode, list(gpus),
                        mp.build_parser().parse_args(list(argv)))


def test_llama3_8b_parameter_count_from_config_and_from_transformers():
    assert mp.parameter_counts(mp.Shape(mp.LLAMA3_8B))["total"] == 8_030_261_248
    from transformers import LlamaConfig
    config = LlamaConfig(**{k: v for k, v in mp.LLAMA3_8B.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("qwen2", {}), ("mistral", {}),
                                              ("llama", {"attention_bias": True, "mlp_bias": True,
                                                         "tie_word_embeddings": False})])
def test_weight_bytes_equal_a_real_model(family, overrides):
    """Tied and untied heads, Qwen2's q/k/v biases, Llama's optional biases: the plan's weights are the model's."""
    config = tiny_config(family, **overrides)
    for dtype, mode in ((torch.bfloat16, "full-bf16"), (torch.float32, "full-fp32")):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        real = sum(p.numel() * p.element_size() for p in model.parameters())
        assert plan(config, mode)[0]["weights"] == real


def adamw_state_bytes(optimizer):
    """Both moments of every parameter (the per-parameter `step` scalar is not counted)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for k, v in state.items()
               if k in ("exp_avg", "exp_avg_sq"))


def one_step(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 200, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def test_one_process_gradient_and_adamw_bytes_equal_real_training():
    config = tiny_config("mistral")
    for dtype, mode in ((torch.bfloat16, "full-bf16"), (torch.float32, "full-fp32")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        optimizer = one_step(model)
        row = plan(config, mode)[0]
        assert row["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        assert row["optimizer"] == adamw_state_bytes(optimizer)
        assert row["buffers"] == 0
    # LoRA with --dtype bf16: frozen bf16 weights, fp32 adapters with fp32 gradients and moments.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(torch.bfloat16)
    surgery.add_lora(model, {"q_proj", "k_proj", "v_proj", "o_proj"}, 8, 16.0, 0.0)
    optimizer = one_step(model)
    row = plan(config, "lora-bf16", (1,), "--lora-rank", "8")[0]
    assert row["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert row["grads"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                               if p.grad is not None)
    assert row["optimizer"] == adamw_state_bytes(optimizer)


def test_the_optimizer_steps_temporary_is_one_second_moment():
    """AdamW as torch picks it on CUDA (foreach) allocates one temporary per parameter, the size of its second
    moment, within its step: the plan's "step" column; the totals take the larger of it and the activations."""
    from torch.profiler import ProfilerActivity, profile
    config = tiny_config("mistral")
    for dtype, mode in ((torch.bfloat16, "full-bf16"), (torch.float32, "full-fp32")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, foreach=True)
        for step in range(2):  # the second step: the moments exist before it starts
            for p in params:
                p.grad = torch.randn_like(p)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                optimizer.step()
        allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.self_cpu_memory_usage > 0)
        row = plan(config, mode)[0]
        assert row["step"] == sum(p.numel() * p.element_size() for p in params)
        assert row["step"] <= allocated <= row["step"] + 4096  # plus a few scalars
        assert row["total_ckpt"] == row["weights"] + row["grads"] + row["optimizer"] + max(row["act_ckpt"],
                                                                                           row["step"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_worker(rank, world_size, port, result_dir):
    """surgery.py's sharding (distribute, --full) of a tiny bf16 model; this rank's bytes after one AdamW step."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mistral", vocab_size=260), dtype=torch.bfloat16)
    args = surgery.parse_args(["--full", "--dtype", "bf16"])
    scale.distribute(surgery.Objective(model, args, None, world_size), args, world_size, torch.device("cpu"))
    optimizer = one_step(model)
    local = [p.to_local() for p in model.parameters()]
    grads = [p.grad.to_local() for p in model.parameters()]
    torch.save({"weights": sum(t.numel() * t.element_size() for t in local),
                "grads": sum(t.numel() * t.element_size() for t in grads),
                "optimizer": sum(v.to_local().numel() * v.element_size() for s in optimizer.state.values()
                                 for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))},
               f"{result_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_fsdp2_divides_weights_gradients_and_adamw_exactly(tmp_path):
    """Every dimension 0 of this model divides by 2, so FSDP2's shards are exact halves: the plan's figures."""
    world_size = 2
    torch.multiprocessing.spawn(fsdp_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size)
    row1, row2 = plan(tiny_config("mistral", vocab_size=260), "full-bf16", (1, 2))
    for rank in range(world_size):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got == {"weights": row2["weights"], "grads": row2["grads"], "optimizer": row2["optimizer"]}
    assert (row2["weights"] * 2, row2["grads"] * 2, row2["optimizer"] * 2) == (
        row1["weights"], row1["grads"], row1["optimizer"])


def saved_bytes_by_layer(model, run):
    """Bytes of the distinct storages autograd saves during run(), by decoder layer ('rest': outside the
    layers); parameters (and views of them) are not activations."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, per, current = set(), {}, ["rest"]
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, "rest"))

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            per[current[0]] = per.get(current[0], 0) + storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return per


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("reference", [False, True])
def test_layer_activation_formula_matches_what_autograd_saves(mode, reference):
    """Layer 1 (layer 0 also holds the tensors every layer shares: rotary tables, the mask) of a tiny bf16 Llama
    with surgery.py's attention, a padded task batch (dropout on) or an unpadded reference (sink recorded)."""
    torch.manual_seed(0)
    config = tiny_config("llama", tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                             attn_implementation=surgery.SINK_ATTENTION)
    if mode == "full":
        model.requires_grad_(True)
    else:
        surgery.add_lora(model, {"q_proj", "k_proj", "v_proj", "o_proj"}, 8, 16.0, 0.05)
    model.train()
    batch_size, length = (1, 40) if reference else (3, 24)
    ids = torch.randint(0, 250, (batch_size, length))
    mask = torch.ones_like(ids)
    if not reference:
        mask[0, -5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def run():
        if reference:
            with surgery.without_dropout(model):
                surgery.sink_sums(model, batch, 0)
        else:
            surgery.task_loss_sum(model, batch)
    measured = saved_bytes_by_layer(model, run)
    s = shape_of(config)
    tokens = batch_size * length
    assert measured[1] == mp.layer_activation_bytes(s, tokens, length, mode, reference, padded=not reference,
                                                    lora_rank=8, mask_bytes=2)
    if not reference:  # outside the layers: the formula, plus token ids and targets (int64) and small masks
        answers = int((batch["labels"][:, 1:] != -100).sum())
        formula = mp.outside_layers_bytes(s, tokens, answers, mode, False)
        assert 0 <= measured["rest"] - formula <= 24 * tokens


def test_checkpointing_and_more_gpus_lower_the_8b_plan_and_the_command_line_prints_it(capsys):
    rows = plan(mp.Shape(mp.LLAMA3_8B), "full-bf16", (1, 2, 4, 8))
    assert [r["micro_batch"] for r in rows] == [10, 5, 3, 2]
    assert all(r["act_ckpt"] < r["act_plain"] for r in rows)
    assert [r["total_ckpt"] for r in rows] == sorted((r["total_ckpt"] for r in rows), reverse=True)
    # Pure bf16 on one GPU: 8 bytes per parameter before activations.
    assert rows[0]["weights"] + rows[0]["grads"] + rows[0]["optimizer"] == 8 * 8_030_261_248
    mp.main(["--mode", "full-bf16", "--gpus", "8"])
    out = capsys.readouterr().out
    assert "8,030,261,248 parameters" in out
    assert out.strip().splitlines()[-1].split()[:2] == ["8", "2"]


def test_config_file(tmp_path, capsys):
    config = tiny_config("qwen2")
    config.save_pretrained(tmp_path)
    mp.main(["--config", str(tmp_path), "--mode", "lora-bf16"])
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert f"{real:,} parameters" in capsys.readouterr().out
