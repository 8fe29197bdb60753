"""What a streamed block would cost on the device if it were resident: its weights, optimizer state and the larger
of its forward's and its optimizer step's extra bytes; its kept activations apart; and the streaming buffers that
leading resident blocks free. ``planning/resident_blocks.py`` chooses from these (its docstring has the model)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_vdnn.streaming.host_state import optimizer_state_bytes
from lightning_vdnn.streaming.streamer import LayerStreamer


def block_costs(streamer: LayerStreamer, optimizers: Iterable[Optimizer], grads_in_forward: bool = True) -> list[int]:
    """Device bytes each streamed block would add to the step's peak if resident, activations aside (see the
    module docstring); call it after a step, when the optimizer state exists. ``grads_in_forward``: the last
    step's gradients are still allocated through forward, beside autocast's weight copies."""
    optimizers = list(optimizers)
    costs = []
    for b in streamer.blocks:
        weights = sum(p.numel() * p.element_size() for p in b.params)
        grads = sum(p.numel() * p.element_size() for p in b.params if p.requires_grad)
        state = optimizer_state_bytes(optimizers, b.params)
        casts = _cast_bytes(streamer, b.numel)
        forward = casts + (grads if grads_in_forward else 0)
        step = grads + _step_temporaries(optimizers, b.params, streamer.device)
        costs.append(weights + state + max(forward, step))
    return costs


def _step_temporaries(optimizers: list[Optimizer], params: list[Tensor], device: torch.device) -> int:
    """Device bytes the optimizer step allocates beside the state for ``params`` resident on ``device``: one
    tensor of each one's size for the multi-tensor (foreach) kernels, which torch picks by default on CUDA; none
    when fused or per tensor."""
    groups = {id(p): g for opt in optimizers for g in opt.param_groups for p in g["params"]}
    total = 0
    for p in params:
        group = groups.get(id(p))
        if not p.requires_grad or group is None or group.get("fused"):
            continue
        foreach = group.get("foreach")
        if foreach or (foreach is None and device.type == "cuda"):
            total += p.numel() * p.element_size()
    return total


def block_activations(streamer: LayerStreamer, kept: bool) -> list[int]:
    """Device bytes each streamed block's activations would add if it were resident and kept them, measured
    during the first step's recompute (``streamer.saved_bytes``), and autocast's weight copy, which backward
    then needs; 0 when activation offload moves them."""
    return [(saved or 0) + _cast_bytes(streamer, b.numel) if kept else 0
            for saved, b in zip(streamer.saved_bytes, streamer.blocks)]


def _cast_bytes(streamer: LayerStreamer, numel: int) -> int:
    """Autocast's low-precision copy of a resident block's weights (none without autocast)."""
    dtype = streamer.autocast_dtype
    return numel * dtype.itemsize if dtype != streamer.host_dtype else 0


def slots_freed(streamer: LayerStreamer) -> list[int]:
    """For each ``k``, the device bytes of streaming buffers that ``k`` leading blocks resident no longer need:
    negative where resident blocks bring the streamed ones more slots (``LayerStreamer.slot_count``); the slots are
    sized to the largest streamed block."""
    numels = [b.numel for b in streamer.blocks]
    host, staged = streamer.host_dtype.itemsize, streamer.stage is not None
    resident = streamer.resident

    low = streamer.grad_low.element_size() if streamer.grad_low is not None else 0  # bf16 host gradients

    def buffers(k: int) -> int:  # the slots, the gradient buffers, the cast staging buffer
        most = max(numels[k:], default=0)
        slots = streamer.slot_count(len(numels) - k, resident + k)
        return slots * most * streamer.dtype.itemsize + most * (host + low) + (most * host if staged else 0)

    return [buffers(0) - buffers(k) for k in range(len(numels))]
