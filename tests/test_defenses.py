"""defenses/: AsFT, SafetyLock and SAP against hand-computed cases, and a tiny end-to-end run of each."""
import json
import math
import os
import time

import pytest
import torch

import surgery
from conftest import ctrl_c_at_step, run_args, write_jsonl
from defenses import asft, read_triples, safetylock, sap
from common import UserError
from tiny import save_tiny, tiny_model

TRIPLES = [{"instruction": f"Tell me how to do harmful thing {i}.",
            "refusal": ["I'm sorry, I can't help with that.", "I cannot assist with this request."][i % 2],
            "harmful_answer": f"Sure! Step one of harmful thing {i}: get the tools, then do it quietly."}
           for i in range(8)]


def loop_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# --- AsFT ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("V, expected", [
    ([[1.0, 0.0], [0.0, 0.0]], 100.0),   # C = diag(1, 0): only the second row of BA = [[3, 4], [6, 8]] is outside
    ([[0.0, 0.0], [0.0, 3.0]], 425.0),   # C = diag(0, 9) / 3: (I - C) BA = [[3, 4], [-12, -16]], not a projection
    ([[0.0, 0.0], [0.0, 0.0]], 125.0),   # no alignment direction: C = 0, the whole ||BA||^2
])
def test_asft_penalty_hand_computed(V, expected):
    V = torch.tensor(V)
    B, A = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0]])
    assert asft.outside_alignment_penalty(V, float(V.norm()), B, A).item() == pytest.approx(expected)


def test_asft_penalty_and_gradient_match_the_dense_formula():
    torch.manual_seed(0)
    out_dim, in_dim, rank = 7, 5, 3
    V = torch.randn(out_dim, in_dim, dtype=torch.float64)
    B = torch.randn(out_dim, rank, dtype=torch.float64, requires_grad=True)
    A = torch.randn(rank, in_dim, dtype=torch.float64, requires_grad=True)
    C = V @ V.T / V.norm()  # the released code's d x d matrix
    dense = ((torch.eye(out_dim, dtype=torch.float64) - C) @ B @ A).pow(2).sum()
    dense_grads = torch.autograd.grad(dense, (B, A))
    fast = asft.outside_alignment_penalty(V, float(V.norm()), B, A)
    fast_grads = torch.autograd.grad(fast, (B, A))
    assert fast.item() == pytest.approx(dense.item(), rel=1e-12)
    for g_fast, g_dense in zip(fast_grads, dense_grads):
        assert torch.allclose(g_fast, g_dense, rtol=1e-10, atol=1e-12)


def test_unanchored_asft_is_lambda_times_the_update_norm():
    model, _ = tiny_model()
    surgery.add_lora(model, {"q_proj", "v_proj"}, rank=2, lora_alpha=4, dropout=0.0)
    torch.manual_seed(3)
    with torch.no_grad():
        for module in surgery.lora_modules(model).values():
            module.lora_B.normal_()  # B starts at zero: give the update a size
    ablation = asft.UnanchoredAsFT(lam=0.5)
    ablation.setup(model, None, None)
    expected = 0.5 * sum((m.lora_B @ m.lora_A).pow(2).sum() for m in surgery.lora_modules(model).values())
    assert len(ablation.anchors) == 2 * model.config.num_hidden_layers
    assert ablation.extra_loss(model, 0).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.fixture(scope="module")
