"""The alternatives a user has, as raw training loops: plain, checkpointing, save_on_cpu, ZeRO, FSDP2.

Each peer trains the workload's own nn.Module on its fixed batch for ``n`` steps and returns the time of each
step. Mixed precision is bf16 autocast over fp32 master weights on CUDA (DeepSpeed and FSDP2 use their own
bf16 machinery, as their users would), plain fp32 on a CPU.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from torch import nn

from benchmarks.measure import timed_loop
from benchmarks.workloads import Workload

Forward = Callable[[], ContextManager]


def _autocast(device: torch.device) -> ContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def plain(w: Workload, device: torch.device, n: int, forward_ctx: Forward = nullcontext) -> list[float]:
    """Everything on the device; ``forward_ctx`` wraps the forward (the peers below reuse this loop)."""
    model = w.model.to(device)
    opt = w.optimizer(model.parameters(), device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device), forward_ctx():
            loss = w.loss(model, w.batch)
        loss.backward()
        opt.step()

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
    """The model's repeated units, in place: GPT's blocks; VGG's conv stages (``features`` regrouped)."""
    if w.family == "gpt":
        return w.model.blocks
    w.model.features = nn.Sequential(*_conv_stages(w.model.features))
    return w.model.features


def checkpoint(w: Workload, device: torch.device, n: int) -> list[float]:
    """Per-block (GPT) or per-conv-stage (VGG) activation checkpointing."""
    units = _units(w)
    for i, unit in enumerate(units):
        units[i] = Checkpointed(unit)
    return plain(w, device, n)


def save_on_cpu(w: Workload, device: torch.device, n: int) -> list[float]:
    """Every saved activation to host memory (pinned on CUDA; pinning needs a GPU)."""
    pin = device.type == "cuda"
    return plain(w, device, n, forward_ctx=lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin))


def _init_one_rank(device: torch.device) -> None:
    """A process group of this process alone, on a free local port."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _flat_weights(w: Workload) -> None:
    """DeepSpeed and FSDP2 flatten parameters and refuse channels_last ones: VGG's weights go back to NCHW
    (its input stays channels_last, so the convolutions still run channels_last)."""
    w.model.to(memory_format=torch.contiguous_format)


def _deepspeed(w: Workload, device: torch.device, n: int, zero: dict) -> list[float]:
    import deepspeed

    _init_one_rank(device)
    _flat_weights(w)
    config = {
        "train_micro_batch_size_per_gpu": w.batch[0].shape[0], "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True}, "optimizer": w.ds_optimizer, "zero_optimization": zero,
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=w.model, model_parameters=w.model.parameters(), config=config)
    batch = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in w.batch)  # bf16 weights

    def step() -> None:
        loss = w.loss(engine, batch)
        engine.backward(loss)
        engine.step()

    return timed_loop(step, n, device)


_OFFLOAD = {"device": "cpu", "pin_memory": True}


def zero3_offload(w: Workload, device: torch.device, n: int) -> list[float]:
    """DeepSpeed ZeRO-3, parameters and optimizer state (DeepSpeedCPUAdam for AdamW) in pinned host memory."""
    return _deepspeed(w, device, n, {"stage": 3, "offload_param": _OFFLOAD, "offload_optimizer": _OFFLOAD})


def zero2_offload(w: Workload, device: torch.device, n: int) -> list[float]:
    """DeepSpeed ZeRO-2, optimizer state and step on the host; parameters and gradients on the device."""
    return _deepspeed(w, device, n, {"stage": 2, "offload_optimizer": _OFFLOAD})


def fsdp2_offload(w: Workload, device: torch.device, n: int) -> list[float]:
    """FSDP2 ``fully_shard`` per block and at the root with ``CPUOffloadPolicy``, on one device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    _init_one_rank(device)
    cuda = device.type == "cuda"
    _flat_weights(w)
    mesh = init_device_mesh(device.type, (1,))
    kwargs = dict(mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=cuda),
                  mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None,
                                                 reduce_dtype=torch.float32 if cuda else None))
    for unit in _units(w):
        fully_shard(unit, **kwargs)
    model = fully_shard(w.model, **kwargs)
    opt = w.optimizer(model.parameters(), torch.device("cpu"))  # the sharded fp32 weights live on the host

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = w.loss(model, w.batch)
        loss.backward()
        opt.step()

    return timed_loop(step, n, device)


PEERS = {"plain": plain, "checkpoint": checkpoint, "save_on_cpu": save_on_cpu, "zero3_offload": zero3_offload,
         "zero2_offload": zero2_offload, "fsdp2_offload": fsdp2_offload}



def run_peer(name: str, w: Workload, device: torch.device, n: int) -> list[float]:
    """Step times of peer ``name``."""
    return PEERS[name](w, device, n)
