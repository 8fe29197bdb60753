"""The keep / offload / recompute solver of ``activation_offload="auto"``: a dynamic program over the layers'
profiles that picks, for a device budget, each layer's choice of least summed cost (``planning/activation_plan.py``
says what the costs and the peak are, and runs the profile -> choose -> verify cycle around it)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, Sequence

import numpy as np

from lightning_vdnn.offload.trace import LayerProfile
from lightning_vdnn.planning import copy_link
from lightning_vdnn.planning.segment_costs import MAX_SEGMENT, Segment, segment_bytes, segments_ending
from lightning_vdnn.units import GiB, MiB

Decision = Literal["keep", "offload", "recompute"]
_OFFLOAD, _KEEP, _RECOMPUTE, _SEGMENT, _SELECTIVE, _LEAN = 0, 1, 2, 3, 4, 5
MAX_STATES = 2**16  #: most granules the budget is counted in: bounds the solver's work per layer
#: Most leading layers the copy-link solver offloads (one dynamic program each; copies that hide are few layers).
MAX_LEADING = 64


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
        kept_bytes: bytes left on the device (each storage whole, once): kept layers' and what recomputed ones save.
        predicted_peak: device memory the step is predicted to peak at (the model in this module's docstring).
        budget: the budget it was made for.
        recomputed: layers whose forward runs again in backward.
        recomputed_bytes: bytes the recomputed layers no longer hold (rebuilt in backward).
        added_ms: predicted step time the plan adds to keeping everything: exposed copies and recomputes.
        segments: runs of consecutive recomputed layers ``[start, end)`` recomputed as one (their layers are in
            ``recomputed`` too); the other recomputed layers are recomputed one by one.
        selective: recomputed layers (in ``recomputed`` too) whose recompute is selective: their expensive ops'
            outputs kept, the cheap ops run again (``offload/selective.py``); the others are recomputed whole.
        copy_ms: the offloaded layers' copy time, both ways, hidden or not.
        exposed_copy_ms: of that, what compute is predicted to wait for (part of ``added_ms``).
        prefetch_from: ``(layer, cue)``: offloaded layers whose copy back starts as backward reaches layer ``cue``
            (``offload/prefetch.py``); empty: the offloader's own ``prefetch_layers`` rule.
        inflight_bytes: most bytes the plan's forward queues to the host at once (``offload/inflight.py`` lets
            that much through without stalling compute); 0: the offloader's own bound.
        offloaded: layers whose saves go to the host, forward order; ``linked``: timed on the copy link.
        lean: kept layers (in ``kept`` too) whose pointwise activation outputs backward makes again from the inputs
            they keep (``offload/pointwise.py``): held, they would cost ``LayerProfile.pointwise_bytes`` more.
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
    copy_ms: float = 0.0
    exposed_copy_ms: float = 0.0
    prefetch_from: tuple[tuple[int, int], ...] = ()
    inflight_bytes: int = 0
    offloaded: tuple[int, ...] = ()
    linked: bool = False
    lean: frozenset[int] = frozenset()

    @property
    def hidden_copy_ms(self) -> float:
        """Copy time predicted to run under compute."""
        return max(0.0, self.copy_ms - self.exposed_copy_ms)

    @property
    def on_device(self) -> frozenset[int]:
        """Layers whose saves stay on the device: kept ones, and recomputed ones (their inputs)."""
        return self.kept | self.recomputed

    def decision(self, layer: int) -> Decision:
        return "keep" if layer in self.kept else "recompute" if layer in self.recomputed else "offload"

    def described(self, layer: int) -> str:
        """:meth:`decision`, a selective recompute marked ``"recompute (selective)"``, a lean keep ``"keep (lean)"``."""
        return ("recompute (selective)" if layer in self.selective else "keep (lean)" if layer in self.lean
                else self.decision(layer))


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
                 forward_peak: Optional[int] = None, link: bool = False) -> Plan:
    """The plan of least added step time whose predicted peak fits ``budget`` (the model of this module).

    With ``link``, and copies that can hide (a GPU profile, ``copy_link.has_overlap``), copies are timed as the copy
    link runs them (``planning/copy_link.py``): the plans tried are, for each ``k``, the layers before ``k``
    offloaded and the rest the dynamic program's choice; the one of least added time under that model that fits
    wins if it adds less than the plan of the per-layer model (:attr:`LayerProfile.offload_ms`), else that plan.

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
    per_layer = _solved(layers, room // granule, granule, floor, base, budget)
    if not (link and copy_link.has_overlap(layers)):
        return per_layer
    # each layer's copies beside its neighbours, as without the link, but never less than they cost by themselves on
    # it (the top layer's copy back has no backward above it to hide under)
    alone_ms = [max(p.offload_ms, copy_link.least_exposed_ms(layers, [g])) for g, p in enumerate(layers)]
    best: Optional[Plan] = None
    for k in range(min(len(layers), MAX_LEADING) + 1):  # leading layers first: the most forward follows them
        if best is not None and copy_link.least_exposed_ms(layers, range(k)) >= best.added_ms:
            break  # the prefix alone costs more than the best plan: so does every longer one
        plan = _linked(layers, room, granule, floor, base, budget, k, alone_ms)
        # only the leading layers offloaded: where the program offloads others too, their copies queue beside
        # layers whose measured spans include the profiling pass's own waits for copies (a CNN's large early
        # activations), and the link's timing of them proved hopeful on the H200 (VGG-16: 0 ms predicted
        # exposed, 25-92 ms measured)
        leading = plan is not None and set(plan.offloaded) <= set(range(k))
        if leading and (best is None or plan.added_ms < best.added_ms):
            best = plan
    # the link's timing is the hopeful one (copies hide under all the compute around them); where the per-layer
    # model, which credits each copy only its neighbour's compute, already finds a plan as cheap, that plan is taken:
    # where copies cannot hide (a CNN's large early activations) the link's queue holds bytes the budget must then
    # give up, and its plans offload more, not less
    return best if best is not None and best.added_ms < per_layer.added_ms else per_layer


def _linked(layers: Sequence[LayerProfile], room: int, granule: int, floor: int, base: int, budget: int,
            offload_first: int, offload_ms: Sequence[float], tries: int = 4) -> Optional[Plan]:
    """The dynamic program's plan with the layers before ``offload_first`` offloaded, timed and counted on the copy
    link. The program prices each other offload by itself; where the link finds a copy dearer beside the others (a
    queue, no room to prefetch it early), that layer's price rises to what it found, and where the copies' bytes
    (in flight in forward, ahead in backward) overshoot the budget, the room shrinks by that much; then the program
    runs again (``tries`` times at most). None if no plan tried fits."""
    capacity, prices = room // granule, list(offload_ms)
    for _ in range(tries):
        plan = _solved(layers, capacity, granule, floor, base, budget, offload_first, prices)
        _, levels = held_levels(layers, plan.kept, plan.recomputed, plan.segments, plan.selective, plan.lean)
        found = copy_link.schedule(layers, plan.offloaded, levels, budget - base).exposed_by if plan.offloaded else ()
        dearer = [g for g in plan.offloaded if g >= offload_first and found[g] > prices[g] + 1e-9]
        if plan.predicted_peak <= budget and not dearer:
            return plan
        for g in dearer:
            prices[g] = found[g]
        if plan.predicted_peak > budget:
            capacity -= _units(plan.predicted_peak - budget, granule)
        if capacity < 0:
            break
    return plan if plan.predicted_peak <= budget else None


def _solved(layers: Sequence[LayerProfile], capacity: int, granule: int, floor: int, base: int, budget: int,
            offload_first: int = 0, link: Optional[Sequence[float]] = None) -> Plan:
    """The dynamic program's plan; ``link``: each layer's offload cost by the copy link, the plan timed by it."""
    choices, segments = _dp(layers, capacity, granule, offload_first, link)
    picked = {kind: frozenset(g for g, c in enumerate(choices) if c == kind)
              for kind in (_KEEP, _RECOMPUTE, _SELECTIVE, _LEAN)}
    return _plan(layers, picked[_KEEP] | picked[_LEAN], picked[_RECOMPUTE], floor, base, budget, segments,
                 picked[_SELECTIVE], link=link is not None, lean=picked[_LEAN])


def _granule(room: int, granule: int) -> int:
    """Bytes per unit of the solver: at most ``granule``, finer for small budgets (at least 4096 units in the
    budget), coarser for huge ones (at most ``MAX_STATES``); a power of two."""
    fine = max(1, room // 4096)
    unit = min(granule, 1 << (fine.bit_length() - 1))
    coarse = -(-room // MAX_STATES)
    return max(unit, 1 << (coarse - 1).bit_length()) if coarse > 1 else unit


def _units(nbytes: int, granule: int) -> int:
    return -(-int(nbytes) // granule)  # rounded up: predictions stay conservative


def _dp(layers: Sequence[LayerProfile], capacity: int, granule: int,
        offload_first: int = 0, offload_ms: Optional[Sequence[float]] = None) -> tuple[list[int], tuple[Segment, ...]]:
    """Each layer's choice in a plan of least summed cost with held units <= ``capacity`` at the end and, at each
    recomputed layer or segment, held units so far + its rebuilt units <= ``capacity``; and the segments. Exact for
    the rounded sizes. The layers before ``offload_first`` are offloaded (their cost is the caller's); ``offload_ms``:
    each layer's offload cost (default :attr:`LayerProfile.offload_ms`)."""
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
        off = layer.offload_ms if offload_ms is None else offload_ms[g]
        options = [(_OFFLOAD, 0, off, size, g), (_KEEP, keep, 0.0, size, g)]
        if layer.recompute_bytes is not None:  # held so far + rebuilt must fit too: states above ``limit`` cannot
            held = _units(layer.recompute_bytes, granule)
            options.insert(0, (_RECOMPUTE, held, layer.forward_ms,
                               capacity - _units(layer.rebuilt_bytes, granule) + 1, g))
        selective = _units(layer.selective.held_bytes, granule) if layer.selective is not None else 0
        if layer.selective is not None:  # as recompute, holding the kept outputs too; wins ties against it
            options.insert(len(options) - 2, (_SELECTIVE, selective, layer.selective_ms,
                                              capacity - _units(layer.selective_rebuilt_bytes, granule) + 1, g))
        lean = keep - _units(layer.pointwise_bytes, granule)
        if layer.pointwise_bytes:  # as keep, its activation outputs made again in its backward; keep wins ties
            options.insert(len(options) - 1, (_LEAN, lean, layer.pointwise_ms,
                                              capacity - _units(layer.pointwise_bytes, granule) + 1, g))
        options[:0] = [(_SEGMENT, _units(h, granule), ms, capacity - _units(r, granule) + 1, s)
                       for s, h, r, ms in segments_ending(layers, g) if s >= offload_first]
        if g < offload_first:
            options = [(_OFFLOAD, 0, 0.0, size, g)]
        for kind, units, ms, limit, first in options:  # later wins ties: segment, recompute, selective, offload, keep
            if units >= size or limit <= units:
                continue
            end = min(size, limit)
            candidate = before[first][: end - units] + ms
            better = candidate <= best[units:end]
            best[units:end][better] = candidate[better]
            pick[units:end][better] = kind
            start[g, units:end][better] = first
        moves.append((keep, _units(layer.recompute_bytes or 0, granule), selective, lean))
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
        state -= {_OFFLOAD: 0, _KEEP: moves[g][0], _RECOMPUTE: moves[g][1], _SELECTIVE: moves[g][2],
                  _LEAN: moves[g][3]}[kind]
        g -= 1
    return out, tuple(reversed(segments))


def predicted_peak(layers: Sequence[LayerProfile], kept: frozenset[int], recomputed: frozenset[int], floor: int,
                   base: int, segments: Sequence[Segment] = (), selective: frozenset[int] = frozenset(),
                   lean: frozenset[int] = frozenset()) -> int:
    """``max(floor, base + H(all), max over recomputed g of base + H(<=g) + rebuilt_g)`` in exact bytes (a segment
    counts as one layer, its last; a layer in ``selective`` holds and rebuilds as its selective recompute does, one
    in ``lean`` holds less by its pointwise outputs and makes them again in its backward)."""
    return _peak(*held_levels(layers, kept, recomputed, segments, selective, lean), floor, base)


def _peak(held: list[int], levels: list[int], floor: int, base: int) -> int:
    """:func:`predicted_peak` from :func:`held_levels`."""
    return max(floor, base + max([held[-1] if held else 0, *levels]))


def held_levels(layers: Sequence[LayerProfile], kept: frozenset[int], recomputed: frozenset[int],
                segments: Sequence[Segment] = (), selective: frozenset[int] = frozenset(),
                lean: frozenset[int] = frozenset()) -> tuple[list[int], list[int]]:
    """Per layer, the bytes held by the layers up to it ``H(<=g)`` (what forward holds as it ends) and what its
    backward holds: that, plus what a recompute of it (or of the segment it starts) rebuilds."""
    held, levels, total = [], [], 0
    starts = {first: end for first, end in segments}
    inside = {g for first, end in segments for g in range(first, end)}
    for g, layer in enumerate(layers):
        rebuilt = 0
        if g in starts:
            seg_held, rebuilt = segment_bytes(layers, g, starts[g])
            total += seg_held
        elif g in inside:
            pass
        elif g in kept:
            rebuilt = layer.pointwise_bytes if g in lean else 0
            total += layer.saved_bytes - rebuilt
        elif g in selective and layer.selective is not None:
            total += layer.selective.held_bytes
            rebuilt = layer.selective_rebuilt_bytes
        elif g in recomputed:
            total += layer.recompute_bytes or 0
            rebuilt = layer.rebuilt_bytes
        held.append(total)
        levels.append(total + rebuilt)
    return held, levels


def _plan(layers: Sequence[LayerProfile], kept: frozenset[int], recomputed: frozenset[int], floor: int, base: int,
          budget: int, segments: Sequence[Segment] = (), selective: frozenset[int] = frozenset(),
          link: bool = False, lean: frozenset[int] = frozenset()) -> Plan:
    """The plan of these choices; with ``link``, its copies timed and their bytes counted as the copy link runs
    them (``planning/copy_link.py``), else each copy beside its neighbours (``LayerProfile.offload_ms``)."""
    inside = frozenset(g for first, end in segments for g in range(first, end))
    recomputed = recomputed | inside | selective
    on_device = kept | recomputed
    offloaded = [g for g in range(len(layers)) if g not in on_device and layers[g].offload_bytes]  # no empty ones
    redone = [layers[g] for g in sorted(recomputed - inside - selective)]
    some = [layers[g] for g in sorted(selective)]
    seg = [segment_bytes(layers, first, end) for first, end in segments]
    recompute_ms = (sum(p.forward_ms for p in redone) + sum(layers[g].forward_ms for g in inside)
                    + sum(p.selective_ms for p in some) + sum(layers[g].pointwise_ms for g in lean))
    held, levels = held_levels(layers, kept, recomputed, segments, selective, lean)
    peak = _peak(held, levels, floor, base)
    copies = dict(added_ms=sum(layers[g].offload_ms for g in offloaded) + recompute_ms,
                  copy_ms=2 * sum(layers[g].transfer_ms for g in offloaded),
                  exposed_copy_ms=sum(layers[g].offload_ms for g in offloaded))
    if link and offloaded:
        link_plan = copy_link.schedule(layers, offloaded, levels, budget - base)
        peak = max(peak, base + max(h + x for h, x in zip(held + held[-1:], link_plan.forward_extra)),
                   base + max(v + a for v, a in zip(levels, link_plan.ahead)))
        copies = dict(added_ms=link_plan.exposed_ms + recompute_ms, copy_ms=link_plan.copy_ms,
                      exposed_copy_ms=link_plan.exposed_ms, prefetch_from=link_plan.prefetch_from,
                      inflight_bytes=link_plan.inflight_bytes, linked=True)
    return Plan(
        kept=kept, recomputed=recomputed, budget=budget, segments=tuple(segments), selective=selective, lean=lean,
        offloaded_bytes=sum(layers[g].offload_bytes for g in offloaded),
        kept_bytes=sum(layers[g].saved_bytes for g in kept) - sum(layers[g].pointwise_bytes for g in lean)
        + sum(p.recompute_bytes or 0 for p in redone)
        + sum(h for h, _ in seg) + sum(p.selective.held_bytes for p in some),
        recomputed_bytes=sum(p.rebuilt_bytes for p in redone) + sum(r for _, r in seg)
        + sum(p.selective_rebuilt_bytes for p in some),
        predicted_peak=peak, offloaded=tuple(offloaded), **copies,
    )


def least_times(layers: Sequence[LayerProfile], earlier: Sequence[Sequence[LayerProfile]]) -> list[LayerProfile]:
    """``layers``, each time the least of its own and the ``earlier`` passes' (other layers or shapes passed over)."""
    out = list(layers)
    for other in earlier:
        if len(other) != len(out) or any(p.inputs != q.inputs for p, q in zip(out, other)):
            continue
        out = [replace(p, forward_ms=min(p.forward_ms, q.forward_ms), transfer_ms=min(p.transfer_ms, q.transfer_ms),
                       overlap_ms=min(p.overlap_ms, q.overlap_ms)) for p, q in zip(out, other)]
    return out