def aligned_folder(tmp_path_factory, tiny_run_inputs):
    """The tiny model with its attention weights moved: an 'aligned' model whose base is the tiny model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = tmp_path_factory.mktemp("aligned") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_run_inputs["model"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "self_attn" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_run_inputs["model"]).save_pretrained(folder)
    return folder


def test_asft_run_ends_with_a_far_smaller_penalty_than_sft(tmp_path, tiny_run_inputs, aligned_folder):
    inputs = dict(tiny_run_inputs, model=str(aligned_folder))
    loop = ("--max-steps", "4", "--lora-dropout", "0", "--lr", "1e-2", "--lora-targets", "q_proj,v_proj")
    plain, _ = surgery.main(run_args(inputs, tmp_path / "sft", "--alpha", "0", *loop))
    anchored, _ = asft.main(["--base", tiny_run_inputs["model"], "--lambda", "1e3", "--",
                             *run_args(inputs, tmp_path / "asft", *loop)])
    base = asft.read_weights(tiny_run_inputs["model"], [f"model.layers.{i}.self_attn.{p}.weight"
                                                        for i in range(2) for p in ("q_proj", "v_proj")])
    aligned = asft.read_weights(aligned_folder, list(base))

    def penalty(adapter):  # the AsFT penalty of a finished run's adapter, from the dense formula
        total = 0.0
        for key in base:
            V = (aligned[key] - base[key]).double()
            prefix = f"base_model.model.{key.removesuffix('.weight')}"
            BA = adapter[f"{prefix}.lora_B.weight"].double() @ adapter[f"{prefix}.lora_A.weight"].double()
            total += ((torch.eye(len(V), dtype=V.dtype) - V @ V.T / V.norm()) @ BA).pow(2).sum().item()
        return total
    assert penalty(anchored) < 0.2 * penalty(plain)
    log = loop_log(tmp_path / "asft")
    assert log[0]["extra_loss"] == 0.0 and log[-1]["extra_loss"] > 0  # B = 0 at the start
    assert "sink_loss" in log[0] and "sink_loss" not in log[1]  # --alpha 0: Surgery's term is off


def test_asft_reads_only_the_named_weights_from_single_or_sharded_checkpoints(tmp_path, tiny_run_inputs):
    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    names = ["model.layers.1.self_attn.v_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    single, sharded = asft.read_weights(tiny_run_inputs["model"], names), asft.read_weights(tmp_path / "sharded", names)
    assert list(single) == names and all(torch.equal(single[n], sharded[n]) for n in names)
    assert torch.equal(single[names[0]], model.get_submodule(names[0].removesuffix(".weight")).weight)
    with pytest.raises(UserError, match="no tensor model.layers.0.mlp.w"):
        asft.read_weights(tmp_path / "sharded", ["model.layers.0.mlp.w"])


def test_asft_refuses_a_model_that_is_not_the_aligned_one(tmp_path, tiny_run_inputs, aligned_folder, capsys):
    argv = ["--base", tiny_run_inputs["model"], "--aligned", str(aligned_folder), "--",
            *run_args(tiny_run_inputs, tmp_path / "out", "--max-steps", "1")]  # fine-tunes the base instead
    with pytest.raises(SystemExit) as exit_info:
        asft.main(argv)
    assert exit_info.value.code == 2
    assert "differs from" in capsys.readouterr().err
    with pytest.raises(UserError, match="no such model folder"):
        asft.AsFT(None, tmp_path / "nowhere")
    with pytest.raises(UserError, match="no model.safetensors"):
        asft.read_weights(tmp_path, ["x"])


# --- SAP ----------------------------------------------------------------------------------------------------------

def test_contrastive_safety_loss_values():
    assert sap.contrastive_safety_loss(torch.tensor([2.0]), torch.tensor([2.0])).item() == pytest.approx(math.log(2))
    loss = sap.contrastive_safety_loss(torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -5.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2)


def test_rescaled_loss_has_the_contrastive_gradient_direction_without_underflow():
    margins = torch.tensor([1.0, -2.0, 4.0], requires_grad=True)
    exact = torch.autograd.grad(sap.contrastive_safety_loss(margins, torch.zeros(3)), margins)[0]
    rescaled = torch.autograd.grad(sap.rescaled_contrastive_loss(margins), margins)[0]
    assert torch.allclose(rescaled / rescaled.norm(), exact / exact.norm())
    # A refusal 200 nats likelier than the harmful answer: the plain gradient is exactly zero in fp32.
    far = torch.tensor([200.0, 150.0], requires_grad=True)
    assert torch.autograd.grad(sap.contrastive_safety_loss(far, torch.zeros(2)), far)[0].abs().max() == 0
    rescaled = torch.autograd.grad(sap.rescaled_contrastive_loss(far), far)[0]
    assert rescaled[1] < 0 and rescaled[0] < 0 and rescaled[0] / rescaled[1] == pytest.approx(math.exp(-50), rel=1e-3)


def test_answer_logprobs_read_the_whole_prompt_and_answer():
    model, tokenizer = tiny_model("llama")
    pairs = [surgery.encode(tokenizer, {"instruction": t["instruction"], "output": t[key]}, 512)
             for t in TRIPLES[:2] for key in ("refusal", "harmful_answer")]
    batch = surgery.pad_batch([ids for ids, _ in pairs], tokenizer.pad_token_id, [labels for _, labels in pairs])
    got = sap.answer_logprobs(model, batch)
    for row, (ids, labels) in enumerate(pairs):  # one unpadded sequence at a time, every position's logits
        logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        expected = sum(logprobs[t, ids[t + 1]] for t in range(len(ids) - 1) if labels[t + 1] != -100)
        assert got[row].item() == pytest.approx(expected.item(), rel=1e-5)


def test_perturbation_has_radius_rho_theta_along_the_safety_gradient():
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(5)]
    grads = [torch.randn(4, 3), torch.randn(5)]
    delta = sap.unsafe_perturbation(params, grads, rho=0.1)
    norm = lambda ts: torch.sqrt(sum((t ** 2).sum() for t in ts))  # noqa: E731
    assert norm(delta).item() == pytest.approx(0.1 * norm(params).item(), rel=1e-6)
    cosine = sum((d * g).sum() for d, g in zip(delta, grads)) / (norm(delta) * norm(grads))
    assert cosine.item() == pytest.approx(1.0, rel=1e-6)


def test_probe_steps_so_that_the_task_step_also_lowers_the_safety_loss():
    # Toy: theta and v scalars, task loss L = theta^2 / 2 + v theta, safety margin m = -theta (a larger theta
    # makes the harmful answer likelier: the contrastive safety loss grows with theta).
    theta = torch.tensor([2.0], requires_grad=True)
    probe = sap.SafetyProbe([torch.zeros(1)], lr=0.05, rho=0.1)
    v = probe.vectors[0]
    task_loss = lambda: (theta ** 2 / 2 + v * theta).sum()  # noqa: E731
    loss, difference = probe.step([theta], lambda: -theta, task_loss)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(2)))
    # delta = rho |theta| g / |g| = 0.2; dL/dv = theta, so the difference at theta + delta and theta is delta.
    assert difference[0].item() == pytest.approx(0.2)
    assert theta.item() == 2.0  # restored exactly
    assert v.item() == pytest.approx(0.05, rel=1e-4)  # Adam's first step from zero, UP the difference
    # The task gradient with the probe, theta + v, steps theta further down S than without it (theta).
    grad_with_probe = torch.autograd.grad(task_loss(), theta)[0]
    assert grad_with_probe.item() == pytest.approx(2.05) and grad_with_probe.item() > theta.item()
    probe.reset()
    assert v.item() == 0.0


def test_default_probe_layers_scale_the_released_depths():
    assert sap.default_probe_layers(32) == [3, 9]
    assert sap.default_probe_layers(30) == [3, 8]  # SmolLM2-135M
    assert sap.default_probe_layers(2) == [0, 1]


class RecordingSAP(sap.SAP):
    """Records the probe while the loop takes its task gradient."""

    def after_step(self, model, step):
        self.applied = getattr(self, "applied", []) + [[v.clone() for v in self.probe.vectors]]
        super().after_step(model, step)


def test_sap_runs_in_the_loop_and_a_vanishing_probe_is_sft(tmp_path, tiny_run_inputs):
    loop = ("--max-steps", "3", "--lr", "1e-2", "--alpha", "0")  # with dropout: the masks must match SFT's
    plain, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / "sft", *loop))
    probed = RecordingSAP(TRIPLES, safety_batch=2)
    adapter, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / "sap", *loop), defense=probed)
    assert len(probed.applied) == 3
    # Adam's first step from zero: lr |d| / (|d| + eps) per coordinate, below lr = 0.05; here |d| is near eps.
    assert all(0.02 < v.abs().max() < 0.05 for v in probed.applied[0])
    assert all(v.abs().max() > 0.01 for step in probed.applied for v in step)
    assert all(v.abs().max() == 0 for v in probed.probe.vectors)  # nothing left in the exported model
    assert 0 <= probed.last_safety_loss.item() < math.inf  # saturated here: the harmful answers are long
    assert max((adapter[k] - plain[k]).abs().max().item() for k in plain) > 1e-4
    # A probe that barely moves: the same masks, theta restored exactly, so the run is SFT's to rounding.
    vanishing, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / "vanishing", *loop),
                                defense=sap.SAP(TRIPLES, probe_lr=1e-12, safety_batch=2))
    assert max((vanishing[k] - plain[k]).abs().max().item() for k in plain) < 1e-6
    assert [e["task_loss"] for e in loop_log(tmp_path / "vanishing")] == \
        pytest.approx([e["task_loss"] for e in loop_log(tmp_path / "sft")], rel=1e-6)


def test_sap_resume_restores_the_probe_optimizer_bit_for_bit(tmp_path, tiny_run_inputs):
    # The probe restarts from zero every step but its Adam moments carry over: a checkpoint must hold them.
    loop = ("--max-steps", "4", "--save-every", "2", "--lr", "1e-2", "--alpha", "0")
    reference, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / "full", *loop),
                                defense=sap.SAP(TRIPLES, safety_batch=2))
    with ctrl_c_at_step(3), pytest.raises(SystemExit):
        surgery.main(run_args(tiny_run_inputs, tmp_path / "cut", *loop), defense=sap.SAP(TRIPLES, safety_batch=2))
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3 and saved["defense"]["probe_optimizer"]["state"]
    resumed, _ = surgery.main(run_args(tiny_run_inputs, tmp_path / "cut", *loop, "--resume"),
                              defense=sap.SAP(TRIPLES, safety_batch=2))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def sap_ddp_worker(rank, world_size, port, argv, result_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    probed = RecordingSAP(TRIPLES, safety_batch=2)
    surgery.train(surgery.parse_args(argv + ["--out", f"{result_dir}/out"]), defense=probed)
    torch.save(probed.applied, f"{result_dir}/probe{rank}.pt")
    dist.destroy_process_group()


def test_sap_probe_is_the_same_on_every_data_parallel_rank(tmp_path, tiny_run_inputs):
    # Each rank draws its own safety triples and holds its share of the batch; the all-reduces make one probe.
    from test_surgery import free_port
    argv = run_args(tiny_run_inputs, None, "--max-steps", "2", "--alpha", "0", "--lr", "1e-2")
    torch.multiprocessing.spawn(sap_ddp_worker, args=(2, free_port(), argv, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"probe{r}.pt", weights_only=True) for r in (0, 1))
    assert len(rank0) == 2 and all(torch.equal(a, b) for s0, s1 in zip(rank0, rank1) for a, b in zip(s0, s1))
    assert all(v.abs().max() > 0.01 for v in rank0[0])


def test_sap_command_line_and_bad_input(tmp_path, tiny_run_inputs, capsys):
    triples = write_jsonl(tmp_path / "triples.jsonl", TRIPLES)
    sap.main(["--triples", str(triples), "--layers", "1", "--safety-batch", "3", "--",
              *run_args(tiny_run_inputs, tmp_path / "out", "--max-steps", "1")])
    assert len(loop_log(tmp_path / "out")) == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "x", "refusal": "no"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        sap.main(["--triples", str(tmp_path / "bad.jsonl"), "--", *run_args(tiny_run_inputs, tmp_path / "o2")])
    assert exit_info.value.code == 2 and "record 1 needs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        sap.main(["--triples", str(triples), "--layers", "7", "--",
                  *run_args(tiny_run_inputs, tmp_path / "o3", "--max-steps", "1")])
    assert exit_info.value.code == 2 and "probe layers must be in 0..1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        sap.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--triples", "--rho", "--probe-lr", "--layers", "--safety-batch", "--"))


def test_read_triples_accepts_safe_unsafe_aliases(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([{"instruction": "q", "safe": "no", "unsafe": "yes"}]))
    assert read_triples(tmp_path / "t.json") == [{"instruction": "q", "refusal": "no", "harmful_answer": "yes"}]


# --- SafetyLock ---------------------------------------------------------------------------------------------------

def test_directions_sigma_and_bias_hand_computed():
    # Two heads of dimension 2, two samples of each class.
    safe = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[3.0, 1.0], [1.0, 1.0]]])
    unsafe = torch.tensor([[[-1.0, 1.0], [0.0, 0.0]], [[-3.0, 1.0], [0.0, 0.0]]])
    theta, sigma = safetylock.head_directions(safe, unsafe)
    # Head 0: means (2, 1) - (-2, 1) -> theta (1, 0); projections 1, 3, -1, -3 -> std sqrt(5).
    # Head 1: means (1, 1) - (0, 0) -> theta (1, 1)/sqrt(2); projections sqrt(2), sqrt(2), 0, 0 -> std sqrt(2)/2.
    assert torch.allclose(theta, torch.tensor([[1.0, 0.0], [0.5 ** 0.5, 0.5 ** 0.5]]))
    assert torch.allclose(sigma, torch.tensor([5 ** 0.5, 0.5 ** 0.5]))
    W_O = torch.tensor([[1.0, 2.0, 0.0, 1.0], [3.0, 4.0, 1.0, 0.0]])  # hidden 2 x (2 heads * 2)
    displacement = torch.cat([sigma[0] * theta[0], torch.zeros(2)])  # head 0 chosen only
    bias = safetylock.layer_biases(W_O, displacement, alpha=6.0)
    assert torch.allclose(bias, 6 * 5 ** 0.5 * torch.tensor([1.0, 3.0]))


def test_top_heads_by_held_out_probe_accuracy():
    torch.manual_seed(0)
    labels = torch.cat([torch.ones(40), torch.zeros(40)])
    features = torch.randn(3, 80, 4)  # three heads of dimension 4; only head 1 carries the label
    features[1, :, 0] += 3 * (2 * labels - 1)
    w, b = safetylock.fit_probes(features[:, ::2], labels[::2])
    accuracy, loss = safetylock.probe_scores(w, b, features[:, 1::2], labels[1::2])
    assert accuracy[1] == 1.0 and accuracy[0] < 0.8 and accuracy[2] < 0.8
    assert safetylock.top_heads(accuracy, loss, 1) == [1]
    assert safetylock.top_heads(torch.tensor([1.0, 1.0, 0.5]), torch.tensor([0.3, 0.1, 0.0]), 2) == [1, 0]
    assert safetylock.default_head_count(32, 32) == 24 and safetylock.default_head_count(30, 9) == 6


def test_activations_are_o_proj_inputs_at_the_last_answer_tokens():
    model, tokenizer = tiny_model("llama")
    seqs = [safetylock.answer_sequence(tokenizer, "How?", answer, 512) for answer in ("No.", "Sure, like this!")]
    assert tokenizer.decode(seqs[1]).endswith("<|im_start|>assistant\nSure, like this!")  # no end-of-turn
    got = safetylock.head_outputs(model, seqs, positions=3, pad_id=tokenizer.pad_token_id)
    assert got.shape == (2, 3, 2, 4, 16)  # sequence, position, layer, head, head_dim
    for row, ids in enumerate(seqs):  # each alone, no padding
        captured = []
        hooks = [model.get_submodule(f"model.layers.{i}.self_attn.o_proj").register_forward_pre_hook(
            lambda m, args: captured.append(args[0][0, -3:])) for i in range(2)]
        model(input_ids=torch.tensor([ids]))
        for hook in hooks:
            hook.remove()
        assert torch.allclose(got[row], torch.stack(captured, 1).unflatten(-1, (4, 16)), atol=1e-5)


@pytest.fixture(scope="module")
def lock_file(tmp_path_factory, tiny_run_inputs):
    lock = safetylock.build(tiny_run_inputs["model"], TRIPLES, heads=3, positions=2)
    return safetylock.save_lock(tmp_path_factory.mktemp("lock") / "lock.safetensors", lock)


def test_safetylock_builds_a_small_lock_and_applies_it_in_memory(lock_file, tiny_run_inputs):
    lock = safetylock.load_lock(lock_file)
    meta = lock["meta"]
    assert meta["k"] == 3 and len(meta["heads"]) == 3 and meta["alpha"] == 6.0 and meta["triples"] == 8
    assert lock_file.stat().st_size < 4096
    for name, displacement in lock["displacements"].items():  # zero outside the chosen heads' slices
        layer = int(name.split(".")[2])
        chosen = {h["head"] for h in meta["heads"] if h["layer"] == layer}
        for head in range(4):
            assert (displacement[head * 16:(head + 1) * 16].abs().sum() > 0) == (head in chosen)
    model, _ = surgery.load_model(tiny_run_inputs["model"], torch.device("cpu"))
    weights = {name: model.get_submodule(name).weight.clone() for name in lock["displacements"]}
    start = time.perf_counter()
    safetylock.apply(model, lock_file, alpha=2.0)
    assert time.perf_counter() - start < 0.1
    for name, displacement in lock["displacements"].items():
        assert torch.allclose(model.get_submodule(name).bias, weights[name] @ (2.0 * displacement), atol=1e-6)


def test_safetylock_locked_folder_loads_and_matches_the_in_memory_lock(tmp_path, lock_file, tiny_run_inputs):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "locked"
    assert safetylock.main(["apply", "--model", tiny_run_inputs["model"], "--lock", str(lock_file),
                            "--out", str(out)]) == 0
    locked = AutoModelForCausalLM.from_pretrained(out)
    assert locked.config.attention_bias
    in_memory = safetylock.apply(tiny_model("llama")[0], lock_file)
    unlocked = tiny_model("llama")[0]
    ids = torch.tensor([[257, 65, 66, 67, 258, 68]])
    assert torch.allclose(locked(ids).logits, in_memory(ids).logits, atol=1e-5)
    assert (locked(ids).logits - unlocked(ids).logits).abs().max() > 1e-3
    assert json.loads((out / "safetylock.json").read_text())["alpha"] == 6.0
    assert (out / "tokenizer.json").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    # Applying again replaces the folder; locking a locked model is refused.
    safetylock.apply(tiny_run_inputs["model"], lock_file, out, alpha=1.0)
    assert json.loads((out / "safetylock.json").read_text())["alpha"] == 1.0
    with pytest.raises(UserError, match="already locked"):
        safetylock.apply(out, lock_file, tmp_path / "twice")


def test_safetylock_refuses_other_families_and_bad_files(tmp_path, lock_file, capsys):
    qwen = save_tiny(tmp_path / "qwen", "qwen2")
    with pytest.raises(UserError, match="not of the lock's model family"):
        safetylock.apply(qwen, lock_file, tmp_path / "out")
    deeper = save_tiny(tmp_path / "deeper", "llama", num_hidden_layers=3)
    with pytest.raises(UserError, match="num_hidden_layers"):
        safetylock.apply(deeper, lock_file, tmp_path / "out")
    (tmp_path / "junk.safetensors").write_bytes(b"not a lock")
    for lock in (tmp_path / "nothing", tmp_path / "junk.safetensors"):
        with pytest.raises(SystemExit) as exit_info:
            safetylock.main(["apply", "--model", str(deeper), "--lock", str(lock), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("defenses.safetylock: error:") == 2
    assert not (tmp_path / "out").exists()
    # Qwen2 has no config flag for an o_proj bias: its lock works in memory, not as a folder.
    qwen_lock = safetylock.build(qwen, TRIPLES[:4], heads=1, positions=2)
    with pytest.raises(UserError, match="cannot hold an o_proj bias"):
        safetylock.apply(qwen, qwen_lock, tmp_path / "out")
    name = next(iter(qwen_lock["displacements"]))
    assert safetylock.apply(tiny_model("qwen2")[0], qwen_lock).get_submodule(name).bias.abs().max() > 0
    assert not (tmp_path / "out").exists()
