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
- it holds running statistics (BatchNorm): kept from whole recompute as before (a selective one replays its
  buffers, ``buffers.py``, as a segment does);
- its ``forward`` is already replaced on the instance: something else owns its forward (a module compiled by
  itself is recomputed around its compiled call, ``offload/recompute.py``; not in a segment, not selectively);
- it is the part of forward before the first layer: no module to run again.

A run of consecutive layers recomputed as one segment (``offload/recompute.py``: :class:`SegmentRunner`) is looser:
inside it, saves again by a later layer of the run, in-place changes of an inner layer's input and BatchNorm (its
buffers are replayed, ``buffers.py``) are fine. What a segment needs is in :class:`SegmentFacts`: the run is a
chain (each layer after the first takes the previous one's output, the code between them saves nothing), and no
tensor saved inside it is saved again after it.

Selective recompute (``offload/selective.py``) holds what whole recompute holds plus the outputs of the layer's
expensive ops, which :class:`~lightning_vdnn.offload.selective.SavedOpsProbe` measures as the layer runs, with
the share of its op time a selective recompute runs again; it is refused where whole recompute is (BatchNorm
aside) and where the forward modifies a saved op's output in place.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_vdnn.buffers import running_stats
from lightning_vdnn.offload.selective import OpsFacts, SavedOpsProbe
from lightning_vdnn.offload.spans import Span


@dataclass(frozen=True)
class SelectiveFacts:
    """What recomputing a layer selectively would hold and cost (``offload/selective.py``).

    Attributes:
        held_bytes: what it holds from forward to backward: what whole recompute holds (its inputs, the code after
            it) and the storages of its expensive ops' outputs, whole and each once.
        unrebuilt_bytes: what its recompute does not rebuild of what it saves: what whole recompute holds (as
            ``LayerProfile.rebuilt_bytes`` counts it) and the kept outputs that autograd saves too.
        share: the share of its forward's op time the recompute runs again (the cheap ops).
    """

    held_bytes: int
    unrebuilt_bytes: int
    share: float


@dataclass(frozen=True)
class SegmentFacts:
    """What a layer contributes to a recomputed segment (a run of consecutive layers, its input saved, everything
    inside rebuilt in backward).

    Attributes:
        starts: a segment may start here: a module that can run again, that does not modify its input in place.
        joins: a segment that holds the previous layer may continue into this one: the code between them saved
            nothing, and each tensor it takes that needs a gradient is the previous layer's output.
        reach: a segment holding this layer must end after layer ``reach``: the last layer (or, as ``g + 1``, the
            code after layer ``g``) that saves again a tensor this layer saved or took as input.
        input_bytes: its inputs that no earlier layer saved: what a segment starting here saves as it starts.
        own_input_bytes: of those, the bytes this layer saves itself (part of its ``saved_bytes``).
        tail_bytes: what the code after it saves before the next layer (held when a segment ends here).
        inner_storage_bytes: the storages its forward saves that nothing saved or took in before it, whole and
            each once (views of one buffer, as attention's q, k and v, overlap as spans): what a recompute rebuilds.
        own_input_storage_bytes: the storages of its inputs that it saves itself, whole and each once.
    """

    starts: bool
    joins: bool
    reach: int
    input_bytes: int = 0
    own_input_bytes: int = 0
    tail_bytes: int = 0
    inner_storage_bytes: Optional[int] = None
    own_input_storage_bytes: Optional[int] = None


def _segment_unfit(module: nn.Module) -> bool:
    """Whether something else owns ``module``'s forward: it cannot be run again as part of a segment."""
    return "forward" in vars(module) or getattr(module, "_compiled_call_impl", None) is not None


def _unfit(module: nn.Module) -> Optional[str]:
    """Why ``module`` may not run under a checkpoint whatever the pass does (None: it may)."""
    if "forward" in vars(module):
        return "its forward is replaced on the instance (layer streaming, another wrapper)"
    return None


class LayerProbe:
    """Follows one pass's saves and layer inputs; :meth:`recompute_bytes` answers per layer.

    Args:
        min_bytes: saves smaller than this stay on the device whatever the plan (``min_offload_bytes``): they are
            in the floor, not in a layer's bytes.
        device: where the layers compute (their ops are timed there).
        seen: layer calls whose ops earlier passes watched, ``(layer, module, input shapes) -> (probe, layer)``,
            shared by the passes: a layer's ops are watched once (``offload/selective.py``), then reused.
        watch_ops: watch the layers' ops at all; without, no layer may be recomputed selectively.
    """

    def __init__(self, min_bytes: int, device: torch.device = torch.device("cpu"),
                 seen: Optional[dict] = None, watch_ops: bool = True) -> None:
        self.min_bytes = min_bytes
        self.watch_ops = watch_ops
        self.ops = SavedOpsProbe(device)
        self._seen = {} if seen is None else seen
        self._running: set[int] = set()  # layers with running statistics: no whole recompute
        self._cached_saved: dict[int, int] = collections.defaultdict(int)
        self._cached_seen: dict[int, weakref.ref] = {}  # address -> storage: counted in _cached_saved
        self._known: dict[int, OpsFacts] = {}  # layers whose ops an earlier pass watched
        self.blocked: dict[int, str] = {0: "it is the part of forward before the first layer"}
        self._bytes: dict[int, int] = collections.defaultdict(int)
        self._first: dict[Span, list] = {}  # span -> [storage ref, group, kind, saved by its own layer]
        self._group = 0
        self._inside = False
        self._versions: list[tuple[torch.Tensor, int]] = []
        # segments (SegmentFacts): per layer
        self._in: dict[int, int] = collections.defaultdict(int)
        self._own_in: dict[int, int] = collections.defaultdict(int)
        self._tail: dict[int, int] = collections.defaultdict(int)
        self._tail_saves: dict[int, int] = collections.defaultdict(int)
        self._reach: dict[int, int] = {}
        self._no_start: set[int] = {0}
        self._no_join: set[int] = {0, 1}
        self._output: tuple[int, list] = (-1, [])  # (layer, weak refs to the tensors it returned)
        self._storages: dict[int, list] = {}  # address -> [storage ref, layer, taken in (not saved) by it]
        self._inner_st: dict[int, int] = collections.defaultdict(int)
        self._own_in_st: dict[int, int] = collections.defaultdict(int)

    def recompute_bytes(self, group: int) -> Optional[int]:
        """Bytes layer ``group`` would still save if recomputed; None if it may not be."""
        return None if group in self.blocked or group in self._running else self._bytes.get(group, 0)

    def selective(self, group: int) -> Optional[SelectiveFacts]:
        """What recomputing layer ``group`` selectively holds and costs; None if it may not be."""
        ops = self.ops_facts(group)
        if group in self.blocked or ops is None or ops.mutated:
            return None
        held = self._bytes.get(group, 0)
        return SelectiveFacts(held + ops.kept_bytes, held + ops.saved_bytes, ops.share)

    def ops_facts(self, group: int) -> Optional[OpsFacts]:
        """Layer ``group``'s ops, watched in this pass or given to :meth:`enter`; None: not watched."""
        if group in self._known:
            return self._known[group]
        if group not in self.ops.watched:
            return None
        return OpsFacts(self.ops.bytes.get(group, 0), self._cached_saved.get(group, 0), self.ops.share(group),
                        group in self.ops.mutated)

    def abort(self) -> None:
        """The pass failed inside a layer: stop watching its ops."""
        self.ops.exit()

    def segment_facts(self, group: int) -> SegmentFacts:
        """What layer ``group`` contributes to a recomputed segment (:class:`SegmentFacts`)."""
        return SegmentFacts(starts=group not in self._no_start, joins=group not in self._no_join,
                            reach=self._reach.get(group, group), input_bytes=self._in.get(group, 0),
                            own_input_bytes=self._own_in.get(group, 0), tail_bytes=self._tail.get(group, 0),
                            inner_storage_bytes=self._inner_st.get(group, 0),
                            own_input_storage_bytes=self._own_in_st.get(group, 0))

    def enter(self, group: int, module: nn.Module, inputs: list[tuple[Span, int, torch.Tensor]],
              tensors: Optional[list[torch.Tensor]] = None) -> None:
        """Layer ``group`` (``module``) starts with these tensor inputs (span, bytes, tensor) of the ones it takes
        (``tensors``, all of them: a segment's chain is checked on those)."""
        self._group, self._inside = group, True
        reason = _unfit(module)
        if reason is not None:
            self._block(group, reason)
        if running_stats(module):
            self._running.add(group)
        if _segment_unfit(module):
            self._no_start.add(group)
            self._no_join.update((group, group + 1))
        if not self._chained(group, tensors if tensors is not None else [t for _, _, t in inputs]):
            self._no_join.add(group)
        self._versions = [(t, t._version) for _, _, t in inputs if not t.is_inference()]  # no counter there
        for _, _, t in inputs:
            if self._storage(t) is None:
                self._storages[t.untyped_storage().data_ptr()] = [weakref.ref(t.untyped_storage()), group, True]
        for span, nbytes, t in inputs:
            owner = self._owner(span, t)
            if owner is not None and owner[1] == group:
                continue  # the same tensor twice
            if owner is not None and owner[2] == "inner":
                self._block(owner[1], "a tensor it saves is the input of a later layer")
                self._reach_to(owner[1], group)
            if owner is not None and owner[2] == "input" and owner[3]:  # inside a segment it would not be saved
                self._reach_to(owner[1], group)
            if owner is None or (owner[2] == "input" and not owner[3]):  # nobody saved it: the checkpoint will
                if nbytes >= self.min_bytes:
                    self._bytes[group] += nbytes
                    self._in[group] += nbytes
                if owner is None:
                    self._first[span] = [weakref.ref(t.untyped_storage()), group, "input", False]
        # not in a compiled call: SAC's dispatch modes stay out of it
        if self.watch_ops and reason is None and not _segment_unfit(module):
            self._watch_ops(group, module, tensors if tensors is not None else [t for _, _, t in inputs])

    def exit(self, group: int, output: Any = None) -> None:
        """Layer ``group``'s forward returned ``output``: later saves are the code after it."""
        self.ops.exit()
        if any(t._version != v for t, v in self._versions):
            self._block(group, "its forward modifies an input in place")
            self._no_start.add(group)
        self._versions, self._inside = [], False
        leaves = torch.utils._pytree.tree_leaves(output)
        self._output = (group, [weakref.ref(t) for t in leaves if isinstance(t, torch.Tensor)])

    def _watch_ops(self, group: int, module: nn.Module, tensors: list[torch.Tensor]) -> None:
        """Watch the layer's ops, unless an earlier pass did for the same call (then take what it saw)."""
        key = (group, id(module), tuple(tuple(t.shape) for t in tensors))
        seen = self._seen.get(key)
        known = seen[0].ops_facts(seen[1]) if seen is not None else None
        if known is not None:
            self._known[group] = known
        else:
            self.ops.enter(group)
            self._seen[key] = (self, group)

    def _chained(self, group: int, tensors: list[torch.Tensor]) -> bool:
        """Whether layer ``group`` continues a chain from the layer before: that one returned right before it, the
        code between saved nothing, and every tensor it takes that needs a gradient is one that layer returned."""
        last, refs = self._output
        if last != group - 1 or self._tail_saves.get(last, 0):
            return False
        returned = {id(r()) for r in refs if r() is not None}
        return all(id(t) in returned for t in tensors if t.requires_grad)

    def saved(self, span: Span, nbytes: int, t: torch.Tensor, group: int) -> None:
        """Autograd saved ``t`` (covering ``span``) while layer ``group`` (or the code after it) ran."""
        owner = self._owner(span, t)
        inside = self._inside and group == self._group
        if not inside:
            self._tail_saves[group] += 1
        else:
            self._count_storage(t, group)
            storage = t.untyped_storage()
            seen = self._cached_seen.get(storage.data_ptr())
            if self.ops.cached_storage(t, group) and (seen is None or seen() is not storage):
                self._cached_seen[storage.data_ptr()] = weakref.ref(storage)
                self._cached_saved[group] += storage.nbytes()
        if owner is None:
            self._first[span] = [weakref.ref(t.untyped_storage()), group, "inner" if inside else "tail", True]
            if not inside and nbytes >= self.min_bytes:
                self._bytes[group] += nbytes
                self._tail[group] += nbytes
            return
        _, first, kind, saved = owner
        if kind == "input":
            if first == group and not saved and inside and nbytes >= self.min_bytes:
                self._own_in[group] += nbytes
            if first == group and inside:
                owner[3] = True  # its own input, saved by itself: counted when it started
                return
            if first != group and not saved:
                self._block(first, "a later layer saves its input, which it does not save itself")
            self._reach_to(first, group if inside else group + 1)
        elif kind == "inner" and (first != group or not inside):
            self._block(first, "a tensor it saves inside is saved again after it")
            self._reach_to(first, group if inside else group + 1)

    def _storage(self, t: torch.Tensor) -> Optional[list]:
        seen = self._storages.get(t.untyped_storage().data_ptr())
        return seen if seen is not None and seen[0]() is t.untyped_storage() else None

    def _count_storage(self, t: torch.Tensor, group: int) -> None:
        """A save inside layer ``group``: its whole storage counts once, for the first layer that saved it."""
        storage, seen = t.untyped_storage(), self._storage(t)
        if storage.nbytes() < self.min_bytes:
            return
        if seen is None:
            self._storages[storage.data_ptr()] = [weakref.ref(storage), group, False]
            self._inner_st[group] += storage.nbytes()
        elif seen[2] and seen[1] == group:  # its own input, saved by itself
            seen[2] = False
            self._own_in_st[group] += storage.nbytes()

    def _reach_to(self, group: int, later: int) -> None:
        self._reach[group] = max(self._reach.get(group, group), later)

    def _owner(self, span: Span, t: torch.Tensor) -> Optional[list]:
        owner = self._first.get(span)
        if owner is not None and owner[0]() is not t.untyped_storage():
            return None  # a freed tensor's address, reused
        return owner

    def _block(self, group: int, reason: str) -> None:
        self.blocked.setdefault(group, reason)
