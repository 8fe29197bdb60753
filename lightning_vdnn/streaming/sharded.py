"""L2L layer streaming across ranks: every rank keeps and updates 1/N of each streamed block's host state.

Data parallel, as ZeRO-Offload partitions a CPU optimizer: every rank runs the whole model on its share of the
batch, and each streamed block's flat fp32 host buffer (``streaming/host_state.py``) is cut into N contiguous ranges,
padded to a multiple of N (:class:`Partition`). Rank r *owns* range r:

* **update**: only rank r steps range r. Its block optimizer (``streaming/host_optimizer.py``, the user's class and
  hyper-parameters per param group) steps each parameter's intersection with the range as a 1-D view of the
  host weights, so the optimizer state of a block parameter on a rank is shard-shaped, and a parameter with
  no element in the range has none there. Supported optimizers are elementwise (``SUPPORTED_OPTIMIZERS``),
  which makes this the same arithmetic as stepping the whole tensor.
* **gradients**: the block's flat device gradient is reduce-scattered (``torch.distributed``, averaged over
  the ranks as DDP averages), each rank copies its range to the host and queues its update on the host worker,
  during backward when nothing rewrites gradients afterwards, exactly as one device does. Host gradient
  buffers hold the range only; ``p.grad`` of a block parameter stays None.
* **weights for compute**: to load block i into a device slot, each rank copies its range host -> device (in
  the compute dtype) and one all-gather fills the slot: PCIe carries 1/N of the block per rank.

So per rank the host holds 1/N of the blocks' gradients and optimizer state (``streaming/host_memory.py`` checks it). Every
rank also keeps a full fp32 copy of the weights, the user-visible ``nn.Parameter`` s: its own range is always
current, the other ranges only as of the last :meth:`ShardedLayerStreamer.gather_weights` (an all-gather on
every rank: checkpoints, ``strategy.synchronize()``, the end of ``fit``). Reading a block's ``state_dict()``
while other ranges are out of date raises instead of returning a mixture. Optimizer state is consolidated
the same way for checkpoints (:func:`full_optimizer_state`: the format one process writes) and cut back into
ranges when loaded (:func:`shard_optimizer_state`), so a checkpoint moves between one rank and N.

Every rank must issue the same collectives in the same order: the same number of forward passes (training
and validation samplers pad to equal lengths; predict's does not, so the strategy refuses predict on
several ranks), and a block's slot counts as current by a generation every rank advances at the same
moments (each optimizer step, each ``load_state_dict``), never by a per-rank tensor version.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.layers import LayerPaths
from lightning_vdnn.streaming.host_state import HostBlock, host_empty
from lightning_vdnn.streaming.streamer import LayerStreamer

#: Per-parameter optimizer state that is one number rather than one per element (torch's Adam family, NAdam).
SCALAR_STATE = frozenset({"step", "mu_product"})

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


class ShardedLayerStreamer(LayerStreamer):
    """:class:`LayerStreamer` with each block's host state partitioned over the ranks of ``comm``.

    Args:
        comm: the process group the blocks are partitioned over (every rank of the data-parallel job).
        local_world: ranks on this host (each keeps full fp32 block weights: the host-memory check counts them).
        root, layers, device, precision, pin_memory, resident, microbatches, saved_blocks: as in
            :class:`LayerStreamer`.
            The first ``resident`` blocks are not streamed and not partitioned: the strategy replicates them
            with the modules outside the blocks.

    Raises:
        ValueError: ``precision="16-mixed"`` (its loss scaler unscales and checks ``p.grad``, which block
            parameters do not have here; use ``"bf16-mixed"``), and what :class:`LayerStreamer` raises.

    The constructor broadcasts the first rank's block weights to the others, as DDP does for its modules.
    """

    preloads = False  # every load is an all-gather: all ranks load the same blocks in the same order
    host_copies = False  # a load copies this rank's range of the fp32 weights (``_fill``), not a whole-block copy

    def __init__(self, root: nn.Module, layers: LayerPaths, device: torch.device, comm: Collectives,
                 precision: str = "32-true", pin_memory: bool = True, resident: int = 0,
                 microbatches: int = 1, local_world: int = 1, saved_blocks: Optional[int] = 0) -> None:
        if str(precision) == "16-mixed":
            raise ValueError(
                "precision='16-mixed' with layer streaming across ranks: its loss scaler unscales and checks "
                "p.grad, and a streamed block's gradients live partitioned in host memory instead. Use "
                "precision='bf16-mixed' (no loss scaler) or '32-true'.")
        self.comm, self.world, self.rank, self.local_world = comm, comm.world, comm.rank, local_world
        super().__init__(root, layers, device, precision=precision, pin_memory=pin_memory, resident=resident,
                         microbatches=microbatches, saved_blocks=saved_blocks)
        size = max(b.part.size for b in self.blocks)
        self.gather_in = torch.empty(size, dtype=self.dtype, device=self.device)
        self.grad_out = torch.empty(size, dtype=self.host_dtype, device=self.device)
        for b in self.blocks:
            comm.broadcast_host(b.flat)

    @classmethod
    def from_config(cls, root: nn.Module, config: VDNNConfig, device: torch.device,  # type: ignore[override]
                    comm: Collectives, precision: str = "32-true", local_world: int = 1) -> "ShardedLayerStreamer":
        return cls(root, config.layers, device, comm, precision=precision, pin_memory=config.pin_memory,
                   resident=config.fixed_resident, microbatches=config.microbatches, local_world=local_world,
                   saved_blocks=config.streamed_saves)

    def _new_block(self, index: int, module: nn.Module, pin: bool) -> HostBlock:
        return ShardedHostBlock(index, module, pin, self.rank, self.world)

    @property
    def partitions(self) -> list[Partition]:
        return [b.part for b in self.blocks]

    def keep_state_on_host(self, optimizer: Optimizer) -> None:
        """This rank's pieces of the block parameters' state, in host memory: state an optimizer creates whole
        at construction (Adagrad's ``sum``) or that a checkpoint loaded whole is cut to the rank's ranges."""
        shard_optimizer_state(optimizer, self.partitions)
        super().keep_state_on_host(optimizer)

    # -- the collectives of a step ---------------------------------------------------------------------
    def _fill(self, block: HostBlock, buf: Tensor) -> None:
        """Our range host -> device, then one all-gather fills the slot (in the compute dtype)."""
        part = block.part
        mine = self.gather_in[: part.size]
        self._to_device(block.own, mine[: part.hi - part.lo])
        mine[part.hi - part.lo:].zero_()
        self.comm.all_gather(buf[: part.padded], mine)

    def _reduce(self, block: HostBlock, dev: Tensor) -> Tensor:
        """Reduce-scatter the block's device gradients: our range, averaged over the ranks."""
        part = block.part
        full = self.grad_dev[: part.padded]
        full[part.numel:].zero_()
        out = self.grad_out[: part.size]
        self.comm.reduce_scatter_mean(out, full)
        return out[: part.hi - part.lo]

    def _after_step(self, *args: Any) -> None:
        super()._after_step(*args)
        for b in self.blocks:  # every rank, every block: the ranges updated this step differ from the slots'
            b.generation += 1
            b.stale = True

    # -- reading and writing the user-visible parameters -----------------------------------------------
    def _before_read(self, index: int, *_: Any) -> None:
        self._settle(index)
        if self.blocks[index].stale:
            raise RuntimeError(
                f"Block {index} at {self.path!r} keeps its host weights partitioned over {self.world} ranks, and "
                "the other ranks' ranges changed since they were last gathered, so its state_dict() would mix "
                "steps. Call trainer.strategy.synchronize() on every rank first (checkpoints do it for you).")

    def _before_write(self, index: int, *_: Any) -> None:
        self._settle(index)
        block = self.blocks[index]
        block.generation += 1  # every rank loads the same state: all reload the block
        block.stale = False

    def gather_weights(self) -> None:
        """Collective: after queued updates, every rank's full copy of the block weights is current."""
        self.synchronize()
        for b in self.blocks:
            if b.stale:
                b.flat.copy_(self.comm.gather_host(b.own, b.part.size)[: b.numel])
                b.stale = False

    def close(self, gather: bool = True) -> None:  # type: ignore[override]
        """As :meth:`LayerStreamer.close`, after :meth:`gather_weights` unless ``gather`` is False (a failed run,
        where the other ranks may not be there to gather with: each rank keeps its own range current)."""
        try:
            if gather:
                self.gather_weights()
        finally:
            super().close()

    # -- gradient clipping over every rank's pieces ------------------------------------------------------
    def clip_grad_norm_(self, params: list[Tensor], max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` (2-norm) over ``params``: block gradients are this rank's pieces,
        summed over the ranks; the others (replicated, already averaged) count once."""
        self.wait_grads()
        ours = {id(p) for b in self.blocks for p in b.params}
        pieces = [g for b in self.blocks for g in b.grads({id(p) for p in params})]
        replicated = [p.grad for p in params if id(p) not in ours and p.grad is not None]
        squares = torch.zeros(1, dtype=torch.float32)
        if pieces:
            squares += torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in pieces])) ** 2
        total = self.comm.all_reduce_sum(squares)
        if replicated:
            norms = torch.stack([torch.linalg.vector_norm(g).to(total.device) for g in replicated])
            total = total + torch.linalg.vector_norm(norms) ** 2
        total = total.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in pieces + replicated:
            g.mul_(coef.to(g.device))
        return total

    def clip_grad_value_(self, params: list[Tensor], clip_value: float) -> None:
        """``torch.nn.utils.clip_grad_value_`` over ``params``, block gradients as this rank's pieces."""
        self.wait_grads()
        ours = {id(p) for b in self.blocks for p in b.params}
        pieces = [g for b in self.blocks for g in b.grads({id(p) for p in params})]
        for g in pieces + [p.grad for p in params if id(p) not in ours and p.grad is not None]:
            g.clamp_(-clip_value, clip_value)


# -- optimizer state: whole in checkpoints, partitioned in training ---------------------------------------
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
