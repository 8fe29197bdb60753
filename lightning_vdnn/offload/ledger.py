"""What one pass's saves hold on the device and what they copy, layer by layer: the offloader's bookkeeping of
each save (which the offloader's ``_pack`` asks before it moves anything).

Two units, because device memory and copies differ:

- device bytes count per storage: a storage stays allocated, whole, as long as any view of it is saved, so its
  full size counts once, for the layer whose save first keeps it alive. (Attention's q, k and v are strided views
  of one qkv buffer, each covering nearly all of it: counted per view they were three times what stays allocated.)
  ``PassTrace.candidate_bytes`` (what keeping a layer holds: the planner's ``saved_bytes``) and ``kept_by_group``
  (what stayed) count so.
- copied bytes count per span (``spans.py``), because the offloader copies spans: three views of one buffer are
  three copies and three host buffers, so copy time and host memory are per span (``copy_bytes``,
  ``offloaded_by_group``).

The first save of a storage that the policy wants moved decides for all its later saves in the pass, as the first
save of a span does: kept by the plan, its later views stay too (copying them would free nothing); moved, so are
they (keeping one would keep the whole storage alive, which the plan counted as freed). The planner can then
charge a storage to one layer.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

import torch

from lightning_vdnn.offload.spans import Offloaded, Span

if TYPE_CHECKING:
    from lightning_vdnn.offload.trace import PassTrace


def _alive(seen: Optional[list], storage: torch.UntypedStorage) -> Optional[list]:
    """``seen`` if its storage (a weak reference, first item) is ``storage``: a freed storage's address is reused."""
    return seen if seen is not None and seen[0]() is storage else None


class SaveLedger:
    """One pass's saves, by span and by storage; reset by the offloader at every pass.

    Args:
        trace: the pass's counters (``offload/trace.py``) that this ledger fills.
    """

    def __init__(self, trace: Optional["PassTrace"] = None) -> None:
        self.trace = trace
        self._moved: dict[Span, Offloaded] = {}
        self._kept: dict[Span, list] = {}  # span -> [storage ref, kept by the plan, group of its first save]
        self._decided: dict[int, list] = {}  # address -> [storage ref, kept by the plan]: first wanted save
        self._held: dict[int, list] = {}  # address -> [storage ref, group, spans kept]: what stays on the device

    def moved(self, key: Span, storage: torch.UntypedStorage) -> Optional[Offloaded]:
        """The copy of span ``key`` made earlier in the pass, if any."""
        entry = self._moved.get(key)
        return entry if entry is not None and entry.src() is storage else None

    def add_moved(self, key: Span, entry: Offloaded) -> None:
        self._moved[key] = entry

    def decide(self, key: Span, storage: torch.UntypedStorage, nbytes: int, group: int, wanted: bool,
               keep_layers: Optional[frozenset[int]]) -> bool:
        """A save of span ``key`` (``nbytes``) in layer ``group`` not moved yet: whether to move it now.
        ``wanted``: the policy would move it; ``keep_layers``: the plan's layers that stay (None: no plan)."""
        trace, addr = self.trace, storage.data_ptr()
        seen = _alive(self._kept.get(key), storage)
        if seen is not None and seen[1]:
            return False  # kept by the plan when first saved: a later save by an offloaded layer follows
        if not wanted:
            self._keep(key, storage, group, False, seen)
            return False
        first = _alive(self._decided.get(addr), storage)
        if first is None:
            first = self._decided[addr] = [weakref.ref(storage), keep_layers is not None and group in keep_layers]
            trace.candidate_bytes[group] += storage.nbytes()
        trace.copy_bytes[group] += nbytes
        if first[1]:
            self._keep(key, storage, group, True, seen)
            return False
        if seen is not None:  # kept by policy at its first save, wanted now (a conv's input): moved
            self._release(key, storage)
        return True

    def rebuilt(self, storage: torch.UntypedStorage, group: int) -> None:
        """Layer ``group`` keeps ``storage`` (a pointwise activation's output) lean: not held, but it counts, once, in
        what keeping or moving the layer would hold and copy (``offload/pointwise.py``), so the layer's profile stays
        the same whichever way it ran."""
        addr = storage.data_ptr()
        if _alive(self._decided.get(addr), storage) is None:
            self._decided[addr] = [weakref.ref(storage), True]
            self.trace.candidate_bytes[group] += storage.nbytes()
            self.trace.copy_bytes[group] += storage.nbytes()

    def cached(self, storage: torch.UntypedStorage, group: int) -> None:
        """Layer ``group``, recomputed selectively, keeps ``storage`` outside autograd's saves (an op output SAC
        holds, ``offload/selective.py``): on the device until its backward, counted once, never released here."""
        self._hold(storage, group)

    def _hold(self, storage: torch.UntypedStorage, group: int) -> None:
        """One more save holds ``storage`` on the device: its bytes count once, for the first group that holds it."""
        held = _alive(self._held.get(storage.data_ptr()), storage)
        if held is None:
            held = self._held[storage.data_ptr()] = [weakref.ref(storage), group, 0]
            self.trace.kept_bytes += storage.nbytes()
            self.trace.kept_by_group[group] += storage.nbytes()
        held[2] += 1

    def _keep(self, key: Span, storage: torch.UntypedStorage, group: int, planned: bool,
              seen: Optional[list]) -> None:
        if seen is None:
            self._hold(storage, group)
        self._kept[key] = [weakref.ref(storage), planned, group if seen is None else seen[2]]

    def _release(self, key: Span, storage: torch.UntypedStorage) -> None:
        """Span ``key``, kept so far, is moved: the storage leaves the device's count with its last kept span."""
        del self._kept[key]
        held = self._held[storage.data_ptr()]
        held[2] -= 1
        if not held[2]:
            self.trace.kept_bytes -= storage.nbytes()
            self.trace.kept_by_group[held[1]] -= storage.nbytes()
            del self._held[storage.data_ptr()]
