"""The device slots of layer streaming and the loads into them.

Each slot is one flat device buffer holding a block's weights in the compute dtype. Forward and backward
acquire the slot holding the block they run (loading it if none does, after its queued host update), and
prefetch the next blocks into the others on the host-to-device stream: one ahead at least, more behind resident
blocks (:meth:`SlotLoads.slot_count`), since a block's weights take about twice its forward to cross PCIe.
:class:`SlotLoads` is mixed into :class:`~lightning_vdnn.streaming.streamer.LayerStreamer`, whose state
(``blocks``, ``slots``, ``steppers``, ``engine``, ``stage``) it reads; ``streaming/sharded.py`` overrides
:meth:`SlotLoads._fill` and :attr:`SlotLoads.preloads`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_vdnn.compiled import compiling
from lightning_vdnn.streaming.host_state import HostBlock

#: Most device slots a streamer holds (each is one block in the compute dtype: gpt_1b's 0.1 GB).
MAX_SLOTS = 6


class Slot:
    """A flat device buffer holding one block's weights in the compute dtype."""

    __slots__ = ("buf", "block", "version", "ready", "free", "used")

    def __init__(self, buf: Tensor) -> None:
        self.buf, self.block, self.version, self.ready, self.free, self.used = buf, -1, -1, None, None, 0


class SlotLoads:
    """Acquiring, prefetching and loading the device slots (mixed into ``LayerStreamer``)."""

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

    def _acquire(self, index: int) -> Slot:
        """A slot holding block ``index``'s current weights, ready for the compute stream."""
        slot = self._fetch(index, None, wait=True)  # its host update, if one is queued, comes first
        if self.engine.is_cuda:
            self.engine.current_stream().wait_event(slot.ready)
        return slot

    def _prefetch(self, index: int, step: int, busy: Slot, wrap: bool = False) -> None:
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
        if compiling():  # inside a compiled region: nothing to trace (``compiled.py``)
            return
        if torch._C._current_graph_task_id() != -1 and not self.eager_updates:
            return  # a resident block's recompute in backward: the streamed blocks' updates come at the step
        for index in range(min(len(self.slots), len(self.blocks))):
            if self._fetch(index, None, wait=False) is None:
                return

    def _fetch(self, index: int, busy: Optional[Slot], wait: bool) -> Optional[Slot]:
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

    def _resident(self, index: int) -> Optional[Slot]:
        version = self.blocks[index].version()
        return next((s for s in self.slots if s.block == index and s.version == version), None)

    def _load(self, index: int, slot: Slot) -> None:
        """Copy block ``index`` host -> ``slot`` on the h2d stream, casting to the compute dtype on the device."""
        block, eng = self.blocks[index], self.engine
        with eng.stream(eng.h2d):
            if eng.is_cuda and slot.free is not None:
                eng.h2d.wait_event(slot.free)
            self._fill(block, slot.buf)
            slot.ready = block.read_done = eng.record(eng.h2d, host_waits=True)  # the host update waits for it
        slot.block, slot.version = index, block.version()

    def _fill(self, block: HostBlock, buf: Tensor) -> None:
        """Hook (``streaming/sharded.py``), on the h2d stream: the block's host weights into ``buf``, in the compute dtype."""
        self._to_device(block.flat if block.copy is None else block.fresh_copy(), buf[: block.numel])

    def _to_device(self, host: Tensor, dst: Tensor) -> None:
        if self.stage is None or host.dtype == dst.dtype:
            dst.copy_(host, non_blocking=True)
        else:
            staged = self.stage[: host.numel()]
            staged.copy_(host, non_blocking=True)
            dst.copy_(staged)
        self.h2d_bytes += host.nbytes
