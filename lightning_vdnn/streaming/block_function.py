"""The autograd side of one streamed block call: the ``Function`` that stands in the user's graph for the block,
and the pieces a saving block's kept forward graph is cut out with.

A call's tensors go in flat (``block_calls.CallFlat``) and its result's tensors come out flat; the structures
around them (keyword arguments, ``None``, tuples, ``ModelOutput``) ride along on the Python side, so any block
signature streams. Every input tensor that needs a gradient gets the one plain autograd would give it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from lightning_vdnn.compiled import eager
from lightning_vdnn.integrations.adapters.torch import backward_accumulates
from lightning_vdnn.streaming.calls import CallFlat, Flat
from lightning_vdnn.streaming.inner_hooks import InnerOutputs

if TYPE_CHECKING:
    from lightning_vdnn.streaming.streamer import LayerStreamer

#: Leading arguments of :class:`StreamedBlock` that are not the call's tensors.
_HEAD = 5


class Result:
    """Where :class:`StreamedBlock` leaves the structure of the block's result (a ``Function`` returns tensors)."""

    __slots__ = ("flat", "inner")

    def __init__(self) -> None:
        self.flat: Optional[Flat] = None
        self.inner: Optional[InnerOutputs] = None  # the outputs of its hooked modules, which follow the block's


class StreamedBlock(torch.autograd.Function):
    """One streamed block call: forward keeping nothing of its own (``block_runs._as_with_autograd``), saving only the
    call's tensors; backward recomputes it, chunk by chunk from each chunk's recorded state. A block in
    ``streamer.saving`` keeps its forward's graph instead, and backward runs it."""

    @staticmethod
    def forward(ctx: Any, streamer: "LayerStreamer", index: int, call: CallFlat, result: Result, anchor: Tensor,
                *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.streamer, ctx.index, ctx.call, ctx.states, ctx.graph = streamer, index, call, [], None
        hooks = streamer._inner_hooks(index)
        # a block with hooked modules inside recomputes: their outputs' gradients reach backward through it
        ctx.saving = index in streamer.saving and not hooks
        inner = None
        if ctx.saving:
            ctx.graph, flat, outs, ctx.layout = streamer._run_saving(index, call, tensors)
        else:
            ctx.save_for_backward(*tensors)
            flat, outs, ctx.layout, inner = streamer._run(index, call, tensors, hooks, ctx.states)
        if not outs:
            raise TypeError(f"{streamer._where(index)} returned no tensor; layer streaming needs blocks whose result "
                            "holds at least one tensor.")
        result.flat, result.inner = flat, inner
        ctx.count, ctx.inner = len(outs), inner.layout() if inner is not None else None
        extra = inner.tensors if inner is not None else []
        # what the block's own forward made no gradient for (a mask, a position bias passed on) stays so, as in
        # plain training: kernels that choose by it (attention with a mask) then choose alike in the next block
        wanted = list(ctx.layout.wanted) + (inner.wanted if inner is not None else [])
        ctx.mark_non_differentiable(*(o for o, w in zip(outs + extra, wanted)
                                      if not w or not (o.is_floating_point() or o.is_complex())))
        return tuple(outs) + tuple(extra)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple:
        if torch.is_grad_enabled():  # the engine runs backward with grad mode on only under create_graph=True
            raise RuntimeError(
                f"layer streaming: a backward with create_graph=True (a gradient penalty, a double backward) reached "
                f"{ctx.streamer._where(ctx.index)}; a streamed block's backward recomputes the block and its "
                "gradients carry no graph, so the penalty's own gradient through the blocks would be lost. Train this "
                "model without layer streaming (layer_streaming=False: activation offload keeps plain autograd).")
        needs = ctx.needs_input_grad[_HEAD:]
        # torch.autograd.grad(loss, inputs) (input gradients, adversarial examples) leaves parameters' .grad alone
        weights = backward_accumulates(ctx.streamer._anchor)
        if ctx.saving:
            graph, ctx.graph = ctx.graph, None  # its saves are freed as soon as backward is done with them
            if graph is None:
                raise RuntimeError(ctx.streamer._once(ctx.index))
            gins = ctx.streamer._backward_saving(ctx.index, graph, list(grads), weights)
        else:
            gins = ctx.streamer._backward(ctx.index, ctx.call, ctx.saved_tensors, list(grads[:ctx.count]), ctx.states,
                                          ctx.layout, needs, weights, ctx.inner, grads[ctx.count:])
        return (None,) * _HEAD + tuple(g if need else None for g, need in zip(gins, needs))


class Port:
    """Where gradients cross one end of a saving block's graph."""

    __slots__ = ("grads",)

    def __init__(self) -> None:
        self.grads: Optional[tuple] = None


class Graph:
    """A saving block's forward, kept for its backward. It holds neither the block's inputs nor its outputs (the
    offloader may have moved both): gradients cross its two ends through ports instead (:class:`Enter`,
    :class:`Exit`), and ``root``, ``anchor`` are empty tensors. ``entered``: the call's tensors that needed a
    gradient, by position."""

    __slots__ = ("root", "anchor", "leaves", "enter", "exit", "entered", "count")

    def __init__(self, root: Tensor, anchor: Optional[Tensor], leaves: list[Tensor], enter: Port, exit: Port,
                 entered: list[int], count: int) -> None:
        self.root, self.anchor, self.leaves, self.enter, self.exit = root, anchor, leaves, enter, exit
        self.entered, self.count = entered, count

    def input_grads(self) -> list[Optional[Tensor]]:
        """Per tensor of the call, the gradient the block's backward left at its entry (None where none)."""
        out: list[Optional[Tensor]] = [None] * self.count
        for j, g in zip(self.entered, self.enter.grads or ()):
            out[j] = g
        self.enter.grads = None
        return out


class Enter(torch.autograd.Function):
    """The block's inputs, cut from their storages' owners: backward leaves their gradients in ``port``."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, port: Port, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.port = port
        return tuple(x.detach() for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple:
        ctx.port.grads = grads
        return (None, None) + (None,) * len(grads)


class Exit(torch.autograd.Function):
    """An empty root standing for the block's outputs: backward feeds in the gradients left in ``port``."""

    @staticmethod
    def forward(ctx: Any, port: Port, *outs: Tensor) -> Tensor:
        ctx.port = port
        return outs[0].new_empty(0)

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple:
        grads, ctx.port.grads = ctx.port.grads, None
        return (None,) + tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:]))


