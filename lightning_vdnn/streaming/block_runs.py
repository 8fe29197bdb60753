"""Running a streamed block's calls: forward from the block's device slot, chunk by chunk, and backward by
recomputing it (or, for a saving block, through the graph its forward kept).

A call comes in as the parent made it; :class:`~lightning_vdnn.streaming.calls.CallFlat` takes it apart, the
autograd ``Function`` (``streaming/block_function.py``) carries its tensors, and the result goes back in the
structure the block returned. :class:`BlockRuns` is mixed into
:class:`~lightning_vdnn.streaming.streamer.LayerStreamer`, whose slots (``streaming/slots.py``) and gradient path
(``streaming/gradient_path.py``) it uses.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from lightning_vdnn.integrations.adapters.torch import uncompiled_call
from lightning_vdnn.streaming.block_function import (Enter, Exit, Graph, Port, Result, SavedBytes, SlotSaves,
                                                     SlotView, StreamedBlock)
from lightning_vdnn.streaming.calls import CallFlat, ChunkPlan, Flat, Joined
from lightning_vdnn.streaming.hf_conventions import checkpointing_off
from lightning_vdnn.streaming.inner_hooks import InnerHooks, InnerLayout, InnerOutputs, hooked_modules
from lightning_vdnn.streaming.microbatches import ChunkState, refuse_written_buffers
from lightning_vdnn.streaming.slots import Slot


class BlockRuns:
    """A streamed block's forward and backward (mixed into ``LayerStreamer``)."""

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
            count = len(outs) - (len(result.inner.tensors) if result.inner is not None else 0)
            if result.inner is not None:  # after the block, before its own hooks (``streaming/inner_hooks.py``)
                result.inner.run_hooks(outs[count:])
            return result.flat.rebuild(outs[:count])
        flat, outs, _, inner = self._run(index, call, tensors, self._inner_hooks(index))
        if inner is not None:
            inner.run_hooks(inner.tensors)
        return flat.rebuild(outs)

    def _inner_hooks(self, index: int) -> InnerHooks:
        """The hooked modules inside block ``index``, whose calls streaming captures, and the call to run it by."""
        block, forward = self.blocks[index].module, self._forwards[index]
        modules = hooked_modules(block)
        if not modules or forward.compiled is None:
            return InnerHooks(modules, forward.run)
        warnings.warn(f"lightning_vdnn: {type(block).__name__} is compiled by itself, and modules inside it have "
                      "forward hooks (transformers records router logits and attention weights so); layer streaming "
                      "runs such blocks eagerly while they have them, so that what the hooks keep reaches backward "
                      "and sees the whole batch.", stacklevel=2)
        return InnerHooks(modules, uncompiled_call(block))

    def _run(self, index: int, call: CallFlat, tensors: Sequence[Tensor], hooks: InnerHooks,
             states: Optional[list[ChunkState]] = None) -> tuple[Any, list[Tensor], Joined, Optional[InnerOutputs]]:
        """Block ``index`` over the call, chunk by chunk on one resident slot, by ``hooks.run`` (:meth:`_inner_hooks`).
        ``states`` (training) receives each chunk's RNG/autocast/buffer state, which backward replays. Returns the
        result's structure, its tensors, the chunks' layout (kept for backward) and the calls of its hooked modules
        (``streaming/inner_hooks.py``)."""
        slot = self._acquire(index)
        block = self.blocks[index]
        plan = ChunkPlan(call, tensors, self.microbatches, self._where(index))
        joined = Joined(plan, self._where(index))
        hooked: list[list] = []
        training = states is not None  # then as plain training runs it: see _as_with_autograd
        weights = block.leaves(slot.buf) if training else block.split(slot.buf)
        with block.substituted(weights), _as_with_autograd(training):
            for k, chunk in enumerate(plan.chunks(tensors)):
                hooked.append([])
                with hooks.capture(hooked[-1]):
                    if not training:
                        joined.put(k, call.call(hooks.run, chunk), _shape(chunk, call))
                        continue
                    state = ChunkState(self.device, self._buffers[index])
                    chunk = [t.detach().requires_grad_(t.requires_grad) for t in chunk]
                    outs, wanted = _detached(call.call(hooks.run, chunk))
                joined.wanted = joined.wanted or wanted
                joined.put(k, outs, _shape(chunk, call))
                state.ran()
                states.append(state)
                if k == 0 and len(plan.sizes) > 1:
                    refuse_written_buffers(self._buffers[index], state.buffers, self._where(index), len(plan.sizes))
        inner = InnerOutputs(hooks, hooked, plan.sizes, self._where(index)) if hooks else None
        slot.free = self.engine.record()
        self._prefetch(index, +1, slot, wrap=states is None)  # after queueing compute: a wait stalls no one
        flat, outs = joined.result()
        joined.forget_values()
        return flat, outs, joined, inner

    def _run_saving(self, index: int, call: CallFlat, tensors: Sequence[Tensor]) -> tuple[Graph, Any, list[Tensor],
                                                                                            Joined]:
        """Block ``index`` over the call with autograd, chunk by chunk, from leaves standing in for its slot's
        weights: what autograd saves goes through :class:`SlotSaves`. Returns the graph, the result's structure
        and tensors (detached: the graph's ends are ports), and the chunks' layout."""
        slot = self._acquire(index)
        block = self.blocks[index]
        saves = SlotSaves(self, index, slot.buf)
        with torch.enable_grad():
            leaves = block.leaves(slot.buf)
            entered = [j for j, t in enumerate(tensors) if t.requires_grad]
            anchor = torch.empty(0, device=self.device, requires_grad=True) if entered else None
            entry_port, exit_port = Port(), Port()
            cut = [t.detach() for t in tensors]
            if anchor is not None:
                for j, t in zip(entered, Enter.apply(anchor, entry_port, *(tensors[j] for j in entered))):
                    cut[j] = t
            plan = ChunkPlan(call, cut, self.microbatches, self._where(index))
            joined = Joined(plan, self._where(index))
            watch = self._buffers[index]
            before = watch.snapshot() if len(plan.sizes) > 1 else None
            with saves, block.substituted(leaves):
                for k, chunk in enumerate(plan.chunks(cut)):
                    joined.put(k, call.call(self._forwards[index].run, chunk), _shape(chunk, call))
                    if k == 0 and before is not None:
                        refuse_written_buffers(watch, before, self._where(index), len(plan.sizes))
            flat, outs = joined.result()
            joined.wanted = [o.requires_grad for o in outs]
            graph = Graph(Exit.apply(exit_port, *outs), anchor, leaves, entry_port, exit_port, entered, len(tensors))
        slot.free = self.engine.record()
        self._prefetch(index, +1, slot)
        joined.forget_values()
        return graph, flat, [o.detach() for o in outs], joined

    def _backward(self, index: int, call: CallFlat, tensors: Sequence[Tensor], grads: list[Optional[Tensor]],
                  states: list[ChunkState], layout: Joined, needs: Sequence[bool], weights: bool = True,
                  inner: Optional[InnerLayout] = None, inner_grads: Sequence[Optional[Tensor]] = ()
                  ) -> list[Optional[Tensor]]:
        """Recompute block ``index`` chunk by chunk as forward ran it; its weight gradients (where ``weights``:
        the pass accumulates into ``.grad``) are summed on the device and cross to the host once. Returns the
        gradient of each of the call's tensors. ``inner``: how the outputs of its hooked modules split over the
        chunks, ``inner_grads`` theirs."""
        slot = self._acquire(index)
        self._prefetch(index, -1, slot)
        block = self.blocks[index]
        hooks = self._inner_hooks(index)
        plan = layout.plan
        chunks = plan.chunks(tensors)
        dev, gins = None, [None] * len(chunks)
        saved = 0  # a chunk's saves are freed before the next chunk's reuse their memory: counted per chunk
        for k in reversed(range(len(chunks))):  # last chunk first, the order autograd would sum them in
            counter = SavedBytes(*tensors, *chunks[k], slot.buf) if self.measure_saved else None
            with counter if counter is not None else contextlib.nullcontext():
                extra = inner.grads_of_chunk(k, inner_grads) if inner is not None else []
                gins[k], wgrads = self._recompute(index, slot, call, chunks[k], layout.grads_of_chunk(k, grads),
                                                  states[k], needs, weights, hooks, extra)
            saved += counter.nbytes if counter is not None else 0
            if not weights:
                continue
            if dev is None:  # only now: the previous block's gradient copy overlapped this recompute
                dev = self._grad_buffer(block)
            block.pack_grads(dev, wgrads, first=k == len(chunks) - 1)
        if self.measure_saved:
            self.saved_bytes[index] = saved  # what the block saves over the whole batch, as a resident one would
        self._finish_backward(block, slot, dev)
        return plan.join_grads(gins)

    def _backward_saving(self, index: int, graph: Graph, grads: list[Optional[Tensor]],
                         weights: bool = True) -> list[Optional[Tensor]]:
        """Backward through a saving block's forward graph, its weights back in a slot (any of the two); the
        weights' gradients only where ``weights`` (as :meth:`_backward`)."""
        slot = self._acquire(index)
        self._prefetch(index, -1, slot)
        block = self.blocks[index]
        trained = [w for w in graph.leaves if w.requires_grad] if weights else []
        wants = ([graph.anchor] if graph.anchor is not None else []) + trained
        self._reading[index], graph.exit.grads = slot, tuple(grads)
        try:
            got = list(torch.autograd.grad(graph.root, wants, torch.empty_like(graph.root), allow_unused=True)
                       ) if wants else []
        finally:
            del self._reading[index]
        dev = None
        if weights:
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

    def _recompute(self, index: int, slot: Slot, call: CallFlat, chunk: list[Tensor],
                   grads: list[Optional[Tensor]], state: ChunkState, needs: Sequence[bool], weights: bool,
                   hooks: InnerHooks, inner_grads: Sequence[Optional[Tensor]]
                   ) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
        """One chunk's forward again, with autograd, from its recorded state: (the call's tensors' grads, the
        weight grads, None unless ``weights``). ``inner_grads``: those of its hooked modules' outputs, captured
        again."""
        block = self.blocks[index]
        hooked: list = []
        with state.replay():
            ins = [t.detach().requires_grad_(need) for t, need in zip(chunk, needs)]
            leaves = block.leaves(slot.buf)
            with block.substituted(leaves), hooks.capture(hooked):
                outs = Flat(call.call(hooks.run, ins)).take()
        if any(g is not None for g in inner_grads):
            outs, grads = outs + InnerLayout.leaves(hooked), list(grads) + list(inner_grads)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        trained = [w.requires_grad and weights for w in leaves]
        wants = [x for x in ins if x.requires_grad] + [w for w, t in zip(leaves, trained) if t]
        got = list(torch.autograd.grad([o for o, _ in pairs], wants, [g for _, g in pairs], allow_unused=True)
                   ) if pairs and wants else [None] * len(wants)
        it = iter(got)
        gins = [next(it) if x.requires_grad else None for x in ins]
        return gins, [next(it) if t else None for t in trained]


