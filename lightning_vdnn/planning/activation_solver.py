"""The keep / offload / recompute solver of ``activation_offload="auto"``: a dynamic program over the layers'
profiles that picks, for a device budget, each layer's choice of least summed cost (``planning/activation_plan.py``
says what the costs and the peak are, and runs the profile -> choose -> verify cycle around it)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, Sequence

import numpy as np

from lightning_vdnn.offload.trace import LayerProfile
from lightning_vdnn.units import GiB, MiB

Decision = Literal["keep", "offload", "recompute"]
_OFFLOAD, _KEEP, _RECOMPUTE, _SEGMENT, _SELECTIVE = 0, 1, 2, 3, 4
#: Most granules the budget is counted in: bounds the solver's work per layer.
MAX_STATES = 2**16
#: Most layers in one recomputed segment: bounds the solver's work per layer (a longer run rebuilds so much at
#: once in backward that a plan rarely wants it).
MAX_SEGMENT = 32
Segment = tuple[int, int]  # layers [start, end), recomputed as one


class BudgetTooSmall(ValueError):
    """The budget is below the peak this model reaches even with every activation offloaded."""

    @classmethod
    def check(cls, floor: int, budget: int, reached: str, fixes: str) -> None:
        """Raise when ``budget < floor``, the peak the step reaches ``reached`` ("with every block streamed"),
        stating that minimum and what else would help (``fixes``)."""
        if budget < floor:
            raise cls(f"memory_budget={budget / GiB:.2f} GiB is below {floor / GiB:.2f} GiB, the peak this step "
                      f"reaches {reached}. Raise memory_budget to at least {floor / GiB:.2f} GiB, {fixes}")


@dataclass(frozen=True)
class Plan:
    """What each layer (forward order) does with its saved activations, and what that is predicted to cost.

    Attributes:
        kept: layers whose saved activations stay on the device.
        offloaded_bytes: bytes the offloaded layers copy to the host each step (span by span).
        kept_bytes: bytes left on the device (each saved storage whole and once): kept layers' and what
            recomputed layers still save.
        predicted_peak: device memory the step is predicted to peak at (the model in this module's docstring).
        budget: the budget it was made for.
        recomputed: layers whose forward runs again in backward.
        recomputed_bytes: bytes the recomputed layers no longer hold (rebuilt in backward).
        added_ms: predicted step time the plan adds to keeping everything: exposed copies and recomputes.
        segments: runs of consecutive recomputed layers ``[start, end)`` recomputed as one (their layers are in
            ``recomputed`` too); the other recomputed layers are recomputed one by one.
        selective: recomputed layers (in ``recomputed`` too) whose recompute is selective: their expensive ops'
            outputs kept, the cheap ops run again (``offload/selective.py``); the others are recomputed whole.
    """

    kept: frozenset[int]
    offloaded_bytes: int
    kept_bytes: int
    predicted_peak: int
    budget: int
    recomputed: frozenset[int] = frozenset()
    recomputed_bytes: int = 0
    added_ms: float = 0.0
    segments: tuple[Segment, ...] = ()
    selective: frozenset[int] = frozenset()

    @property
    def on_device(self) -> frozenset[int]:
        """Layers whose saves stay on the device: kept ones, and recomputed ones (their inputs)."""
        return self.kept | self.recomputed

    def decision(self, layer: int) -> Decision:
        return "keep" if layer in self.kept else "recompute" if layer in self.recomputed else "offload"

    def described(self, layer: int) -> str:
        """:meth:`decision`, a selective recompute marked ``"recompute (selective)"``."""
        return "recompute (selective)" if layer in self.selective else self.decision(layer)


def _check_budget(floor: int, budget: int) -> None:
    BudgetTooSmall.check(
        floor, budget, "with every activation offloaded",
        "make the step smaller (batch size, sequence length), run the largest layers in batch chunks (batch_chunks=4, "
        "chunk_layers='<their module>', e.g. a CNN's 'model.features'), or, where weights and optimizer state "
        "fill that peak, move them to host memory: layer streaming (strategy='l2l' with this memory_budget "
        "keeps on the device as many blocks as fit).")


def solve(group_bytes: Sequence[int], floor: int, budget: int, granule: int = MiB,
          forward_peak: Optional[int] = None) -> Plan:
    """Keep or offload only, step time proportional to the bytes moved: the plan that moves the fewest bytes while
    ``max(floor, forward_peak + kept bytes) <= budget`` (``forward_peak`` defaults to ``floor``: the cautious model).

    Raises:
        BudgetTooSmall: ``budget < floor``; the message states the minimum.
    """
    return solve_layers([bytes_only(b) for b in group_bytes], floor, budget, granule, forward_peak)


def bytes_only(saved_bytes: int) -> LayerProfile:
    """A layer known only by its bytes: keep or offload, the copy costing in proportion to its size."""
    return LayerProfile(int(saved_bytes), transfer_ms=int(saved_bytes) / MiB)


def solve_layers(layers: Sequence[LayerProfile], floor: int, budget: int, granule: int = MiB,
                 forward_peak: Optional[int] = None) -> Plan:
    """The plan of least added step time whose predicted peak fits ``budget`` (the model of this module).

    Raises:
        BudgetTooSmall: ``budget < floor``, the least peak any plan reaches; the message states it.
        ValueError: ``granule`` < 1.
    """
    if granule < 1:
        raise ValueError(f"granule={granule!r} must be a positive number of bytes (1 MiB is the default).")
    _check_budget(floor, budget)
    base = floor if forward_peak is None else min(forward_peak, floor)
    room = budget - base
    if sum(layer.saved_bytes for layer in layers) <= room:  # everything fits: keep it all, at no cost
        return _plan(layers, frozenset(range(len(layers))), frozenset(), floor, base, budget)
    granule = _granule(room, granule)
    choices, segments = _dp(layers, room // granule, granule)
    picked = {kind: frozenset(g for g, c in enumerate(choices) if c == kind)
              for kind in (_KEEP, _RECOMPUTE, _SELECTIVE)}
    return _plan(layers, picked[_KEEP], picked[_RECOMPUTE], floor, base, budget, segments, picked[_SELECTIVE])


def _granule(room: int, granule: int) -> int:
    """Bytes per unit of the solver: at most ``granule``, finer for small budgets (at least 4096 units in the
    budget), coarser for huge ones (at most ``MAX_STATES``); a power of two."""
    fine = max(1, room // 4096)
    unit = min(granule, 1 << (fine.bit_length() - 1))
    coarse = -(-room // MAX_STATES)
    return max(unit, 1 << (coarse - 1).bit_length()) if coarse > 1 else unit


def _units(nbytes: int, granule: int) -> int:
    return -(-int(nbytes) // granule)  # rounded up: predictions stay conservative


def _dp(layers: Sequence[LayerProfile], capacity: int, granule: int) -> tuple[list[int], tuple[Segment, ...]]:
    """Each layer's choice in a plan of least summed cost with held units <= ``capacity`` at the end and, at each
    recomputed layer or segment, held units so far + its rebuilt units <= ``capacity``; and the segments. Exact for
    the rounded sizes."""
    size = min(capacity, sum(max(_units(p.saved_bytes, granule), _units(p.recompute_bytes or 0, granule),
                                 _units(p.selective.held_bytes if p.selective else 0, granule))
                             for p in layers)) + 1
    cost = np.full(size, np.inf)
    cost[0] = 0.0
    before = [cost]  # cost before each layer: a segment ending at g starts from the one before its start
    choice = np.zeros((len(layers), size), dtype=np.int8)
    start = np.zeros((len(layers), size), dtype=np.int32)
    moves = []
    for g, layer in enumerate(layers):
        best, pick = np.full(size, np.inf), choice[g]
        keep = _units(layer.saved_bytes, granule)
        options = [(_OFFLOAD, 0, layer.offload_ms, size, g), (_KEEP, keep, 0.0, size, g)]
        if layer.recompute_bytes is not None:  # held so far + rebuilt must fit too: states above ``limit`` cannot
            held = _units(layer.recompute_bytes, granule)
            options.insert(0, (_RECOMPUTE, held, layer.forward_ms,
                               capacity - _units(layer.rebuilt_bytes, granule) + 1, g))
        selective = _units(layer.selective.held_bytes, granule) if layer.selective is not None else 0
        if layer.selective is not None:  # as recompute, holding the kept outputs too; wins ties against it
            options.insert(len(options) - 2, (_SELECTIVE, selective, layer.selective_ms,
                                              capacity - _units(layer.selective_rebuilt_bytes, granule) + 1, g))
        options[:0] = [(_SEGMENT, _units(h, granule), ms, capacity - _units(r, granule) + 1, s)
                       for s, h, r, ms in segments_ending(layers, g)]
        for kind, units, ms, limit, first in options:  # later wins ties: segment, recompute, selective, offload, keep
            if units >= size or limit <= units:
                continue
            end = min(size, limit)
            candidate = before[first][: end - units] + ms
            better = candidate <= best[units:end]
            best[units:end][better] = candidate[better]
            pick[units:end][better] = kind
            start[g, units:end][better] = first
        moves.append((keep, _units(layer.recompute_bytes or 0, granule), selective))
        before.append(best)
        if len(before) > MAX_SEGMENT + 1:
            before[-MAX_SEGMENT - 2] = None  # no segment reaches back that far
    cost = before[-1]
    state = int(np.flatnonzero(cost == cost.min())[-1])  # the least time; among equals, the most kept
    out, segments, g = [_OFFLOAD] * len(layers), [], len(layers) - 1
    while g >= 0:
        kind = int(choice[g, state])
        if kind == _SEGMENT:
            first = int(start[g, state])
            held = segment_bytes(layers, first, g + 1)[0]
            out[first: g + 1] = [_SEGMENT] * (g + 1 - first)
            segments.append((first, g + 1))
            state -= _units(held, granule)
            g = first - 1
            continue
        out[g] = kind
        state -= {_OFFLOAD: 0, _KEEP: moves[g][0], _RECOMPUTE: moves[g][1], _SELECTIVE: moves[g][2]}[kind]
        g -= 1
    return out, tuple(reversed(segments))


def segments_ending(layers: Sequence[LayerProfile], last: int) -> list[tuple[int, int, int, float]]:
    """The segments of two or more layers that end with layer ``last`` and may be recomputed as one, as (start,
    bytes held, bytes rebuilt, recompute ms): each layer after the first continues the chain
    (``SegmentFacts.joins``), the first may start one, and no tensor saved inside is saved again after it."""
    out: list[tuple[int, int, int, float]] = []
    facts = layers[last].segment
    if facts is None or not facts.joins:
        return out
    reach, ms = facts.reach, layers[last].forward_ms
    for first in range(last - 1, max(-1, last - MAX_SEGMENT), -1):
        facts = layers[first].segment
        if facts is None:
            break
        reach, ms = max(reach, facts.reach), ms + layers[first].forward_ms
        if facts.starts and reach <= last:
            out.append((first, *segment_bytes(layers, first, last + 1), ms))
        if not facts.joins:
            break
    return out


def segment_bytes(layers: Sequence[LayerProfile], first: int, end: int) -> tuple[int, int]:
    """Bytes segment ``[first, end)`` holds from its forward to its backward (its first layer's inputs, what the code
    after its last one saves) and the bytes its recompute rebuilds at once in backward (everything else its layers
    save)."""
    head, tail = layers[first].segment, layers[end - 1].segment
    held = head.input_bytes + tail.tail_bytes
    facts = [p.segment for p in layers[first:end]]
    if all(f.inner_storage_bytes is not None for f in facts):  # whole storages, each once: what is allocated
        return held, sum(f.inner_storage_bytes for f in facts) + sum(f.own_input_storage_bytes or 0 for f in facts[1:])
    saved = sum(p.saved_bytes for p in layers[first:end])
    return held, max(0, saved - head.own_input_bytes - tail.tail_bytes)


def predicted_peak(layers: Sequence[LayerProfile], kept: frozenset[int], recomputed: frozenset[int], floor: int,
                   base: int, segments: Sequence[Segment] = (), selective: frozenset[int] = frozenset()) -> int:
    """``max(floor, base + H(all), max over recomputed g of base + H(<=g) + rebuilt_g)`` in exact bytes (a segment
    counts as one layer, its last; a layer in ``selective`` holds and rebuilds as its selective recompute does)."""
    held = top = 0
    starts = {first: end for first, end in segments}
    inside = {g for first, end in segments for g in range(first, end)}
    for g, layer in enumerate(layers):
        if g in starts:
            seg_held, rebuilt = segment_bytes(layers, g, starts[g])
            held += seg_held
            top = max(top, held + rebuilt)
        elif g in inside:
            continue
        elif g in kept:
            held += layer.saved_bytes
        elif g in selective and layer.selective is not None:
            held += layer.selective.held_bytes
            top = max(top, held + layer.selective_rebuilt_bytes)
        elif g in recomputed:
            held += layer.recompute_bytes or 0
            top = max(top, held + layer.rebuilt_bytes)
    return max(floor, base + max(held, top))


def _plan(layers: Sequence[LayerProfile], kept: frozenset[int], recomputed: frozenset[int], floor: int, base: int,
          budget: int, segments: Sequence[Segment] = (), selective: frozenset[int] = frozenset()) -> Plan:
    inside = frozenset(g for first, end in segments for g in range(first, end))
    recomputed = recomputed | inside | selective
    on_device = kept | recomputed
    offloaded = [p for g, p in enumerate(layers) if g not in on_device]
    redone = [layers[g] for g in sorted(recomputed - inside - selective)]
    some = [layers[g] for g in sorted(selective)]
    seg = [segment_bytes(layers, first, end) for first, end in segments]
    return Plan(
        kept=kept, recomputed=recomputed, budget=budget, segments=tuple(segments), selective=selective,
        offloaded_bytes=sum(p.offload_bytes for p in offloaded),
        kept_bytes=sum(layers[g].saved_bytes for g in kept) + sum(p.recompute_bytes or 0 for p in redone)
        + sum(h for h, _ in seg) + sum(p.selective.held_bytes for p in some),
        recomputed_bytes=sum(p.rebuilt_bytes for p in redone) + sum(r for _, r in seg)
        + sum(p.selective_rebuilt_bytes for p in some),
        predicted_peak=predicted_peak(layers, kept, recomputed, floor, base, segments, selective),
        added_ms=sum(p.offload_ms for p in offloaded) + sum(p.forward_ms for p in redone)
        + sum(layers[g].forward_ms for g in inside) + sum(p.selective_ms for p in some),
    )


def least_times(layers: Sequence[LayerProfile], earlier: Sequence[Sequence[LayerProfile]]) -> list[LayerProfile]:
    """``layers`` with each time the least of its own and those of the ``earlier`` passes of the same layers
    (passes with other layers or shapes are passed over)."""
    out = list(layers)
    for other in earlier:
        if len(other) != len(out) or any(p.inputs != q.inputs for p, q in zip(out, other)):
            continue
        out = [replace(p, forward_ms=min(p.forward_ms, q.forward_ms), transfer_ms=min(p.transfer_ms, q.transfer_ms),
                       overlap_ms=min(p.overlap_ms, q.overlap_ms)) for p, q in zip(out, other)]
    return out
