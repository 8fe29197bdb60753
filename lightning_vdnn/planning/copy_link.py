"""The copy link under a plan: when the offloaded layers' copies run, how much of them compute hides, and what
they hold on the device while they run (the model ``activation_solver.solve_layers(..., link=True)`` plans with).

Forward. Each offloaded layer's copy to the host is queued, in forward order, on one stream as its forward ends
(its saves are queued as they are made; the layer's end is the cautious time), and runs when the copy before it is
done. Compute never waits for it (``offload/inflight.py`` lets the plan's queued bytes through), so a copy is hidden
if the queue has drained when forward ends: what runs past forward's end is exposed (the step's peak is at the
start of backward, and the copies back need these copies done). While a copy waits or runs, its device source is
held: those bytes are on the device at every layer end they outlast.

Backward. The copies back run on the other stream (PCIe copies each way at once), queued in backward order: layer
``j``'s copy is issued as backward reaches its cue layer ``c > j`` (``offload/prefetch.py``'s schedule) and must
be done when backward reaches ``j``. From issue until ``j`` reads it its bytes are on the device above the layers
still running, so a cue is only as early as the budget allows at each layer in between; within that, the latest
cue that still lets the copy finish in time (holding memory no longer than it needs). What does not finish in time
stalls backward by the rest, and everything after it starts that much later.

Times: a layer's compute span (the profile's ``overlap_ms`` of the layer before it, which leaves out inline copies:
0 on a CPU device, whose copies block compute, so nothing hides there), backward twice forward. Layer 0's own span is
not measured (the profile starts there) and counts as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lightning_vdnn.offload.trace import LayerProfile


@dataclass(frozen=True)
class CopySchedule:
    """The offloaded layers' copies under one plan.

    Attributes:
        copy_ms: copy time both ways, hidden or not.
        out_exposed_ms: forward's copies running past the end of forward.
        back_exposed_ms: backward's waits for copies back.
        prefetch_from: ``(layer, cue)`` per offloaded layer whose copy back is issued ahead: as backward reaches
            layer ``cue``; the others are copied back when backward reads them.
        inflight_bytes: most bytes queued to the host and not yet copied at once in forward.
        forward_extra: per layer, bytes of earlier layers still waiting for their copy as its forward ends, and
            last, those waiting when forward ends.
        ahead: per layer, bytes copied back ahead of it while its backward runs.
        exposed_by: per layer, the exposed time its own copies add (0 where it is not offloaded).
    """

    copy_ms: float
    out_exposed_ms: float
    back_exposed_ms: float
    prefetch_from: tuple[tuple[int, int], ...]
    inflight_bytes: int
    forward_extra: tuple[int, ...]
    ahead: tuple[int, ...]
    exposed_by: tuple[float, ...] = ()

    @property
    def exposed_ms(self) -> float:
        return self.out_exposed_ms + self.back_exposed_ms

    @property
    def hidden_ms(self) -> float:
        return max(0.0, self.copy_ms - self.exposed_ms)


def has_overlap(layers: Sequence[LayerProfile]) -> bool:
    """Whether any copy could hide under compute: a GPU profile (a CPU device's copies are inline)."""
    return any(p.overlap_ms > 0 for p in layers)


def schedule(layers: Sequence[LayerProfile], offloaded: Sequence[int], levels: Sequence[int],
             room: int) -> CopySchedule:
    """The copies of ``offloaded`` (layer indices) under a plan whose layers hold ``levels[g]`` bytes above the
    base while layer ``g``'s backward runs, with ``room`` bytes above the base in the budget."""
    offloaded = sorted(offloaded)
    out, forward_extra, inflight = _forward(layers, offloaded)
    back, prefetch_from, ahead = _backward(layers, offloaded, levels, room)
    return CopySchedule(
        copy_ms=2 * sum(layers[g].transfer_ms for g in offloaded), out_exposed_ms=sum(out.values()),
        back_exposed_ms=sum(back.values()), prefetch_from=prefetch_from, inflight_bytes=inflight,
        forward_extra=forward_extra, ahead=ahead,
        exposed_by=tuple(out.get(g, 0.0) + back.get(g, 0.0) for g in range(len(layers))))


def least_exposed_ms(layers: Sequence[LayerProfile], offloaded: Sequence[int]) -> float:
    """Exposed copy time of ``offloaded`` alone and with unbounded memory: a lower bound on what they cost in any
    plan (other layers' copies only queue beside them, and the budget only makes cues later)."""
    n = len(layers)
    return schedule(layers, offloaded, [0] * n, 1 << 62).exposed_ms


def _forward(layers: Sequence[LayerProfile], offloaded: list[int]) -> tuple[dict[int, float], tuple[int, ...], int]:
    """(exposed ms per layer, bytes still queued at each layer end and at forward's end, most bytes queued at
    once)."""
    ends, t = [], 0.0
    for p in layers:  # overlap_ms is the next layer's span: layer g ends at the spans before it, from layer 0's end
        ends.append(t)
        t += p.overlap_ms
    done, last, late = {}, 0.0, {}
    for g in offloaded:  # what each copy adds past forward's end
        done[g] = max(ends[g], last) + layers[g].transfer_ms
        late[g], last = max(0.0, done[g] - max(t, last)), done[g]
    extra, most = [], 0
    for g, end in enumerate(ends + [t]):
        waiting = [i for i in offloaded if i <= g and done[i] > end]
        extra.append(sum(layers[i].offload_bytes for i in waiting if i < g))
        most = max(most, sum(layers[i].offload_bytes for i in waiting))
    return late, tuple(extra), most


def _backward(layers: Sequence[LayerProfile], offloaded: list[int], levels: Sequence[int],
              room: int) -> tuple[dict[int, float], tuple[tuple[int, int], ...], tuple[int, ...]]:
    """(exposed ms per layer, (layer, cue) pairs, bytes ahead per layer) of the copies back, top layer first."""
    n = len(layers)
    starts = [0.0] * n  # when layer g's backward begins, waits left out; backward is twice forward
    for g in range(n - 2, -1, -1):
        starts[g] = starts[g + 1] + 2 * layers[g].overlap_ms  # layer g + 1's span
    due, by = {}, None  # latest finish of each copy that lets the ones queued after it finish in time too
    for j in offloaded:
        due[j] = starts[j] if by is None else min(starts[j], by)
        by = due[j] - layers[j].transfer_ms
    waits: dict[int, float] = {}  # offloaded layer -> how long backward waited for it
    stalled = [0.0] * n  # per layer: backward's waits above it so far (everything below starts that much later)
    ahead, cues = [0] * n, []
    free, latest = 0.0, n - 1  # the copy stream's next free time; the latest cue allowed (queue order)
    for j in reversed(offloaded):
        size, need = layers[j].offload_bytes, starts[j] + stalled[j]
        top = j
        for s in range(j + 1, latest + 1):  # its bytes stay from the cue down to j: room at each layer between
            if levels[s] + ahead[s] + size > room:
                break
            top = s
        cue, issue = j, need  # no room ahead: copied back as backward reads it
        if top > j:
            wanted = max(free, due[j] + stalled[j] - layers[j].transfer_ms)  # just in time, or when free
            cue = next((s for s in range(j + 1, top + 1) if starts[s] + stalled[s] <= wanted), top)
            issue = starts[cue] + stalled[cue]
            for s in range(j + 1, cue + 1):
                ahead[s] += size
            cues.append((j, cue))
        free = max(issue, free) + layers[j].transfer_ms
        waits[j] = max(0.0, free - need)
        for s in range(j):
            stalled[s] += waits[j]
        latest = cue
    return waits, tuple(cues), tuple(ahead)
