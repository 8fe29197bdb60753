"""The alternatives a user has, as raw training loops: plain, checkpointing, save_on_cpu, ZeRO, FSDP2.

Each peer trains the workload's own nn.Module on its fixed batch for ``n`` steps and returns the clock that
timed each step and kept its loss. Mixed precision is bf16 autocast over fp32 master weights on CUDA (DeepSpeed
and FSDP2 use their own bf16 machinery, as their users would), plain fp32 on a CPU.

Under ``torchrun`` (``run.py --devices N``) each is data parallel over the process group's N ranks, as its
users would run it: the raw loops (plain, checkpoint, save_on_cpu) in ``DistributedDataParallel``, ZeRO with
DeepSpeed's own data parallelism, FSDP2 sharding over all N.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from torch import nn

from benchmarks.measure import StepClock, timed_loop
from benchmarks.parallel import init_group, world_size
from benchmarks.workloads import Workload, flat_weights

Forward = Callable[[], ContextManager]


def _autocast(device: torch.device) -> ContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def plain(w: Workload, device: torch.device, n: int, forward_ctx: Forward = nullcontext) -> StepClock:
    """Everything on the device; ``forward_ctx`` wraps the forward (the peers below reuse this loop). In a
    process group of several ranks, the model is wrapped in ``DistributedDataParallel``."""
    model = w.model.to(device)
    if world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = w.optimizer(model.parameters(), device)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(device), forward_ctx():
            loss = w.loss(model, w.batch)
        loss.backward()
        opt.step()
        return loss.detach()

    return timed_loop(step, n, device)


class Checkpointed(nn.Module):
    """Recompute ``inner`` in backward instead of keeping its activations (non-reentrant checkpoint)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def _conv_stages(features: nn.Sequential) -> list[nn.Sequential]:
    """VGG's conv stack cut after each max-pool: the natural unit to checkpoint."""
    stages, current = [], []
    for layer in features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(nn.Sequential(*current))
            current = []
    return stages + ([nn.Sequential(*current)] if current else [])


def _units(w: Workload) -> nn.Module:
    """The model's repeated units, in place: GPT's blocks, a Llama's decoder layers; VGG's conv stages
    (``features`` regrouped)."""
    if w.family == "gpt":
        return w.model.blocks
    if w.family == "hf_llama":
        from benchmarks.hf_workloads import blocks

        return blocks(w.model)
    w.model.features = nn.Sequential(*_conv_stages(w.model.features))
    return w.model.features


def checkpoint(w: Workload, device: torch.device, n: int) -> StepClock:
    """Per-block (GPT) or per-conv-stage (VGG) activation checkpointing."""
    units = _units(w)
    for i, unit in enumerate(units):
        units[i] = Checkpointed(unit)
    return plain(w, device, n)


def _runs(layers: list[nn.Module], count: int) -> list[nn.Module]:
    """``layers`` in ``count`` runs of about equal length, each recomputed under a checkpoint, as
    ``checkpoint_sequential`` cuts them, but a run never starts with an in-place layer (VGG's ReLU(inplace=True)
    would change the run's saved input: the cut moves past it)."""
    cuts, size = [0], len(layers) / count
    for k in range(1, count):
        cut = max(round(k * size), cuts[-1] + 1)
        while cut < len(layers) and getattr(layers[cut], "inplace", False):
            cut += 1
        if cut < len(layers):
            cuts.append(cut)
    return [Checkpointed(nn.Sequential(*layers[a:b])) for a, b in zip(cuts, cuts[1:] + [len(layers)])]


def checkpoint_sequential(w: Workload, device: torch.device, n: int) -> StepClock:
    """``checkpoint_sequential`` over the chain of layers, in round(sqrt(n)) segments: VGG's conv trunk by leaf
    module (no repeated blocks), GPT's blocks."""
    if w.family == "gpt":
        blocks = list(w.model.blocks)
        w.model.blocks = nn.ModuleList(_runs(blocks, max(1, round(len(blocks) ** 0.5))))
    elif w.family == "vgg":
        layers = list(w.model.features)
        w.model.features = nn.Sequential(*_runs(layers, max(1, round(len(layers) ** 0.5))))
    else:
        raise NotImplementedError(f"checkpoint_sequential needs a chain of layers (GPT's blocks, VGG's trunk); "
                                  f"{w.name} has none here (use 'checkpoint').")
    return plain(w, device, n)


