"""Saves that a kept layer need not hold: the output of a pointwise activation (GELU, SiLU) whose input the layer
keeps anyway. Backward computes it again from that input, the moment the node that saved it reads it.

A transformer MLP saves ``fc`` 's output (GELU saves its input) and GELU's output (``proj`` saves its input): two
4h-wide tensors, about a fifth of what a GPT block saves. The second is one elementwise kernel away from the first,
so a plan that keeps a layer may keep it *lean* (``planning/activation_solver.py``): the output is packed as a
:class:`Rebuild` that holds the input (already held by the activation's own backward node: no new memory) and
runs the same op on it when unpacked. Same op, same input, same dtype: the bytes are those forward made, on the CPU
and on CUDA (elementwise kernels are deterministic), so training is exact.

How the input is found without running anything: the saved tensor (or the storage it views) has the activation's
backward node as ``grad_fn`` (``GeluBackward0``, ``SiluBackward0``); that node's input edge names the node and output
index that produced the input, and :class:`Producers` remembers, per pass, which saved tensor each ``(node, output)``
was and whether it stayed on the device. Only a dense, contiguous output that owns its storage, of its input's
shape and dtype, is rebuilt, and only from an input saved in the same layer and kept there.

Activations whose backward saves their *output* (ReLU, tanh, sigmoid) gain nothing: that output is held anyway.
No dispatch mode and no module hook is involved (``offload/selective.py`` 's op-level recompute runs every op of a
layer through Python); the host pays a dictionary entry and a node lookup per save of a lean layer (and, in the
profiling passes of a plan that may keep layers lean, of every layer).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lightning_vdnn.offload.ledger import SaveLedger

#: The backward nodes of pointwise activations that save their input, and the op that made their output.
_OPS: dict[str, Callable[[object], Callable[[torch.Tensor], torch.Tensor]]] = {
    "GeluBackward0": lambda node: _gelu(node._saved_approximate),  # read now: the recipe holds no node
    "SiluBackward0": lambda node: F.silu,
}


def _gelu(approximate: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.gelu(x, approximate=approximate)


class Rebuild:
    """What is packed for a saved activation output: its input and how to make it again, view included."""

    __slots__ = ("source", "op", "shape", "stride", "offset", "group")

    def __init__(self, source: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor], saved: torch.Tensor,
                 group: int) -> None:
        self.source, self.op, self.group = source, op, group
        self.shape, self.stride, self.offset = saved.shape, saved.stride(), saved.storage_offset()

    def tensor(self) -> torch.Tensor:
        """The saved tensor again: one kernel, in the dtype forward ran it in."""
        with torch.no_grad(), torch.autocast(self.source.device.type, enabled=False):
            return self.op(self.source).as_strided(self.shape, self.stride, self.offset)


class Match(NamedTuple):
    """A save that is a pointwise activation's output whose input its layer saved: the op that makes it, the input
    (None where nothing holds it any more: it left the device) and whether the input stayed on the device."""

    op: Callable[[torch.Tensor], torch.Tensor]
    source: Optional[torch.Tensor]
    kept: bool


class Producers:
    """One pass's saved tensors by the autograd output that made them, and whether each stayed on the device.

    Args:
        lean: the layers kept lean in this pass (their outputs are rebuilt).
        counts: a profiling pass: every layer's pointwise outputs are counted and timed for the planner.
    """

    def __init__(self, lean: frozenset[int], counts: bool) -> None:
        self.lean, self.counts = lean, counts
        self._by_output: dict[tuple[int, int], tuple] = {}

    def _watches(self, group: int) -> bool:
        return self.counts or group in self.lean

    def saw(self, t: torch.Tensor, kept: bool, group: int) -> None:
        """``t`` was saved in layer ``group``; ``kept``: as itself, on the device."""
        node = t.grad_fn if self._watches(group) else None
        if node is not None:
            # the node itself (autograd nodes take no weak references): held until the pass ends, as the graph does
            self._by_output[(id(node), t.output_nr)] = (node, weakref.ref(t), kept, group, t.shape, t.dtype,
                                                        t.is_contiguous())

    def match(self, saved: torch.Tensor, group: int) -> Optional[Match]:
        """For a save that is (a view of) a pointwise activation's output, dense and owning its storage, whose input
        layer ``group`` saved too, with its shape and dtype: how to make it again; else None."""
        out = saved if saved._base is None else saved._base
        node = out.grad_fn
        make = _OPS.get(node.name()) if node is not None else None
        if make is None or not _owns_its_storage(out):
            return None
        edge, nr = node.next_functions[0]
        found = self._by_output.get((id(edge), nr)) if edge is not None else None
        if found is None or found[0] is not edge or found[3] != group or found[4:] != (out.shape, out.dtype, True):
            return None
        return Match(make(node), found[1](), found[2])

    def rebuild(self, saved: torch.Tensor, group: int, ledger: "SaveLedger") -> Optional[Rebuild]:
        """What to pack for ``saved`` in layer ``group``: a :class:`Rebuild` where it is a pointwise output whose
        input stayed on the device and the layer is lean (its bytes still count in the layer's profile,
        ``ledger.rebuilt``); None: saved as any other. A profiling pass (``counts``) counts and times every such
        output in the ledger's trace, for the planner."""
        found = self.match(saved, group) if self._watches(group) else None
        if found is None:
            return None
        if self.counts:
            ledger.trace.time_pointwise(group, saved if saved._base is None else saved._base, found.op)
        if not (group in self.lean and found.kept and found.source is not None):
            return None
        ledger.rebuilt(saved.untyped_storage(), group)
        return Rebuild(found.source, found.op, saved, group)


def _owns_its_storage(t: torch.Tensor) -> bool:
    return (t.is_contiguous() and t.storage_offset() == 0 and t.layout == torch.strided
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())
