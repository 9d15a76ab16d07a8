"""Scale: what lets surgery.py's loop run the paper's setting (an 8B model, every weight trained, several GPUs)
without changing the method. The method calls it in one line where it must, with a comment saying why.

    start / stop            the process group under torchrun (nccl on GPUs, gloo on CPUs)
    world / device_for      this process's rank, the number of processes, its device
    step_autocast           bf16 autocast for fp32 weights on a GPU
    rank_micro_batches      this rank's share of a step's batch, split into micro-batches
    data_parallel_loss      what each rank back-propagates so that the averaged gradient is one process's
    sum_over_ranks          logged values summed (task loss) or averaged (penalty) over the ranks
    distribute / unwrap     DDP (LoRA: replicated weights) or FSDP2 (--full: sharded weights); the plain model
    gradient_sync           gradients reduced on a step's last micro-batch only
    enable_activation_checkpointing, full_value, full_model_state, training_state, load_training_state
"""
import contextlib
import os
from collections import namedtuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from common import UserError

World = namedtuple("World", "rank size")


def start(args):
    """Join torchrun's process group if there is one; True when this process must leave it at the end (stop)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    return True


def stop(started):
    if started:
        dist.destroy_process_group()


def world():
    return World(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else World(0, 1)


def device_for(args):
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() and
                        args.device != "cpu" else "cpu")


def step_autocast(model, args):
    """fp32 weights on a GPU compute in bf16 (the sink values and losses are summed in fp32 regardless)."""
    if model.device.type == "cuda" and args.dtype == "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rank_micro_batches(indices, world, grad_accum):
    """This rank's examples of a step, in up to `grad_accum` micro-batches, and each micro-batch's weight. A rank
    whose share of a small last batch is empty still runs one forward and backward (weight 0): data parallelism
    needs every rank in every collective."""
    shares = [micro for micro in (indices[world.rank::world.size][k::grad_accum] for k in range(grad_accum))
              if micro]
    return (shares, [1.0] * len(shares)) if shares else ([indices[:1]], [0.0])


def data_parallel_loss(rank_share, same_on_every_rank, world_size):
    """DDP and FSDP2 average the ranks' gradients; the step's gradient is the sum of the ranks' task shares plus
    the terms every rank computes whole (the penalty on the shared reference draw): each rank back-propagates
    world_size * its share + the shared terms."""
    return world_size * rank_share + same_on_every_rank


def sum_over_ranks(stats, world_size):
    """[task loss sum, penalty, positive heads] for the log: the task loss summed over the ranks, the rest (the same
    on every rank) averaged."""
    if world_size > 1:
        dist.all_reduce(stats)
        stats[1:] /= world_size
    return stats


def decoder_layers(model):
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise UserError("FSDP2 needs the decoder layers at model.base_model.layers (Llama, Qwen2, Mistral, ...)")
    return layers


def distribute(objective, args, world_size, device):
    """The objective as the loop calls it: wrapped in DDP (LoRA: replicated weights, gradients all-reduced) or with
    the model sharded by FSDP2 (--full: each decoder layer, then the root, so weights, gradients and optimizer
    state are split over the ranks). One process: unchanged."""
    if world_size == 1:
        return objective
    if args.full:
        for layer in decoder_layers(objective.model):
            fully_shard(layer)
        fully_shard(objective.model)
        return objective
    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(objective):
    """The objective inside a DDP wrapper (or the objective itself)."""
    return objective.module if isinstance(objective, DistributedDataParallel) else objective


def gradient_sync(objective, last):
    """Gradients are reduced across ranks on the step's last micro-batch only."""
    if isinstance(objective, DistributedDataParallel):
        return objective.no_sync() if not last else contextlib.nullcontext()
    if isinstance(objective.model, FSDPModule):
        objective.model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def enable_activation_checkpointing(model, context_fn):
    """Keep only each decoder layer's input; recompute the rest during backward (non-reentrant, so gradients reach
    the sink columns, which leave a layer outside its outputs). context_fn: surgery.sink_replay_contexts."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": context_fn})


def full_value(tensor):
    """A plain tensor from a possibly sharded one (FSDP2 gives DTensors, e.g. the gradient norm)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_model_state(model):
    """The whole model's weights on the CPU (gathered from the shards under FSDP2), each shared tensor once."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None
    if tied:
        output = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        state.pop(f"{output}.weight", None)
    return state


def training_state(model, optimizer):
    """The trainable weights and the optimizer state, gathered in full on the CPU (a collective under FSDP2)."""
    weights, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # a frozen tied copy slips in among the trainable weights
    return {name: w for name, w in weights.items() if name in trainable}, optimizer_state


def load_training_state(model, optimizer, weights, optimizer_state):
    """training_state's output back into the (possibly sharded) model and optimizer."""
    if all(isinstance(k, int) for k in optimizer_state.get("state", {})):  # a one-process checkpoint of before
        model.load_state_dict(weights, strict=False)                        # the state-dict API: still resumes
        optimizer.load_state_dict(optimizer_state)
    else:
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
