"""The collectives of layer streaming across ranks (``streaming/sharded.py``): ``torch.distributed`` over one
process group, for tensors on the device and in host memory."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.13 names them ``*_single`` and deprecates the older names, which it still has
_ALL_GATHER: Callable[..., Any] = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER: Callable[..., Any] = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Collectives:
    """torch.distributed over one process group, for tensors on the device and in host memory.

    Device tensors go to the backend as they are; host tensors too with gloo, while NCCL, which reads only
    device memory, gets them through a device copy (checkpoints and set-up only, never per step).
    """

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.src = dist.get_global_rank(group, 0)
        self.hop = None if "gloo" in str(dist.get_backend(group)) else device

    def all_gather(self, out: Tensor, shard: Tensor) -> None:
        """``out`` (world x ``shard``) = every rank's ``shard``, in rank order."""
        _ALL_GATHER(out, shard, group=self.group)

    def reduce_scatter_mean(self, out: Tensor, full: Tensor) -> None:
        """``out`` = this rank's ``1/world`` of ``full``, averaged over the ranks (DDP's gradient average)."""
        _REDUCE_SCATTER(out, full, op=dist.ReduceOp.SUM, group=self.group)
        out.div_(self.world)

    def all_reduce_sum(self, value: Tensor) -> Tensor:
        sent = value if self.hop is None else value.to(self.hop)
        dist.all_reduce(sent, op=dist.ReduceOp.SUM, group=self.group)
        return sent.to(value.device)

    def broadcast_host(self, host: Tensor) -> None:
        """``host`` (in host memory) becomes the first rank's."""
        sent = host if self.hop is None else host.to(self.hop)
        dist.broadcast(sent, src=self.src, group=self.group)
        if sent is not host:
            host.copy_(sent)

    def gather_host(self, piece: Tensor, size: int) -> Tensor:
        """Every rank's ``piece`` (at most ``size`` elements, zero-padded to it), concatenated in host memory."""
        device = self.hop or piece.device
        shard = torch.zeros(size, dtype=piece.dtype, device=device)
        shard[: piece.numel()].copy_(piece)
        out = torch.empty(size * self.world, dtype=piece.dtype, device=device)
        self.all_gather(out, shard)
        return out.cpu()

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out
