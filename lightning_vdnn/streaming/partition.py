"""One streamed block's host state cut into N rank ranges (``streaming/sharded.py``): which range of the flat
buffer a rank owns (:class:`Partition`), and the host block that keeps gradients for that range only."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from lightning_vdnn.streaming.host_state import HostBlock, host_empty


class Partition:
    """Which range of one block's flat host buffer rank ``rank`` of ``world`` owns, and each parameter's part.

    The buffer (``numel`` elements, parameter k at ``offsets[k]:offsets[k+1]``) is padded to ``padded``, a
    multiple of ``world``, and cut into ranges of ``size``; this rank owns ``lo:hi`` (short or empty at the
    end). ``pieces[k]`` is parameter k's intersection with it, in buffer coordinates. Kept after the streamer
    closes: checkpoints consolidate the optimizer state by it.
    """

    def __init__(self, params: Iterable[nn.Parameter], offsets: list[int], rank: int, world: int) -> None:
        self.params, self.offsets, self.rank, self.world = list(params), list(offsets), rank, world
        self.numel = self.offsets[-1]
        self.size = -(-self.numel // world)
        self.padded = self.size * world
        self.lo = min(rank * self.size, self.numel)
        self.hi = min(self.lo + self.size, self.numel)
        self.pieces: dict[int, tuple[int, int]] = {}
        for k, (a, b) in enumerate(zip(self.offsets, self.offsets[1:])):
            if max(a, self.lo) < min(b, self.hi):
                self.pieces[k] = (max(a, self.lo), min(b, self.hi))

    def local(self, k: int) -> slice:
        """Parameter k's piece in range coordinates (into a buffer holding ``lo:hi``)."""
        a, b = self.pieces[k]
        return slice(a - self.lo, b - self.lo)

    def within(self, k: int) -> slice:
        """Parameter k's piece in the coordinates of the flattened parameter."""
        a, b = self.pieces[k]
        return slice(a - self.offsets[k], b - self.offsets[k])


class ShardedHostBlock(HostBlock):
    """A :class:`HostBlock` whose gradients, and the updates of whose weights, are this rank's range only."""

    def __init__(self, index: int, module: nn.Module, pin: bool, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        super().__init__(index, module, pin)

    def _init_grads(self, pin: bool) -> None:
        part = self.part = Partition(self.params, self.offsets, self.rank, self.world)
        self._layout_grads(every=True)  # reduce-scattered by the weights' ranges: every parameter has its place
        self.padded, self.load_numel, self.grad_numel = part.padded, part.size, part.size
        self.grad_flat = host_empty(part.size, self.dtype, pin)
        self.has_grad = [False] * len(self.params)
        self.generation = 0  # advanced at the same moments on every rank: a loaded slot is current if equal
        self.stale = False  # other ranks' ranges of ``flat`` changed since the last gather
        with torch.no_grad():
            for k, p in enumerate(self.params):
                if p.grad is not None and k in part.pieces:  # a gradient from before streaming: keep our range
                    self.grad_flat[part.local(k)].copy_(p.grad.detach().reshape(-1)[part.within(k)])
                    self.has_grad[k] = True
                p.grad = None

    def check_layout(self) -> None:
        """The layout holds every parameter (frozen ones' places zero): nothing to follow."""

    @property
    def own(self) -> Tensor:
        """This rank's range of the host weights."""
        return self.flat[self.part.lo: self.part.hi]

    def version(self) -> int:
        return self.generation

    def master_view(self, k: int) -> Optional[Tensor]:
        if k not in self.part.pieces:
            return None
        a, b = self.part.pieces[k]
        return self.flat[a:b]

    def grad_of(self, k: int) -> Optional[Tensor]:
        return self.grad_flat[self.part.local(k)] if self.has_grad[k] and k in self.part.pieces else None

    def grads(self, ids: set[int]) -> list[Tensor]:
        """This rank's gradient pieces of the parameters whose ``id`` is in ``ids``."""
        return [self.grad_flat[self.part.local(k)] for k in self.part.pieces
                if self.has_grad[k] and id(self.params[k]) in ids]

    def clear_grads(self, keys: list[int], set_to_none: bool) -> None:
        for k in keys:
            if set_to_none:
                self.has_grad[k] = False
            elif self.has_grad[k]:
                self.grad_flat[self.part.local(k)].zero_()

    def can_adopt(self) -> bool:
        return all(p.requires_grad for p in self.params) and not any(self.has_grad)

    def adopt(self) -> None:
        for k in self.part.pieces:
            self.has_grad[k] = True

    def accumulate(self, grads: Tensor) -> None:
        """Add this rank's range of averaged gradients (``grads``) into the pieces: set when none, else add."""
        for k in self.part.pieces:
            if not self.params[k].requires_grad:
                continue
            span = self.part.local(k)
            if self.has_grad[k]:
                self.grad_flat[span].add_(grads[span])
            else:
                self.grad_flat[span].copy_(grads[span])
                self.has_grad[k] = True
