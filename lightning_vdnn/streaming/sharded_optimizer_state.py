"""Optimizer state of streamed blocks partitioned across ranks (``streaming/sharded.py``): whole in checkpoints
(:func:`full_optimizer_state`, the format one process writes), cut back into this rank's ranges when loaded
(:func:`shard_optimizer_state`), so a checkpoint moves between one rank and N."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_vdnn.streaming.collectives import Collectives
from lightning_vdnn.streaming.partition import Partition

#: Per-parameter optimizer state that is one number rather than one per element (torch's Adam family, NAdam).
SCALAR_STATE = frozenset({"step", "mu_product"})


def full_optimizer_state(optimizer: Optimizer, partitions: list[Partition], comm: Collectives) -> dict[str, Any]:
    """Collective: ``optimizer.state_dict()`` with every block parameter's state whole, gathered from the ranks
    that own its pieces: what one process would save."""
    state = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for part in partitions:
        for k, whole in _gather_block_state(optimizer, part, comm).items():
            i = index.get(id(part.params[k]))
            if i is not None:
                state["state"][i] = whole
    return state


def _gather_block_state(optimizer: Optimizer, part: Partition, comm: Collectives) -> dict[int, dict[str, Any]]:
    """Parameter index in the block -> its whole state. Elementwise entries (1-D pieces here) are all-gathered
    as one buffer per key; one-number entries (``step``) come from the first rank that has them."""
    meta: dict[int, dict[str, tuple[str, Any]]] = {}
    for k in part.pieces:
        for key, value in optimizer.state.get(part.params[k], {}).items():
            piece = isinstance(value, Tensor) and value.dim() == 1
            kind = ("piece", value.dtype) if piece else ("value", value.cpu() if isinstance(value, Tensor) else value)
            meta.setdefault(k, {})[key] = kind
    merged: dict[int, dict[str, tuple[str, Any]]] = {}
    for theirs in comm.all_gather_object(meta):
        for k, entries in theirs.items():
            for key, kind in entries.items():
                merged.setdefault(k, {}).setdefault(key, kind)
    out: dict[int, dict[str, Any]] = {k: {} for k in merged}
    for k, entries in merged.items():
        for key, (what, value) in entries.items():
            if what == "value":
                out[k][key] = value
    for key, dtype in sorted({(key, kind[1]) for e in merged.values() for key, kind in e.items()
                              if kind[0] == "piece"}, key=str):
        mine = torch.zeros(part.hi - part.lo, dtype=dtype)
        for k in part.pieces:
            value = optimizer.state.get(part.params[k], {}).get(key)
            if value is not None:
                mine[part.local(k)].copy_(value)
        whole = comm.gather_host(mine, part.size)
        for k, entries in merged.items():
            if entries.get(key, ("",))[0] == "piece" and entries[key][1] == dtype:
                a, b = part.offsets[k], part.offsets[k + 1]
                out[k][key] = whole[a:b].view(part.params[k].shape).clone()
    return out


def shard_optimizer_state(optimizer: Optimizer, partitions: list[Partition]) -> None:
    """After ``optimizer.load_state_dict`` of whole state (ours or one process's): keep, in host memory, this
    rank's piece of each block parameter's elementwise state, its one-number state, and nothing for a
    parameter with no piece here."""
    for part in partitions:
        for k, p in enumerate(part.params):
            state = optimizer.state.get(p)
            if not state:
                continue
            if k not in part.pieces:
                del optimizer.state[p]
                continue
            for key, value in list(state.items()):
                if isinstance(value, Tensor) and value.shape == p.shape and not (
                        value.dim() == 0 and key in SCALAR_STATE):
                    state[key] = value.detach().reshape(-1)[part.within(k)].to("cpu", copy=True)


def state_numel(optimizer: Optimizer, params: Iterable[Tensor]) -> int:
    """Elements of elementwise optimizer state held for ``params`` (one-number entries not counted)."""
    return sum(v.numel() for p in params for v in optimizer.state.get(p, {}).values()
               if isinstance(v, Tensor) and v.dim() > 0)
