"""L2L layer streaming: the repeated blocks' weights, gradients and optimizer state live in host memory.

Each block's parameters become views of one flat host buffer (pinned on CUDA), so the ``nn.Parameter``
objects the user's optimizer holds *are* the host master weights: ``state_dict()``, optimizer state and
checkpoints never assemble the model on the device. The device holds two reusable flat slots in the compute
dtype: the block computing and the next one arriving on a side stream. A block's forward runs without
autograd and saves only its input; backward fetches the block again, recomputes it (same RNG, same autocast)
and streams the weight gradients back into host ``p.grad``, where they accumulate as autograd's would. A
block in ``saving`` (``saved_blocks``) runs its forward with autograd instead, its saves going through the
enclosing saved-tensor hooks (the offloader moves them to the host); saved views of its weights are taken
from whichever slot holds the block when backward reads them, so nothing is recomputed. With
``microbatches=k`` each block runs its input in k chunks along dim 0 while its weights stay in the slot
(``streaming/microbatches.py``): weights stream as often as unsplit, gradients once per block, block internals are 1/k.
Modules outside the blocks (embeddings, final norm, head) stay on the device. On a CPU device the same code
runs with inline copies, which is how the tests check it without a GPU. On several ranks, ``streaming/sharded.py``
partitions each block's host state across them by overriding the few hooks marked below.

A block is called exactly as its parent calls it: any positional and keyword arguments, any result structure
(``streaming/calls.py``, ``streaming/block_function.py``). Buffers a block's forward writes (BatchNorm's statistics) change once
per step although backward runs the forward again (``buffers.py``). Several lists of blocks (an encoder's and a
decoder's) stream as one sequence, loads running ahead across the boundary.

Behind resident blocks the device gets more slots (:meth:`LayerStreamer.slot_count`): the streamed blocks' loads
then start while the resident blocks compute, and run several blocks ahead (a block's weights take about twice
its forward to cross PCIe), and those still in a slot when backward reaches them are not loaded again.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_vdnn.streaming.calls import CallFlat, ChunkPlan, Flat, Joined
from lightning_vdnn.buffers import BufferWatch
from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.streaming.hf_conventions import TrainingCalls, checkpointing_off, checkpointing_on
from lightning_vdnn.streaming.host_state import (HostBlock, PinnedArena, accumulate_from, adopt_grads, check_sharing,
                                        move_except, state_to_host)
from lightning_vdnn.streaming.host_optimizer import HostStepper
from lightning_vdnn.streaming.host_memory import check_host_memory
from lightning_vdnn.layers import LayerPaths, resolve_layers
from lightning_vdnn.streaming.microbatches import ChunkState, check_microbatches
from lightning_vdnn.offload.host_pool import CopyEngine
from lightning_vdnn.offload.recompute import Recomputer
from lightning_vdnn.streaming.block_function import (Enter, Exit, Graph, Port, Result, SavedBytes, SlotSaves, SlotView,
                                           StreamedBlock)

#: Optimizers verified to update each parameter elementwise, from its own gradient and state only.
SUPPORTED_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adamax,
    torch.optim.RMSprop, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta,
)
_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
#: Most device slots a streamer holds (each is one block in the compute dtype: gpt_1b's 0.1 GB).
MAX_SLOTS = 6


def compute_dtype(precision: str, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the device slots hold: autocast's for mixed precision (so it casts nothing), else the params'."""
    return _MIXED.get(str(precision), param_dtype)


#: Lightning precisions layer streaming trains with: fp32 host master weights, fp32 or autocast compute.
SUPPORTED_PRECISIONS: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed")


def check_precision(precision: str) -> None:
    """Refuse, before anything is moved, a precision whose host weights would not be fp32 masters."""
    if str(precision) not in SUPPORTED_PRECISIONS:
        raise ValueError(f"layer streaming does not support precision={precision!r}; it keeps fp32 master weights in "
                         f"host memory and supports {list(SUPPORTED_PRECISIONS)}. Set Trainer(precision=...) to one "
                         "of them, or drop layer_streaming.")


