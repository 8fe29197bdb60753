"""What each layer would still save if recomputed, and whether it may be recomputed at all: watched in a pass that
recomputes nothing (the planner's profiling step).

A layer run under non-reentrant ``torch.utils.checkpoint`` saves nothing from inside its forward; through the
offloader's hooks go only its tensor inputs (the checkpoint saves them as the layer starts) and whatever the code
between it and the next layer saves (functional ops outside the module). So its recompute size ``r`` is: its
inputs that no earlier layer saved itself (otherwise they are that layer's bytes), plus that code's saves. The
probe sees every save of the pass and every layer's inputs, by the span of storage they cover (the offloader's
unit), and remembers who saved each span first: a layer's forward ("inner"), a layer as its input ("input"), or
the code after a layer ("tail").

A layer is not recomputed when that would change what other layers save, or what it computes:

- a tensor it saves inside is saved again later (by a later layer, or the code after it): recomputed, it would
  not save it, the later save would, and the profile's bytes would be wrong;
- a later layer saves one of its inputs that it does not save itself (the same, the other way round);
- its forward modifies an input in place (the checkpoint's saved input would be stale in backward);
- it holds running statistics (BatchNorm): a second forward would update them twice;
- its ``forward`` is already replaced on the instance, or it is compiled: something else owns its forward;
- it is the part of forward before the first layer: no module to run again.
"""

from __future__ import annotations

import collections
import weakref
from typing import Optional

import torch
from torch import nn

from lightning_vdnn.buffers import running_stats
from lightning_vdnn.offload.spans import Span


def _unfit(module: nn.Module) -> Optional[str]:
    """Why ``module`` may not run under a checkpoint whatever the pass does (None: it may)."""
    if "forward" in vars(module):
        return "its forward is replaced on the instance (layer streaming, another wrapper)"
    if getattr(module, "_compiled_call_impl", None) is not None:
        return "it is compiled (torch.compile)"
    if running_stats(module):
        return "it updates running statistics (BatchNorm), which a second forward would update twice"
    return None


class LayerProbe:
    """Follows one pass's saves and layer inputs; :meth:`recompute_bytes` answers per layer.

    Args:
        min_bytes: saves smaller than this stay on the device whatever the plan (``min_offload_bytes``): they are
            in the floor, not in a layer's bytes.
    """

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self.blocked: dict[int, str] = {0: "it is the part of forward before the first layer"}
        self._bytes: dict[int, int] = collections.defaultdict(int)
        self._first: dict[Span, list] = {}  # span -> [storage ref, group, kind, saved by its own layer]
        self._group = 0
        self._inside = False
        self._versions: list[tuple[torch.Tensor, int]] = []

    def recompute_bytes(self, group: int) -> Optional[int]:
        """Bytes layer ``group`` would still save if recomputed; None if it may not be."""
        return None if group in self.blocked else self._bytes.get(group, 0)

    def enter(self, group: int, module: nn.Module, inputs: list[tuple[Span, int, torch.Tensor]]) -> None:
        """Layer ``group`` (``module``) starts with these tensor inputs (span, bytes, tensor)."""
        self._group, self._inside = group, True
        reason = _unfit(module)
        if reason is not None:
            self._block(group, reason)
        self._versions = [(t, t._version) for _, _, t in inputs if not t.is_inference()]  # no counter there
        for span, nbytes, t in inputs:
            owner = self._owner(span, t)
            if owner is not None and owner[1] == group:
                continue  # the same tensor twice
            if owner is not None and owner[2] == "inner":
                self._block(owner[1], "a tensor it saves is the input of a later layer")
            if owner is None or (owner[2] == "input" and not owner[3]):  # nobody saved it: the checkpoint will
                if nbytes >= self.min_bytes:
                    self._bytes[group] += nbytes
                if owner is None:
                    self._first[span] = [weakref.ref(t.untyped_storage()), group, "input", False]

    def exit(self, group: int) -> None:
        """Layer ``group``'s forward returned: later saves are the code after it."""
        if any(t._version != v for t, v in self._versions):
            self._block(group, "its forward modifies an input in place")
        self._versions, self._inside = [], False

    def saved(self, span: Span, nbytes: int, t: torch.Tensor, group: int) -> None:
        """Autograd saved ``t`` (covering ``span``) while layer ``group`` (or the code after it) ran."""
        owner = self._owner(span, t)
        inside = self._inside and group == self._group
        if owner is None:
            self._first[span] = [weakref.ref(t.untyped_storage()), group, "inner" if inside else "tail", True]
            if not inside and nbytes >= self.min_bytes:
                self._bytes[group] += nbytes
            return
        _, first, kind, saved = owner
        if kind == "input":
            if first == group:
                owner[3] = True  # its own input, saved by itself: counted when it started
            elif not saved:
                self._block(first, "a later layer saves its input, which it does not save itself")
        elif kind == "inner" and (first != group or not inside):
            self._block(first, "a tensor it saves inside is saved again after it")

    def _owner(self, span: Span, t: torch.Tensor) -> Optional[list]:
        owner = self._first.get(span)
        if owner is not None and owner[0]() is not t.untyped_storage():
            return None  # a freed tensor's address, reused
        return owner

    def _block(self, group: int, reason: str) -> None:
        self.blocked.setdefault(group, reason)