def hf_checkpoint(w: Workload, device: torch.device, n: int) -> StepClock:
    """``transformers``' own checkpointing, as its users turn it on: ``gradient_checkpointing_enable`` (named
    ``activation_checkpointing_enable`` in newer versions; ``lightning_vdnn.examples.hf_tasks.enable_checkpointing`` picks),
    non-reentrant like ``checkpoint``."""
    if not hasattr(w.model, "gradient_checkpointing_enable"):
        raise NotImplementedError(f"hf_checkpoint is transformers' checkpointing; {w.name} is not a transformers model "
                                  "(use 'checkpoint').")
    from lightning_vdnn.examples.hf_tasks import enable_checkpointing

    enable_checkpointing(w.model)
    return plain(w, device, n)


def save_on_cpu(w: Workload, device: torch.device, n: int) -> StepClock:
    """Every saved activation to host memory (pinned on CUDA; pinning needs a GPU)."""
    pin = device.type == "cuda"
    return plain(w, device, n, forward_ctx=lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin))


def _deepspeed(w: Workload, device: torch.device, n: int, zero: dict) -> StepClock:
    import deepspeed

    init_group(device)
    flat_weights(w.model)
    config = {
        "train_micro_batch_size_per_gpu": w.batch[0].shape[0], "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True}, "optimizer": w.ds_optimizer, "zero_optimization": zero,
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=w.model, model_parameters=w.model.parameters(), config=config)
    batch = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in w.batch)  # bf16 weights

    def step() -> torch.Tensor:
        loss = w.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return timed_loop(step, n, device)


_OFFLOAD = {"device": "cpu", "pin_memory": True}


def zero3_offload(w: Workload, device: torch.device, n: int) -> StepClock:
    """DeepSpeed ZeRO-3, parameters and optimizer state (DeepSpeedCPUAdam for AdamW) in pinned host memory."""
    return _deepspeed(w, device, n, {"stage": 3, "offload_param": _OFFLOAD, "offload_optimizer": _OFFLOAD})


def zero2_offload(w: Workload, device: torch.device, n: int) -> StepClock:
    """DeepSpeed ZeRO-2, optimizer state and step on the host; parameters and gradients on the device."""
    return _deepspeed(w, device, n, {"stage": 2, "offload_optimizer": _OFFLOAD})


def fsdp2_offload(w: Workload, device: torch.device, n: int) -> StepClock:
    """FSDP2 ``fully_shard`` per block and at the root with ``CPUOffloadPolicy``, sharded over every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    init_group(device)
    cuda = device.type == "cuda"
    flat_weights(w.model)
    mesh = init_device_mesh(device.type, (world_size(),))
    kwargs = dict(mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=cuda),
                  mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None,
                                                 reduce_dtype=torch.float32 if cuda else None))
    for unit in _units(w):
        fully_shard(unit, **kwargs)
    model = fully_shard(w.model, **kwargs)
    opt = w.optimizer(model.parameters(), torch.device("cpu"))  # the sharded fp32 weights live on the host

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = w.loss(model, w.batch)
        loss.backward()
        opt.step()
        return loss.detach()

    return timed_loop(step, n, device)


def plain_accum8(w: Workload, device: torch.device, n: int) -> StepClock:
    """Gradient accumulation as users write it: the step's batch in 8 chunks, backward after each, one
    optimizer step (``w`` carries the 8 batches, see ``workloads.repeated``)."""
    model = w.model.to(device)
    opt = w.optimizer(model.parameters(), device)
    chunks = list(zip(*(t.chunk(8) for t in w.batch)))

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in chunks:
            with _autocast(device):
                loss = w.loss(model, chunk) / len(chunks)
            loss.backward()
            total += loss.detach()
        opt.step()
        return total

    return timed_loop(step, n, device)


PEERS = {"plain": plain, "plain_accum8": plain_accum8, "checkpoint": checkpoint, "hf_checkpoint": hf_checkpoint,
         "checkpoint_sequential": checkpoint_sequential,
         "save_on_cpu": save_on_cpu, "zero3_offload": zero3_offload, "zero2_offload": zero2_offload,
         "fsdp2_offload": fsdp2_offload}


def run_peer(name: str, w: Workload, device: torch.device, n: int) -> StepClock:
    """The clock of peer ``name``: each step's time and loss."""
    return PEERS[name](w, device, n)