class SlotView:
    """A saved view of a slot's weights: backward rebuilds it from the slot holding the block then."""

    __slots__ = ("index", "offset", "size", "stride")

    def __init__(self, index: int, offset: int, t: Tensor) -> None:
        self.index, self.offset, self.size, self.stride = index, offset, tuple(t.shape), t.stride()


class SlotSaves(torch.autograd.graph.saved_tensors_hooks):
    """Saves of a saving block's forward: views of its slot become :class:`SlotView` (the slot will hold other
    blocks by backward), the rest go to the enclosing hooks (the offloader) or are kept as they are. (Nothing
    measures them: the budget's residency reads ``saved_bytes`` from its first step, in which every streamed
    block recomputes.)"""

    def __init__(self, streamer: "LayerStreamer", index: int, buf: Tensor) -> None:
        self.streamer, self.index, self.buf = streamer, index, buf
        self.ptr = buf.untyped_storage().data_ptr()
        # the hooks this block's saves would meet without streaming: an offloader's, or none
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        self.outer_pack, self.outer_unpack = outer if outer is not None else (None, None)
        super().__init__(self._pack, self._unpack)

    @eager
    def _pack(self, t: Tensor) -> Any:
        if t.untyped_storage().data_ptr() == self.ptr and t.dtype == self.buf.dtype:
            return SlotView(self.index, t.storage_offset() - self.buf.storage_offset(), t)
        return (self.outer_unpack, self.outer_pack(t)) if self.outer_pack is not None else (None, t)

    @eager
    def _unpack(self, saved: Any) -> Tensor:
        if isinstance(saved, SlotView):
            return self.streamer._slot_view(saved)
        unpack, packed = saved
        return unpack(packed) if unpack is not None else packed


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts what autograd saves inside it, each storage once, less the storages of ``exclude`` (the block's
    inputs, which streaming saves anyway, and the slot holding its weights)."""

    def __init__(self, *exclude: Tensor) -> None:
        self.nbytes = 0
        self._seen = {t.untyped_storage().data_ptr() for t in exclude}
        super().__init__(self._pack, lambda t: t)

    @eager
    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.nbytes += storage.nbytes()
        return t