class _Slot:
    """A flat device buffer holding one block's weights in the compute dtype."""

    __slots__ = ("buf", "block", "version", "ready", "free", "used")

    def __init__(self, buf: Tensor) -> None:
        self.buf, self.block, self.version, self.ready, self.free, self.used = buf, -1, -1, None, None, 0


class LayerStreamer:
    """Streams the blocks at ``layers`` between host memory and ``device``, one block ahead of compute.

    Args:
        root: the module holding the blocks (the LightningModule).
        layers: dotted path to an ``nn.ModuleList``/``nn.Sequential`` of same-class blocks; ``None`` detects it.
        device: where the model computes; everything outside the blocks is moved there.
        precision: Lightning's precision string; ``"bf16-mixed"``/``"16-mixed"`` make the slots bf16/fp16.
        pin_memory: page-locked host buffers on CUDA (asynchronous copies).
        resident: the first this-many blocks are not streamed: they move to ``device`` like the modules outside
            the blocks, and the ordinary optimizer steps them there. The first ones, because the next forward
            starts with them, which gives the host time to finish updating the streamed blocks.
        microbatches: chunks along dim 0 that each block runs one after another with its weights resident
            (layer-major): block internals hold 1/k of the batch, weights stream as often as with 1. Modules
            outside the blocks see the whole batch.
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

    def __init__(self, root: nn.Module, layers: LayerPaths, device: torch.device, precision: str = "32-true",
                 pin_memory: bool = True, resident: int = 0, microbatches: int = 1,
                 recompute_resident_from: Optional[int] = None, saved_blocks: Optional[int] = 0) -> None:
        check_precision(precision)
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
        self.device = torch.device(device)
        self.engine = CopyEngine(self.device)
        check_sharing(root, self.container, self.path)
        streamed = list(self.container)[resident:]
        kept = f" after the {resident} resident ones" if resident else ""
        check_host_memory(streamed, f"the {len(streamed)} blocks at {self.path!r}{kept}",  # before pinning
                          shards=self.world, processes=self.local_world)
        pin = pin_memory and self.device.type == "cuda"
        self._arena = PinnedArena(pin)  # dropped at close: the blocks' views keep their chunks
        self.blocks = [self._new_block(i, m, pin) for i, m in enumerate(streamed)]
        move_except(root, self.device, {id(p) for b in self.blocks for p in b.params})
        self.host_dtype = self.blocks[0].dtype
        # CPU autocast leaves ops such as layer_norm out of its fp32 list: they would meet half weights and a
        # float input, which the CPU kernels refuse. On the CPU there is no copy to shrink, so slots stay fp32.
        self.autocast_dtype = compute_dtype(precision, self.host_dtype)  # what a resident block's weights become
        self.dtype = self.autocast_dtype if self.device.type == "cuda" else self.host_dtype
        size = max(b.padded for b in self.blocks)
        count = self.slot_count(len(self.blocks), resident)
        self.slots = [_Slot(torch.empty(size, dtype=self.dtype, device=self.device)) for _ in range(count)]
        same = self.dtype == self.host_dtype  # else host fp32 lands in ``stage`` and is cast on the device
        loaded = max(b.load_numel for b in self.blocks)
        self.stage = None if same else torch.empty(loaded, dtype=self.host_dtype, device=self.device)
        self.grad_dev = torch.empty(size, dtype=self.host_dtype, device=self.device)
        self.grad_host = [self._arena.empty(max(b.grad_numel for b in self.blocks), self.host_dtype) for _ in range(2)]
        self._arena = None
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
        self._calls = [0] * len(self.blocks)  # forward calls not yet matched by a backward, per block
        #: per block, bytes of activations its latest backward's recompute saved (``measure_saved``): what the
        #: block would hold on the device from forward to backward if it were resident (``planning/resident_blocks.py``)
        self.saved_bytes: list[Optional[int]] = [None] * len(self.blocks)
        self.measure_saved = False
        #: streamed blocks whose forward keeps its graph (saves through the enclosing hooks), not recomputed
        self.saving = spread(len(self.blocks) if saved_blocks is None else saved_blocks, len(self.blocks))
        self._reading: dict[int, _Slot] = {}  # saving blocks in backward -> the slot their weights are in
        self._direct: set[int] = set()  # blocks whose grads this backward copied straight into grad_flat
        self._buffers = [BufferWatch(b.module) for b in self.blocks]  # what each block's forward writes
        self._hf_calls = TrainingCalls()
        self._checkpointed = checkpointing_off([b.module for b in self.blocks], f"the blocks at {self.path!r}")
        if resident and self.preloads:  # forward starts loading streamed blocks while the resident ones compute
            self._hooks += [m.register_forward_pre_hook(self._preload) for m in list(self.container)[:resident]]
        if any(b.module._compiled_call_impl is not None for b in self.blocks):
            warnings.warn(f"lightning_vdnn: the blocks at {self.path!r} were compiled with Module.compile(); layer "
                          "streaming runs them eagerly (compilation is restored at teardown).", stacklevel=2)
        for b in self.blocks:
            self._forwards.append((b.module.__dict__.get("forward"), b.module.forward, b.module._compiled_call_impl))
            b.module._compiled_call_impl = None  # the streamed forward runs the block's own forward eagerly
            b.module.forward = functools.partial(self._forward, b.index)
            self._hooks += [b.module.register_state_dict_pre_hook(functools.partial(self._before_read, b.index)),
                            b.module.register_load_state_dict_pre_hook(functools.partial(self._before_write, b.index))]

    #: Whether loads may run more than one block ahead, as each block's host update is done (off where a load is
    #: a collective every rank must issue in the same order: ``streaming/sharded.py``).
    preloads = True

    @classmethod
    def slot_count(cls, streamed: int, resident: int) -> int:
        """Device slots for ``streamed`` blocks behind ``resident`` ones: two (one computing, one arriving) while
        at least as many blocks stream as stay, as the host's updates then bound the step anyway; else enough to
        load half of the streamed ones before they start (a load takes about two forwards), at most
        :data:`MAX_SLOTS`."""
        if resident < streamed or not cls.preloads:
            return 2
        return max(2, min(streamed, MAX_SLOTS, streamed // 2 + 2))

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
                   saved_blocks=config.streamed_saves)

    def _new_block(self, index: int, module: nn.Module, pin: bool) -> HostBlock:
        """Hook (``streaming/sharded.py``): the host side of one streamed block."""
        return HostBlock(index, module, pin, self._arena.empty)

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
            # fused on a GPU run, where the plain optimizer would use a multi-tensor kernel too; on a CPU device
            # the per-tensor loop, which is what plain training runs there (bit-for-bit comparable)
            self.steppers.append(HostStepper(opt, self.blocks, eager=self.eager_updates, fused=self.engine.is_cuda))
            self._hooks.append(opt.register_step_pre_hook(self._before_step))
            self._hooks.append(opt.register_step_post_hook(self._after_step))

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

    def wait_grads(self) -> None:
        """Block until every streamed gradient has been added into host ``p.grad``."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

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
        for b, (own, _, compiled) in zip(self.blocks, self._forwards):
            if own is None:
                b.module.__dict__.pop("forward", None)
            else:
                b.module.forward = own
            b.module._compiled_call_impl = compiled
            b.release()
        checkpointing_on(self._checkpointed)
        self.slots, self.stage, self.grad_dev = [], None, None

    @property
    def resident(self) -> int:
        """How many leading blocks are not streamed (on the device, stepped by the ordinary optimizer)."""
        return len(self.container) - len(self.blocks)

    def stats(self) -> dict[str, Any]:
        """Bytes streamed in the last optimizer step, worker time of the blocks' host updates since the step
        before, and how long training waited for them (totals so far before the first step); the microbatches,
        the resident blocks and the saving ones."""
        fixed = {"microbatches": self.microbatches, "resident_blocks": self.resident,
                 "resident_recomputed_blocks": self.resident - self.recompute_from, "saved_blocks": len(self.saving)}
        if self._last_step is not None:
            return {**self._last_step, **fixed}
        return {"streamed_h2d_bytes": self.h2d_bytes, "streamed_d2h_bytes": self.d2h_bytes, "host_optimizer_ms": None,
                "host_update_wait_ms": None, **fixed}

    def _before_step(self, *_: Any) -> None:
        self.wait_grads()  # host grads complete before the body steps anything (device modules only, now)

    def _after_step(self, *_: Any) -> None:
        h2d, d2h = self._marks
        times = [s.take_times() for s in self.steppers]
        busy, waited = sum(t[0] for t in times), sum(t[1] for t in times)
        self._last_step = {"streamed_h2d_bytes": self.h2d_bytes - h2d, "streamed_d2h_bytes": self.d2h_bytes - d2h,
                           "host_optimizer_ms": busy, "host_update_wait_ms": waited}
        self._marks = (self.h2d_bytes, self.d2h_bytes)

    # -- forward -----------------------------------------------------------------------------------------
    def _where(self, index: int) -> str:
        return f"{type(self.blocks[index].module).__name__} at {self.path!r}"

    def _forward(self, index: int, *args: Any, **kwargs: Any) -> Any:
        """The streamed block's ``forward``: called as its parent calls it, returning what the block returns."""
        block = self.blocks[index]
        training = torch.is_grad_enabled()
        if training:
            if getattr(block.module, "gradient_checkpointing", False) is True:  # turned on after streaming began
                self._checkpointed += checkpointing_off([block.module], self._where(index))
            args, kwargs = self._hf_calls.strip(args, kwargs, self._where(index))
        call = CallFlat(args, kwargs)
        tensors = call.take()
        if training and (any(t.requires_grad for t in tensors) or any(p.requires_grad for p in block.params)):
            self._calls[index] += 1
            result = Result()
            outs = StreamedBlock.apply(self, index, call, result, self._anchor, *tensors)
            return result.flat.rebuild(outs)
        flat, outs, _ = self._run(index, call, tensors)
        return flat.rebuild(outs)

    def _run(self, index: int, call: CallFlat, tensors: Sequence[Tensor],
             states: Optional[list[ChunkState]] = None) -> tuple[Any, list[Tensor], Joined]:
        """Block ``index`` over the call, chunk by chunk on one resident slot. ``states`` (training) receives each
        chunk's RNG/autocast/buffer state, which backward replays. Returns the result's structure, its tensors
        and the chunks' layout (kept for backward)."""
        slot = self._acquire(index)
        block = self.blocks[index]
        plan = ChunkPlan(call, tensors, self.microbatches, self._where(index))
        joined = Joined(plan, self._where(index))
        with block.substituted(block.split(slot.buf)):
            for k, chunk in enumerate(plan.chunks(tensors)):
                state = ChunkState(self.device, self._buffers[index]) if states is not None else None
                joined.put(k, call.call(self._forwards[index][1], chunk), _shape(chunk, call))
                if state is not None:
                    state.ran()
                    states.append(state)
        slot.free = self.engine.record()
        self._prefetch(index, +1, slot, wrap=states is None)  # after queueing compute: a wait stalls no one
        flat, outs = joined.result()
        joined.forget_values()
        return flat, outs, joined

    def _run_saving(self, index: int, call: CallFlat, tensors: Sequence[Tensor]) -> tuple[Graph, Any, list[Tensor],
                                                                                            Joined]:
        """Block ``index`` over the call with autograd, chunk by chunk, from leaves standing in for its slot's
        weights: what autograd saves goes through :class:`SlotSaves`. Returns the graph, the result's structure
        and tensors (detached: the graph's ends are ports), and the chunks' layout."""
        slot = self._acquire(index)
        block = self.blocks[index]
        saves = SlotSaves(self, index, slot.buf)
        with torch.enable_grad():
            leaves = [v.detach().requires_grad_(p.requires_grad) for v, p in zip(block.split(slot.buf), block.params)]
            entered = [j for j, t in enumerate(tensors) if t.requires_grad]
            anchor = torch.empty(0, device=self.device, requires_grad=True) if entered else None
            entry_port, exit_port = Port(), Port()
            cut = [t.detach() for t in tensors]
            if anchor is not None:
                for j, t in zip(entered, Enter.apply(anchor, entry_port, *(tensors[j] for j in entered))):
                    cut[j] = t
            plan = ChunkPlan(call, cut, self.microbatches, self._where(index))
            joined = Joined(plan, self._where(index))
            with saves, block.substituted(leaves):
                for k, chunk in enumerate(plan.chunks(cut)):
                    joined.put(k, call.call(self._forwards[index][1], chunk), _shape(chunk, call))
            flat, outs = joined.result()
            graph = Graph(Exit.apply(exit_port, *outs), anchor, leaves, entry_port, exit_port, entered, len(tensors))
        slot.free = self.engine.record()
        self._prefetch(index, +1, slot)
        joined.forget_values()
        return graph, flat, [o.detach() for o in outs], joined

    # -- backward ----------------------------------------------------------------------------------------
    def _backward(self, index: int, call: CallFlat, tensors: Sequence[Tensor], grads: list[Optional[Tensor]],
                  states: list[ChunkState], layout: Joined, needs: Sequence[bool]) -> list[Optional[Tensor]]:
        """Recompute block ``index`` chunk by chunk as forward ran it; its weight gradients are summed on the
        device and cross to the host once. Returns the gradient of each of the call's tensors."""
        slot = self._acquire(index)
        self._prefetch(index, -1, slot)
        block = self.blocks[index]
        plan = layout.plan
        chunks = plan.chunks(tensors)
        dev, gins = None, [None] * len(chunks)
        saved = 0  # a chunk's saves are freed before the next chunk's reuse their memory: counted per chunk
        for k in reversed(range(len(chunks))):  # last chunk first, the order autograd would sum them in
            counter = SavedBytes(*tensors, *chunks[k], slot.buf) if self.measure_saved else None
            with counter if counter is not None else contextlib.nullcontext():
                gins[k], wgrads = self._recompute(index, slot, call, chunks[k], layout.grads_of_chunk(k, grads),
                                                  states[k], needs)
            saved += counter.nbytes if counter is not None else 0
            if dev is None:  # only now: the previous block's gradient copy overlapped this recompute
                dev = self._grad_buffer(block)
            block.pack_grads(dev, wgrads, first=k == len(chunks) - 1)
        if self.measure_saved:
            self.saved_bytes[index] = saved  # what the block saves over the whole batch, as a resident one would
        self._finish_backward(block, slot, dev)
        return plan.join_grads(gins)

    def _backward_saving(self, index: int, graph: Graph, grads: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """Backward through a saving block's forward graph, its weights back in a slot (any of the two)."""
        slot = self._acquire(index)
        self._prefetch(index, -1, slot)
        block = self.blocks[index]
        wants = ([graph.anchor] if graph.anchor is not None else []) + [w for w in graph.leaves if w.requires_grad]
        self._reading[index], graph.exit.grads = slot, tuple(grads)
        try:
            got = list(torch.autograd.grad(graph.root, wants, torch.empty_like(graph.root), allow_unused=True)
                       ) if wants else []
        finally:
            del self._reading[index]
        it = iter(got[1:] if graph.anchor is not None else got)
        dev = self._grad_buffer(block)
        block.pack_grads(dev, [next(it) if w.requires_grad else None for w in graph.leaves], first=True)
        self._finish_backward(block, slot, dev)
        return graph.input_grads()

    def _slot_view(self, saved: SlotView) -> Tensor:
        """A saved view of block ``saved.index``'s weights, from the slot its backward acquired."""
        slot = self._reading.get(saved.index)
        if slot is None:
            raise RuntimeError(self._once(saved.index))
        return slot.buf.as_strided(saved.size, saved.stride, slot.buf.storage_offset() + saved.offset)

    def _once(self, index: int) -> str:
        return (f"layer streaming: block {index} at {self.path!r} saved its activations (saved_blocks), and they were "
                "read a second time, or outside its backward (backward(retain_graph=True) run twice, or autograd.grad "
                "on a tensor inside the block). A saving block supports one backward per forward; with saved_blocks=0 "
                "every streamed block recomputes, which supports more.")

    def _finish_backward(self, block: HostBlock, slot: _Slot, dev: Tensor) -> None:
        """The block's slot free for the next load, its gradients on their way to the host."""
        slot.free = self.engine.record()
        self._calls[block.index] -= 1
        self._push_grads(block, dev, final=self._calls[block.index] <= 0)
        if not self._drain_queued:
            self._drain_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._drain)

    def _recompute(self, index: int, slot: _Slot, call: CallFlat, chunk: list[Tensor],
                   grads: list[Optional[Tensor]], state: ChunkState,
                   needs: Sequence[bool]) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        """One chunk's forward again, with autograd, from its recorded state: (the call's tensors' grads, the
        weight grads)."""
        block = self.blocks[index]
        with state.replay():
            ins = [t.detach().requires_grad_(need) for t, need in zip(chunk, needs)]
            leaves = [v.detach().requires_grad_(p.requires_grad) for v, p in zip(block.split(slot.buf), block.params)]
            with block.substituted(leaves):
                outs = Flat(call.call(self._forwards[index][1], ins)).take()
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wants = [x for x in ins if x.requires_grad] + [w for w in leaves if w.requires_grad]
        got = list(torch.autograd.grad([o for o, _ in pairs], wants, [g for _, g in pairs], allow_unused=True)
                   ) if pairs and wants else [None] * len(wants)
        it = iter(got)
        gins = [next(it) if x.requires_grad else None for x in ins]
        return gins, [next(it) if w.requires_grad else None for w in leaves]

    def _drain(self) -> None:
        self._drain_queued = False
        self._direct.clear()
        self._calls = [0] * len(self.blocks)
        self.wait_grads()

    def _grad_buffer(self, block: HostBlock) -> Tensor:
        """The device buffer the block's weight grads are packed into, once the previous block's copy has left it."""
        if self.engine.is_cuda and self._grad_dev_free is not None:
            self.engine.current_stream().wait_event(self._grad_dev_free)
        return self.grad_dev[: block.numel]

    def _push_grads(self, block: HostBlock, dev: Tensor, final: bool) -> None:
        """Copy the block's packed weight grads (``dev``) to the host: straight into ``grad_flat`` when the
        block has no gradient yet, else into a staging buffer a worker adds from. When they are the step's
        final gradients, the block's host update is queued right behind them."""
        eng = self.engine
        dev = self._reduce(block, dev)
        produced = eng.record()
        direct = block.index not in self._direct and block.can_adopt()
        if direct:
            self._direct.add(block.index)
            host = block.grad_flat[: dev.numel()]
        else:
            turn = self._grad_turn = 1 - self._grad_turn
            if self._host_busy[turn] is not None:
                self._host_busy[turn].result()  # the worker is done adding from this staging buffer
            host = self.grad_host[turn][: dev.numel()]
        with eng.stream(eng.d2h):
            if eng.is_cuda:
                eng.d2h.wait_event(produced)
            host.copy_(dev, non_blocking=True)
            done = self._grad_dev_free = eng.record(eng.d2h)
        self.d2h_bytes += dev.nbytes
        steppers = [s for s in self.steppers if s.can_update_now()] if final else []
        fut = self._workers.submit(_land_grads, block, host, done, direct, steppers)
        if not direct:
            self._host_busy[turn] = fut
        self._pending.append(fut)

    def _reduce(self, block: HostBlock, dev: Tensor) -> Tensor:
        """Hook (``streaming/sharded.py``): the device gradients this process copies to the host: all of the block's."""
        return dev

    # -- slots -------------------------------------------------------------------------------------------
    def _acquire(self, index: int) -> _Slot:
        """A slot holding block ``index``'s current weights, ready for the compute stream."""
        slot = self._fetch(index, None, wait=True)  # its host update, if one is queued, comes first
        if self.engine.is_cuda:
            self.engine.current_stream().wait_event(slot.ready)
        return slot

    def _prefetch(self, index: int, step: int, busy: _Slot, wrap: bool = False) -> None:
        """Load the blocks after ``index`` (``step`` +1: forward, -1: backward) into the slots other than
        ``busy``: the next one waiting for its host update, as it is needed next anyway; further ones only once
        theirs is written, so the training thread never waits for a block it does not need yet."""
        for ahead in range(1, len(self.slots)):
            nxt = index + step * ahead
            if wrap:
                nxt %= len(self.blocks)
            if not 0 <= nxt < len(self.blocks) or nxt == index or self._fetch(nxt, busy, wait=ahead == 1) is None:
                return

    def _preload(self, *_: Any) -> None:
        """Forward pre-hook of the resident blocks: the first streamed blocks into the slots, as far as their
        host updates are done."""
        if torch._C._current_graph_task_id() != -1 and not self.eager_updates:
            return  # a resident block's recompute in backward: the streamed blocks' updates come at the step
        for index in range(min(len(self.slots), len(self.blocks))):
            if self._fetch(index, None, wait=False) is None:
                return

    def _fetch(self, index: int, busy: Optional[_Slot], wait: bool) -> Optional[_Slot]:
        """The slot holding block ``index``, loaded into the least recently used one other than ``busy`` unless
        one holds it already; None, doing nothing, when its host update is still queued and ``wait`` is false."""
        if not wait and not all(stepper.ready(index) for stepper in self.steppers):
            return None
        for stepper in self.steppers:
            stepper.wait(index)
        slot = self._resident(index)
        if slot is None:
            slot = min((s for s in self.slots if s is not busy), key=lambda s: s.used)
            self._load(index, slot)
        self._clock += 1
        slot.used = self._clock  # wanted soon: the slots of blocks already computed go first
        return slot

    def _resident(self, index: int) -> Optional[_Slot]:
        version = self.blocks[index].version()
        return next((s for s in self.slots if s.block == index and s.version == version), None)

    def _load(self, index: int, slot: _Slot) -> None:
        """Copy block ``index`` host -> ``slot`` on the h2d stream, casting to the compute dtype on the device."""
        block, eng = self.blocks[index], self.engine
        with eng.stream(eng.h2d):
            if eng.is_cuda and slot.free is not None:
                eng.h2d.wait_event(slot.free)
            self._fill(block, slot.buf)
            slot.ready = block.read_done = eng.record(eng.h2d)
        slot.block, slot.version = index, block.version()

    def _fill(self, block: HostBlock, buf: Tensor) -> None:
        """Hook (``streaming/sharded.py``), on the h2d stream: the block's host weights into ``buf``, in the compute dtype."""
        self._to_device(block.flat, buf[: block.numel])

    def _to_device(self, host: Tensor, dst: Tensor) -> None:
        if self.stage is None:
            dst.copy_(host, non_blocking=True)
        else:
            staged = self.stage[: host.numel()]
            staged.copy_(host, non_blocking=True)
            dst.copy_(staged)
        self.h2d_bytes += host.nbytes


def spread(count: int, total: int) -> frozenset[int]:
    """``min(count, total)`` indices of ``range(total)``, evenly spaced: what saving blocks move to the host
    then loads the copy engine evenly through the pass."""
    count = min(count, total)
    return frozenset(int((j + 0.5) * total / count) for j in range(count)) if count else frozenset()


def _shape(chunk: Sequence[Tensor], call: CallFlat) -> tuple[int, ...]:
    return tuple(chunk[call.first].shape) if chunk else ()


def _land_grads(block: HostBlock, host: Tensor, done: Any, direct: bool, steppers: list[HostStepper]) -> None:
    """Worker: make the copied gradients the block's ``p.grad`` (or add them), then queue its host update."""
    if direct:
        adopt_grads(block, done)
    else:
        accumulate_from(block, host, done)
    for stepper in steppers:
        stepper.submit(block.index)
