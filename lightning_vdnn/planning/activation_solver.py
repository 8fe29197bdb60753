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
_OFFLOAD, _KEEP, _RECOMPUTE = 0, 1, 2
#: Most granules the budget is counted in: bounds the solver's work per layer.
MAX_STATES = 2**16


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
        offloaded_bytes: bytes the offloaded layers move to the host each step.
        kept_bytes: bytes left on the device: kept layers' and what recomputed layers still save.
        predicted_peak: device memory the step is predicted to peak at (the model in this module's docstring).
        budget: the budget it was made for.
        recomputed: layers whose forward runs again in backward.
        recomputed_bytes: bytes the recomputed layers no longer hold (rebuilt in backward).
        added_ms: predicted step time the plan adds to keeping everything: exposed copies and recomputes.
    """

    kept: frozenset[int]
    offloaded_bytes: int
    kept_bytes: int
    predicted_peak: int
    budget: int
    recomputed: frozenset[int] = frozenset()
    recomputed_bytes: int = 0
    added_ms: float = 0.0

    @property
    def on_device(self) -> frozenset[int]:
        """Layers whose saves stay on the device: kept ones, and recomputed ones (their inputs)."""
        return self.kept | self.recomputed

    def decision(self, layer: int) -> Decision:
        return "keep" if layer in self.kept else "recompute" if layer in self.recomputed else "offload"


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
    choices = _dp(layers, room // granule, granule)
    kept = frozenset(g for g, c in enumerate(choices) if c == _KEEP)
    return _plan(layers, kept, frozenset(g for g, c in enumerate(choices) if c == _RECOMPUTE), floor, base, budget)


def _granule(room: int, granule: int) -> int:
    """Bytes per unit of the solver: at most ``granule``, finer for small budgets (at least 4096 units in the
    budget), coarser for huge ones (at most ``MAX_STATES``); a power of two."""
    fine = max(1, room // 4096)
    unit = min(granule, 1 << (fine.bit_length() - 1))
    coarse = -(-room // MAX_STATES)
    return max(unit, 1 << (coarse - 1).bit_length()) if coarse > 1 else unit


def _units(nbytes: int, granule: int) -> int:
    return -(-int(nbytes) // granule)  # rounded up: predictions stay conservative


def _dp(layers: Sequence[LayerProfile], capacity: int, granule: int) -> list[int]:
    """Each layer's choice in a plan of least summed cost with held units <= ``capacity`` at the end and, at each
    recomputed layer, held units so far + its rebuilt units <= ``capacity``. Exact for the rounded sizes."""
    size = min(capacity, sum(max(_units(p.saved_bytes, granule), _units(p.recompute_bytes or 0, granule))
                             for p in layers)) + 1
    cost = np.full(size, np.inf)
    cost[0] = 0.0
    choice = np.zeros((len(layers), size), dtype=np.int8)
    moves = []
    for g, layer in enumerate(layers):
        best, pick = np.full(size, np.inf), choice[g]
        keep = _units(layer.saved_bytes, granule)
        options = [(_OFFLOAD, 0, layer.offload_ms, size), (_KEEP, keep, 0.0, size)]
        if layer.recompute_bytes is not None:  # held so far + rebuilt must fit too: states above ``limit`` cannot
            held = _units(layer.recompute_bytes, granule)
            options.insert(0, (_RECOMPUTE, held, layer.forward_ms, capacity - _units(layer.rebuilt_bytes, granule) + 1))
        for kind, units, ms, limit in options:  # later options win ties: recompute < offload < keep
            if units >= size or limit <= units:
                continue
            end = min(size, limit)
            candidate = cost[: end - units] + ms
            better = candidate <= best[units:end]
            best[units:end][better] = candidate[better]
            pick[units:end][better] = kind
        moves.append((keep, _units(layer.recompute_bytes or 0, granule)))
        cost = best
    state = int(np.flatnonzero(cost == cost.min())[-1])  # the least time; among equals, the most kept
    out = [_OFFLOAD] * len(layers)
    for g in reversed(range(len(layers))):
        out[g] = int(choice[g, state])
        state -= {_OFFLOAD: 0, _KEEP: moves[g][0], _RECOMPUTE: moves[g][1]}[out[g]]
    return out


def predicted_peak(layers: Sequence[LayerProfile], kept: frozenset[int], recomputed: frozenset[int], floor: int,
                   base: int) -> int:
    """``max(floor, base + H(all), max over recomputed g of base + H(<=g) + rebuilt_g)`` in exact bytes."""
    held = top = 0
    for g, layer in enumerate(layers):
        if g in kept:
            held += layer.saved_bytes
        elif g in recomputed:
            held += layer.recompute_bytes or 0
            top = max(top, held + layer.rebuilt_bytes)
    return max(floor, base + max(held, top))


def _plan(layers: Sequence[LayerProfile], kept: frozenset[int], recomputed: frozenset[int], floor: int, base: int,
          budget: int) -> Plan:
    on_device = kept | recomputed
    offloaded = [p for g, p in enumerate(layers) if g not in on_device]
    redone = [layers[g] for g in sorted(recomputed)]
    return Plan(
        kept=kept, recomputed=recomputed, budget=budget,
        offloaded_bytes=sum(p.saved_bytes for p in offloaded),
        kept_bytes=sum(layers[g].saved_bytes for g in kept) + sum(p.recompute_bytes or 0 for p in redone),
        recomputed_bytes=sum(p.rebuilt_bytes for p in redone),
        predicted_peak=predicted_peak(layers, kept, recomputed, floor, base),
        added_ms=sum(p.offload_ms for p in offloaded) + sum(p.forward_ms for p in redone),
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
