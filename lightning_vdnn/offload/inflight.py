"""The device sources of copies to the host still in flight, in the order they were queued: each is let go
(its device memory freed) once its copy has finished, and past ``max_bytes`` waiting the compute stream waits
for the oldest, so forward cannot outrun PCIe and fill the device (``ActivationOffloader``'s back-pressure). A plan
that counts on several layers' copies queued at once (``planning/copy_link.py``) raises ``max_bytes`` by those bytes,
which its predicted peak holds: compute does not wait for copies the plan called hidden, and memory stays bounded."""

from __future__ import annotations

import collections
from typing import Optional

from lightning_vdnn.offload.host_pool import CopyEngine
from lightning_vdnn.offload.spans import Offloaded
from lightning_vdnn.offload.trace import PassTimeline


class CopiesInFlight:
    """One pass's device->host copies whose device source is still held.

    Args:
        engine: the offloader's streams and events.
        max_bytes: source bytes that may wait for their copy (``max_inflight_bytes``).
    """

    def __init__(self, engine: CopyEngine, max_bytes: int) -> None:
        self.engine, self.max_bytes = engine, max_bytes
        self.bytes = 0
        self._pending: collections.deque[Offloaded] = collections.deque()

    def add(self, entry: Offloaded, timeline: Optional[PassTimeline]) -> None:
        """``entry``'s copy was queued; past ``max_bytes``, wait (``timeline``: a watched pass on a GPU)."""
        self._pending.append(entry)
        self.bytes += entry.nbytes
        self._throttle(timeline)

    def poll(self) -> None:
        """Let go of device sources whose copy to the host has finished (frees their memory)."""
        while self._pending and self._pending[0].last_use.query():
            self._release()

    def _throttle(self, timeline: Optional[PassTimeline]) -> None:
        """Past ``max_bytes``, the compute stream waits for the oldest copies, whose sources can then be freed at
        once: later kernels are queued behind the wait, so reusing that memory is safe."""
        before = None
        while len(self._pending) > 1 and self.bytes > self.max_bytes:
            if self.engine.is_cuda:
                if timeline is not None and before is None:
                    before = self.engine.record()
                self.engine.current_stream().wait_event(self._pending[0].last_use)
            self._release()
        if before is not None:  # the profile's layer times leave the wait out: offload would look free otherwise
            timeline.stalled(before, self.engine.record())

    def _release(self) -> None:
        entry = self._pending.popleft()
        entry.pending = None
        self.bytes -= entry.nbytes
