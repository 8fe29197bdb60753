"""L2L layer streaming: the repeated blocks' weights, gradients and optimizer state live in host memory.

Each block's parameters become views of one flat host buffer (pinned on CUDA), so the ``nn.Parameter``
objects the user's optimizer holds *are* the host master weights: ``state_dict()``, optimizer state and
checkpoints never assemble the model on the device. The device holds two reusable flat slots in the compute
dtype: the block computing and the next one arriving on a side stream. A block's forward keeps nothing but its
input (its own saves dropped as made); backward fetches the block again, recomputes it (same RNG, same autocast)
and streams the weight gradients back into host ``p.grad``, where they accumulate as autograd's would. A
block in ``saving`` (``saved_blocks``) runs its forward with autograd instead, its saves going through the
enclosing saved-tensor hooks (the offloader moves them to the host); saved views of its weights are taken
from whichever slot holds the block when backward reads them, so nothing is recomputed. With
``microbatches=k`` each block runs its input in k chunks along dim 0 while its weights stay in the slot
(``streaming/microbatches.py``): weights stream as often as unsplit, gradients once per block, block
internals are 1/k.
Modules outside the blocks (embeddings, final norm, head) stay on the device; under microbatches a Hugging Face
causal LM's head and loss run a chunk of tokens at a time (``streaming/chunked_head.py``). On a CPU device the same
code runs with inline copies, which is how the tests check it without a GPU. On several ranks,
``streaming/sharded.py`` partitions each block's host state across them by overriding the few hooks marked below.

A block is called exactly as its parent calls it: any positional and keyword arguments, any result structure
(``streaming/calls.py``, ``streaming/block_function.py``). Buffers a block's forward writes (BatchNorm's
statistics) change once per step although backward runs the forward again (``buffers.py``). Several lists of
blocks (an encoder's and a decoder's) stream as one sequence, loads running ahead across the boundary.

Behind resident blocks the device gets more slots (:meth:`LayerStreamer.slot_count`): the streamed blocks' loads
then start while the resident blocks compute, and run several blocks ahead (a block's weights take about twice
its forward to cross PCIe), and those still in a slot when backward reaches them are not loaded again.

:class:`LayerStreamer` holds the state and the public methods; its parts live beside it: running a block's calls
(``streaming/block_runs.py``), the device slots and loads (``streaming/slots.py``), and the way gradients take to
the host (``streaming/gradient_path.py``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_vdnn.buffers import BufferWatch
from lightning_vdnn.compiled import register_call_hooks
from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.layers import LayerPaths, resolve_layers
from lightning_vdnn.offload.host_pool import CopyEngine, concrete_device
from lightning_vdnn.offload.recompute import Recomputer
from lightning_vdnn.streaming.bf16_grads import Bf16GradBlock, host_grad_dtype
from lightning_vdnn.streaming.block_runs import BlockRuns, spread
from lightning_vdnn.streaming.calls import StreamedCall
from lightning_vdnn.streaming.chunked_head import ChunkedHead, find_causal_lm
from lightning_vdnn.streaming.gradient_path import GradientPath
from lightning_vdnn.streaming.hf_conventions import TrainingCalls, checkpointing_off, checkpointing_on
from lightning_vdnn.streaming.host_memory import check_host_memory, held_host_bytes
from lightning_vdnn.streaming.host_optimizer import HostStepper
from lightning_vdnn.streaming.host_release import release_blocks
from lightning_vdnn.streaming.host_state import (HostBlock, add_copies, check_sharing, give_back_pinned, move_except,
                                                 state_to_host)
from lightning_vdnn.streaming.host_update import STATE_DTYPES, state_parameters
from lightning_vdnn.streaming.microbatches import check_microbatches
from lightning_vdnn.streaming.pinned_arena import PinnedArena
from lightning_vdnn.streaming.precision import check_precision, compute_dtype
from lightning_vdnn.streaming.slots import Slot, SlotLoads
from lightning_vdnn.streaming.state_dict_storage import own_storages

#: Optimizers verified to update each parameter elementwise, from its own gradient and state only.
SUPPORTED_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adamax,
    torch.optim.RMSprop, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta,
)


class LayerStreamer(BlockRuns, SlotLoads, GradientPath):
    """Streams the blocks at ``layers`` between host memory and ``device``, one block ahead of compute.

    Args:
        root: the module holding the blocks (the LightningModule).
        layers: dotted path to an ``nn.ModuleList``/``nn.Sequential`` of blocks; ``None`` detects it.
        device: where the model computes; everything outside the blocks is moved there.
        precision: Lightning's precision string; ``"bf16-mixed"``/``"16-mixed"`` make the slots bf16/fp16.
        pin_memory: page-locked host buffers on CUDA (asynchronous copies).
        resident: the first this-many blocks are not streamed: they move to ``device`` like the modules outside
            the blocks, and the ordinary optimizer steps them there. The first ones, because the next forward
            starts with them, which gives the host time to finish updating the streamed blocks.
        microbatches: chunks along dim 0 that each block runs one after another with its weights resident
            (layer-major): block internals hold 1/k of the batch, weights stream as often as with 1. Modules
            outside the blocks see the whole batch, except a ``transformers`` causal LM's head and loss in a call
            with labels, which run k chunks of tokens (``streaming/chunked_head.py``).
        recompute_resident_from: resident blocks from this index on save only their inputs and recompute in
            backward (``torch.utils.checkpoint``), as the streamed ones do: more of them fit a budget
            (``planning/resident_blocks.py``). None: every resident block keeps its activations.
        saved_blocks: how many streamed blocks, spread evenly, save their activations in forward (through the
            saved-tensor hooks around the forward: an offloader moves them to the host) instead of recomputing
            them in backward; None: all of them.

    Raises:
        ValueError: no blocks at ``layers`` (listing the candidates), blocks without parameters, or block
            parameters shared with other blocks or with modules outside the blocks, or a precision other than
            ``SUPPORTED_PRECISIONS``, or ``microbatches`` < 1, or > 1 with BatchNorm in the blocks.
        MemoryError: the host cannot hold the blocks' weights, gradients and optimizer state (``streaming/host_memory.py``).

    Example::

        streamer = LayerStreamer(lm, "model.blocks", torch.device("cuda"), precision="bf16-mixed")
        streamer.attach_optimizers([optimizer])   # checks the class; keeps block state on the host
        loss = lm(x).sum(); loss.backward()       # block grads arrive in host p.grad
        streamer.close()                          # original forwards back, ordinary CPU parameters
    """

    #: Ranks the blocks' host state is partitioned over (``streaming/sharded.py``); one here.
    world = 1
    #: Processes on this host streaming alike (a node's local ranks, ``streaming/sharded.py``); one here.
    local_world = 1
    #: Whether the host update writes the blocks' weights in the slots' dtype for the loads to copy (off where a
    #: load copies a rank's range of the fp32 weights: ``streaming/sharded.py``).
    host_copies = True

    def __init__(self, root: nn.Module, layers: LayerPaths, device: torch.device, precision: str = "32-true",
                 pin_memory: bool = True, resident: int = 0, microbatches: int = 1,
                 recompute_resident_from: Optional[int] = None, saved_blocks: Optional[int] = 0,
                 host_optimizer: str = "auto", host_state_dtype: str = "fp32") -> None:
        check_precision(precision)
        self.host_optimizer, self.host_state_dtype = host_optimizer, STATE_DTYPES[host_state_dtype]
        self.path, self.container = resolve_layers(root, layers)
        if not 0 <= resident < len(self.container):
            raise ValueError(
                f"resident_blocks={resident}, but {self.path!r} holds {len(self.container)} blocks: keep fewer "
                f"on the device (at most {len(self.container) - 1}), so that at least one streams, or turn "
                "layer streaming off if they all fit."
            )
        if recompute_resident_from is not None and not 0 <= recompute_resident_from <= resident:
            raise ValueError(f"recompute_resident_from={recompute_resident_from} must be between 0 and the "
                             f"{resident} resident blocks.")
        self.microbatches = check_microbatches(microbatches, self.container, self.path)
        self.device = concrete_device(device)
        self.engine = CopyEngine(self.device)
        check_sharing(root, self.container, self.path)
        streamed = list(self.container)[resident:]
        kept = f" after the {resident} resident ones" if resident else ""
        weights = next(streamed[0].parameters()).dtype
        self.grad_dtype = host_grad_dtype(self.host_state_dtype, weights, precision)
        self.lean_grads = self.grad_dtype != weights  # bf16 gradients of fp32 weights: ``streaming/bf16_grads.py``
        self.host_copies = self._check_host(streamed, f"the {len(streamed)} blocks at {self.path!r}{kept}", precision)
        pin = self._pin = pin_memory and self.device.type == "cuda"
        self._arena = PinnedArena(pin, self._arena_bytes(streamed))  # kept: close() frees its chunks one by one
        self._arenas = [self._arena]
        self.blocks = [self._new_block(i, m, pin) for i, m in enumerate(streamed)]
        move_except(root, self.device, {id(p) for b in self.blocks for p in b.params})
        self.host_dtype = self.blocks[0].dtype
        # CPU autocast leaves ops such as layer_norm out of its fp32 list: they would meet half weights and a
        # float input, which the CPU kernels refuse. On the CPU there is no copy to shrink, so slots stay fp32.
        self.autocast_dtype = compute_dtype(precision, self.host_dtype)  # what a resident block's weights become
        self.dtype = self.autocast_dtype if self.device.type == "cuda" else self.host_dtype
        size = max(b.padded for b in self.blocks)
        count = self.slot_count(len(self.blocks), resident)
        self.slots = [Slot(torch.empty(size, dtype=self.dtype, device=self.device)) for _ in range(count)]
        same = self.dtype == self.host_dtype  # else host fp32 lands in ``stage`` and is cast on the device
        loaded = max(b.load_numel for b in self.blocks)
        self.stage = None if same else torch.empty(loaded, dtype=self.host_dtype, device=self.device)
        # microbatches sum here: in fp32, also over half-precision weights (bf16-true), rounded once below
        summed = torch.float32 if self.microbatches > 1 and self.host_dtype.itemsize < 4 else self.host_dtype
        self.grad_dev = torch.empty(size, dtype=summed, device=self.device)
        # bf16 host gradients: the fp32 sum is rounded into this on the device, then copied (half the PCIe bytes)
        self.grad_low = (None if self.grad_dtype == summed else
                         torch.empty(size, dtype=self.grad_dtype, device=self.device))
        staging = max(1, max(b.grad_numel for b in self.blocks))  # the trained parameters' (grows if more train)
        self.grad_host = [self._arena.empty(staging, self.grad_dtype) for _ in range(2)]
        self._grad_turn, self._grad_dev_free = 0, None
        self._host_busy: list[Optional[Future]] = [None, None]
        self._pending: list[Future] = []
        self._workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="l2l-grads")
        self._anchor = torch.empty(0, device=self.device, requires_grad=True)  # puts every block in the graph
        self._drain_queued = False
        self._clock = 0
        self._hooks: list[Any] = []
        self.h2d_bytes = self.d2h_bytes = 0
        self._marks, self._last_step = (0, 0), None
        self._forwards = []
        #: resident blocks from this index on run under activation checkpointing (``planning/resident_blocks.py``)
        self.recompute_from = resident if recompute_resident_from is None else recompute_resident_from
        self._recomputer = Recomputer(lambda: contextlib.nullcontext if torch.is_grad_enabled() else None)
        self._recomputer.install(list(self.container)[self.recompute_from:resident])
        self.steppers: list[HostStepper] = []
        self.eager_updates = True
        self.wait_after_step = False  # each step ends when the blocks' updates are written (weight averaging)
        self._calls = [0] * len(self.blocks)  # forward calls not yet matched by a backward, per block
        #: per block, bytes of activations its latest backward's recompute saved (``measure_saved``): what the
        #: block would hold on the device from forward to backward if it were resident (``planning/resident_blocks.py``)
        self.saved_bytes: list[Optional[int]] = [None] * len(self.blocks)
        self.measure_saved = False
        #: streamed blocks whose forward keeps its graph (saves through the enclosing hooks), not recomputed
        self.saving = spread(len(self.blocks) if saved_blocks is None else saved_blocks, len(self.blocks))
        self._reading: dict[int, Slot] = {}  # saving blocks in backward -> the slot their weights are in
        self._direct: set[int] = set()  # blocks whose grads this backward copied straight into grad_flat
        self._buffers = [BufferWatch(b.module) for b in self.blocks]  # what each block's forward writes
        self._hf_calls = TrainingCalls()
        self._checkpointed = checkpointing_off([b.module for b in self.blocks], f"the blocks at {self.path!r}")
        lm = find_causal_lm(root, self.container) if self.microbatches > 1 else None
        self._head = ChunkedHead(lm, self.microbatches) if lm is not None else None  # its logits a chunk at a time
        if resident and self.preloads:  # forward starts loading streamed blocks while the resident ones compute
            self._hooks += [register_call_hooks(m, self._preload) for m in list(self.container)[:resident]]
        for b in self.blocks:
            self._forwards.append(StreamedCall(b.module, functools.partial(self._forward, b.index)))
            self._hooks += [b.module.register_state_dict_pre_hook(functools.partial(self._before_read, b.index)),
                            b.module.register_state_dict_post_hook(own_storages),
                            b.module.register_load_state_dict_pre_hook(functools.partial(self._before_write, b.index))]

    @classmethod
    def from_config(cls, root: nn.Module, config: VDNNConfig, device: torch.device, precision: str = "32-true",
                    resident: Optional[int] = None, recompute_from: Optional[int] = None) -> "LayerStreamer":
        """The streamer ``config`` describes (``layers``, ``pin_memory``, ``resident_blocks``,
        ``microbatches``): how every entry point builds it. ``resident`` overrides ``resident_blocks``; an
        entry point that chooses them from a budget (``planning/resident_blocks.py``) passes its current choice, and the
        resident blocks from ``recompute_from`` on that recompute their activations (None: none).

        Raises:
            NotImplementedError: ``resident_blocks`` is ``"auto"`` and ``resident`` is not given.
        """
        if resident is None:
            config.refuse_auto_choices()
        return cls(root, config.layers, device, precision=precision, pin_memory=config.pin_memory,
                   resident=config.fixed_resident if resident is None else resident,
                   microbatches=config.microbatches, recompute_resident_from=recompute_from,
                   saved_blocks=config.streamed_saves, host_optimizer=config.host_optimizer,
                   host_state_dtype=config.host_state_dtype)

    def _check_host(self, blocks: list[nn.Module], where: str, precision: str) -> bool:
        """Raise ``MemoryError`` if the host cannot hold the blocks' state (``streaming/host_memory.py``), checked
        before pinning; return whether the host update may write the compute-dtype copies the loads read: not
        where only they do not fit (loads then copy the fp32 weights and cast them on the device)."""
        ratio = self._copy_ratio(precision, blocks)
        grad_ratio = self.grad_dtype.itemsize / next(blocks[0].parameters()).element_size()
        kwargs = dict(shards=self.world, processes=self.local_world, grad_ratio=grad_ratio,
                      optimizer_states=state_parameters(self.host_state_dtype))
        try:
            check_host_memory(blocks, where, copy_ratio=ratio, **kwargs)
            return self.host_copies
        except MemoryError:
            if not ratio:
                raise
        check_host_memory(blocks, where, **kwargs)  # raises, with the numbers, if not even that fits
        warnings.warn(f"lightning_vdnn: the host cannot also hold a {ratio:g}x copy of the weights of {where} in the "
                      "compute dtype; loads copy the fp32 weights and cast them on the device (twice the bytes over "
                      "PCIe per load).", stacklevel=3)
        return False

    def _copy_ratio(self, precision: str, blocks: list[nn.Module]) -> float:
        """Bytes of the compute-dtype copy the host update may write (``attach_optimizers``) per weight byte,
        counted before pinning whether or not the optimizer turns out to write one."""
        if not self.host_copies or self.device.type != "cuda":
            return 0.0
        weights = next(blocks[0].parameters())
        return compute_dtype(precision, weights.dtype).itemsize / weights.element_size()

    def _arena_bytes(self, blocks: list[nn.Module]) -> Optional[int]:
        """Hook (``streaming/sharded.py``): the bytes :meth:`_new_block` and the gradient staging ask the arena for."""
        sizes = [sum(p.numel() for p in m.parameters()) for m in blocks]
        trained = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in blocks]  # frozen: no gradient
        weights, grads = next(blocks[0].parameters()).element_size(), self.grad_dtype.itemsize
        return sum(sizes) * weights + (sum(trained) + 2 * max(trained)) * grads

    def _new_block(self, index: int, module: nn.Module, pin: bool) -> HostBlock:
        """Hook (``streaming/sharded.py``): the host side of one streamed block."""
        return (Bf16GradBlock if self.lean_grads else HostBlock)(index, module, pin, self._arena.empty)

    # -- public ------------------------------------------------------------------------------------------
    def attach_optimizers(self, optimizers: Iterable[Optimizer]) -> None:
        """Refuse optimizers that are not elementwise; keep block state on the host; sync before each step."""
        ours = {id(p) for b in self.blocks for p in b.params}
        for opt in optimizers:
            if not any(id(p) in ours for g in opt.param_groups for p in g["params"]):
                continue
            if type(opt) not in SUPPORTED_OPTIMIZERS:
                names = ", ".join(c.__name__ for c in SUPPORTED_OPTIMIZERS)
                raise TypeError(f"layer streaming cannot step {type(opt).__name__} over the blocks at {self.path!r}: "
                                f"it needs an elementwise optimizer. Supported: {names}.")
            self.keep_state_on_host(opt)
            # first: host gradients complete before the stepper's pre-hook queues the blocks' updates
            self._hooks.append(opt.register_step_pre_hook(self._before_step))
            self._hooks.append(opt.register_step_post_hook(self._after_step))
            # fused on a GPU run, where the plain optimizer would use a multi-tensor kernel too; on a CPU device
            # the per-tensor loop, which is what plain training runs there (bit-for-bit comparable)
            stepper = HostStepper(opt, self.blocks, eager=self.eager_updates, fused=self.engine.is_cuda,
                                  backend=self.host_optimizer, state_dtype=self.host_state_dtype)
            self.steppers.append(stepper)
            if self.host_copies and stepper.update_pass is not None and self.dtype != self.host_dtype:
                self._arenas.append(add_copies(self.blocks, self.dtype, self._pin))  # the update writes what loads copy
                self.stage = None  # loads copy bf16 and cast nothing on the device: no fp32 staging buffer

    def load_optimizer_states(self, optimizers: Iterable[Optimizer], states: Iterable[dict]) -> None:
        """``optimizer.load_state_dict`` for each, the blocks' state kept in host memory. Not Lightning's loading,
        which first moves all of it to the device: more than fits, for a model streamed because its state does
        not. torch puts each entry on its parameter's device, the blocks' on the host."""
        for optimizer, state in zip(optimizers, states):
            optimizer.load_state_dict(state)
            self.keep_state_on_host(optimizer)

    def keep_state_on_host(self, optimizer: Optimizer) -> None:
        """Move the optimizer state of block parameters back to host memory (Lightning moves all of it)."""
        state_to_host(optimizer, (p for b in self.blocks for p in b.params))

    def set_saving(self, count: int) -> None:
        """From the next forward on, ``count`` streamed blocks (spread evenly) save their activations."""
        self.saving = spread(count, len(self.blocks))

    def set_eager(self, eager: bool) -> None:
        """Allow block updates during backward (off when clipping or loss scaling acts after backward)."""
        self.eager_updates = eager
        for stepper in self.steppers:
            stepper.eager = eager

    def synchronize(self) -> None:
        """Wait for gradients in flight, queued host updates and copies still reading host weights: after it,
        host weights, gradients and optimizer state are final (checkpoints, teardown)."""
        self.wait_grads()
        for stepper in self.steppers:
            stepper.wait_all()
        if self.engine.is_cuda:
            self.engine.h2d.synchronize()

    def _settle(self, index: int, *_: Any) -> None:
        """Before ``state_dict()`` reads or ``load_state_dict()`` writes block ``index``'s host weights: its
        gradients landed, its queued update written, and (for the write) no copy still reading them.
        ``optimizer.step()`` returns with block updates still queued, so a callback saving
        ``module.state_dict()`` after the step would otherwise read them half written."""
        self.wait_grads()
        for stepper in self.steppers:
            stepper.wait(index)
        if self.engine.is_cuda:
            self.engine.h2d.synchronize()

    def _before_read(self, index: int, *_: Any) -> None:
        """Hook (``streaming/sharded.py``): before a block's ``state_dict()``; before its ``load_state_dict()`` below."""
        self._settle(index)

    def _before_write(self, index: int, *_: Any) -> None:
        self._settle(index)

    def close(self) -> None:
        """Original forwards back, ordinary CPU parameters, device slots freed."""
        self._recomputer.close()
        try:
            self.synchronize()
        finally:
            self._workers.shutdown(wait=True)
            for stepper in self.steppers:
                stepper.close()
            self.steppers = []
        for handle in self._hooks:
            handle.remove()
        self.grad_host = []
        for taken in self._forwards:
            taken.restore()
        release_blocks(self.blocks, self._arenas)  # a chunk at a time: never the model's state twice
        self._arena, self._arenas = None, []
        if self._pin:
            give_back_pinned()  # pinned buffers outside the arenas (a sharded block's gradients)
        checkpointing_on(self._checkpointed)
        if self._head is not None:
            self._head.close()
        self.slots, self.stage, self.grad_dev, self.grad_low = [], None, None, None

    @property
    def resident(self) -> int:
        """How many leading blocks are not streamed (on the device, stepped by the ordinary optimizer)."""
        return len(self.container) - len(self.blocks)

    def stats(self) -> dict[str, Any]:
        """Bytes streamed in the last optimizer step, worker time of the blocks' host updates since the step
        before, and how long training waited for them (totals so far before the first step); the microbatches,
        the resident blocks and the saving ones; the host bytes the blocks' state holds now."""
        fixed = {"microbatches": self.microbatches, "resident_blocks": self.resident,
                 "host_state_bytes": held_host_bytes(self.blocks, self.grad_host, [s.optimizer for s in self.steppers]),
                 "resident_recomputed_blocks": self.resident - self.recompute_from, "saved_blocks": len(self.saving)}
        if self._last_step is not None:
            return {**self._last_step, **fixed}
        return {"streamed_h2d_bytes": self.h2d_bytes, "streamed_d2h_bytes": self.d2h_bytes, "host_optimizer_ms": None,
                "host_update_wait_ms": None, "host_update_bytes": None, "host_update_kernel_ms": None, **fixed}

    def _before_step(self, *_: Any) -> None:
        self.wait_grads()  # host grads complete before the body steps anything (device modules only, now)

    def _after_step(self, *_: Any) -> None:
        if self.wait_after_step:  # something reads the weights now (weight averaging): the updates first
            for stepper in self.steppers:
                stepper.wait_all()
        h2d, d2h = self._marks
        times = [s.take_times() for s in self.steppers]
        busy, waited = sum(t[0] for t in times), sum(t[1] for t in times)
        kernel = [k for k in (s.host_update_kernel_ms() for s in self.steppers) if k is not None]
        self._last_step = {"streamed_h2d_bytes": self.h2d_bytes - h2d, "streamed_d2h_bytes": self.d2h_bytes - d2h,
                           "host_optimizer_ms": busy, "host_update_wait_ms": waited,
                           "host_update_bytes": sum(s.host_update_bytes() for s in self.steppers),
                           "host_update_kernel_ms": sum(kernel) if kernel else None}
        self._marks = (self.h2d_bytes, self.d2h_bytes)