def spread(count: int, total: int) -> frozenset[int]:
    """``min(count, total)`` indices of ``range(total)``, evenly spaced: what saving blocks move to the host
    then loads the copy engine evenly through the pass."""
    count = min(count, total)
    return frozenset(int((j + 0.5) * total / count) for j in range(count)) if count else frozenset()


@contextlib.contextmanager
def _as_with_autograd(training: bool):
    """A training call's forward with autograd on, its saves dropped as they are made (backward recomputes them):
    kernels that choose by whether a gradient is wanted (scaled-dot-product attention with a mask, on the CPU and
    on CUDA) then choose as in plain training and in the recompute, so forward computes plain training's bits."""
    if not training:
        yield
        return
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _dropped):
        yield


def _drop(t: Tensor) -> None:
    return None


def _dropped(_: None) -> Tensor:
    raise RuntimeError("layer streaming: a tensor computed inside a streamed block reached backward by another way "
                       "than the block's outputs (kept on an attribute, or by a global hook), but a streamed block's "
                       "forward keeps no graph: backward recomputes the block from its inputs. Return the tensor "
                       "from the block, or record it with a forward hook on a module inside the block (such hooks "
                       "run once per call, on outputs that reach backward), or train with activation offload alone "
                       "(layer_streaming=False).")


def _detached(out: Any) -> tuple[Any, list[bool]]:
    """``out`` with its tensors cut from the forward's graph, and which of them it made differentiable (a mask or
    position bias a block passes on is not: the streamed block's outputs say so, ``StreamedBlock``)."""
    flat = Flat(out)
    tensors = flat.take()
    return flat.rebuild([t.detach() for t in tensors]), [t.requires_grad for t in tensors]


def _shape(chunk: Sequence[Tensor], call: CallFlat) -> tuple[int, ...]:
    """The shape of the chunk's batch tensor, for messages (a nested tensor's: its batch only)."""
    if not chunk:
        return ()
    t = chunk[call.first]
    return (t.size(0),) if t.is_nested else tuple(t.shape)
