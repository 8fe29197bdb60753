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

The parts: ``collectives.py`` (the process group's collectives), ``partition.py`` (a block's ranges and the
host block of one rank), ``sharded_optimizer_state.py`` (optimizer state whole or in ranges); this module is the
streamer that ties them together.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.layers import LayerPaths
from lightning_vdnn.streaming.collectives import Collectives
from lightning_vdnn.streaming.host_state import HostBlock
from lightning_vdnn.streaming.partition import Partition, ShardedHostBlock
from lightning_vdnn.streaming.sharded_optimizer_state import shard_optimizer_state
from lightning_vdnn.streaming.streamer import LayerStreamer


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

    def _arena_bytes(self, blocks: list[nn.Module]) -> Optional[int]:
        return None  # the blocks' buffers are not the arena's (``ShardedHostBlock``): only the gradient staging is

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
