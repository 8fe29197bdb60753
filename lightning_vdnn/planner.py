"""What ``activation_offload="auto"`` keeps on the device and what it moves, given a memory budget.

Model: every layer's saved activations either stay on the device or go to the host. With all of them
offloaded (the first step runs that way, safely, and is measured) the step peaks at ``floor`` and forward
alone at ``forward_peak``. What a plan keeps is all alive when forward ends, and freed as backward walks
back past it, so keeping layers ``K`` peaks at ``max(floor, forward_peak + sum(b_g, g in K))``. On a GPU fast enough to be bound by PCIe once it offloads at all (bf16 on
Hopper moves ~8 GB under a whole step of compute), step time grows with the bytes moved, so the plan keeps
the most bytes that fit: ``max sum(b_g, kept) s.t. floor + sum(b_g, kept) <= budget``, a subset-sum solved
exactly by dynamic programming over sizes rounded up to ``granule`` bytes (1 MiB: the peak prediction errs
only on the safe side, by at most a granule per layer). Ties prefer the tail of forward, which backward
needs first and which has the least time to hide a copy. Recompute is not among the choices yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import psutil
import torch

from lightning_vdnn.config import MemoryBudget

GiB = 2**30


class BudgetTooSmall(ValueError):
    """The budget is below the peak this model reaches even with every activation offloaded."""


@dataclass(frozen=True)
class Plan:
    """Which layers (forward order) keep their activations on the device."""

    kept: frozenset[int]
    offloaded_bytes: int
    kept_bytes: int
    predicted_peak: int
    budget: int


def solve(group_bytes: Sequence[int], floor: int, budget: int, granule: int = 2**20,
          forward_peak: Optional[int] = None) -> Plan:
    """The plan that moves the fewest bytes while ``max(floor, forward_peak + kept bytes) <= budget``
    (``forward_peak`` defaults to ``floor``: the cautious model).

    Raises:
        BudgetTooSmall: ``budget < floor``; the message states the minimum.
    """
    if budget < floor:
        raise BudgetTooSmall(
            f"memory_budget={budget / GiB:.2f} GiB is below {floor / GiB:.2f} GiB, the peak this step reaches with "
            f"every activation offloaded. Raise memory_budget to at least {floor / GiB:.2f} GiB, or make the step "
            "smaller (batch size, sequence length)."
        )
    base = floor if forward_peak is None else min(forward_peak, floor)
    fine = max(1, (budget - base) // 4096)  # small budgets: finer sizes (a power of two), same array length
    granule = min(granule, 1 << (fine.bit_length() - 1))
    sizes = [-(-int(b) // granule) for b in group_bytes]  # rounded up: predictions stay conservative
    capacity = (budget - base) // granule
    kept = _subset_sum(sizes, capacity)
    kept_bytes = sum(group_bytes[g] for g in kept)
    return Plan(frozenset(kept), sum(group_bytes) - kept_bytes, kept_bytes, max(floor, base + kept_bytes), budget)


def _subset_sum(sizes: Sequence[int], capacity: int) -> list[int]:
    """Indices whose sizes add up to the largest total <= capacity (exact, tail items preferred)."""
    total = sum(sizes)
    if total <= capacity:
        return list(range(len(sizes)))
    capacity = min(capacity, total)
    reach = np.zeros(capacity + 1, dtype=bool)
    reach[0] = True
    first = np.full(capacity + 1, -1, dtype=np.int64)  # the item that first reached each sum
    for g in reversed(range(len(sizes))):
        s = sizes[g]
        if s == 0:
            continue
        if s > capacity:
            continue
        new = np.zeros_like(reach)
        new[s:] = reach[:-s] & ~reach[s:]
        first[new] = g
        reach |= new
    best = int(np.flatnonzero(reach)[-1])
    chosen = [g for g, s in enumerate(sizes) if s == 0]
    while best > 0:
        g = int(first[best])
        chosen.append(g)
        best -= sizes[g]
    return sorted(chosen)


class AutoPlanner:
    """Profile, plan, verify: the first pass offloads everything and measures; later passes run the plan and
    re-plan when shapes change (bytes differ) or the measured peak overshoots the budget.

    Args:
        budget: bytes the step may peak at on the device.
        granule: rounding of sizes in the solver.
    """

    def __init__(self, budget: int, granule: int = 2**20) -> None:
        self.budget = budget
        self.granule = granule
        self.plan: Optional[Plan] = None
        self.measured_peak: Optional[int] = None
        self._floor: Optional[int] = None
        self._forward_peak: Optional[int] = None
        self._bytes: Optional[list[int]] = None
        self._slack = 0  # raised when a measured peak overshoots a prediction
        self._since_plan = 0

    @property
    def keep(self) -> Optional[frozenset[int]]:
        """Layers to keep on the device in the next pass; None: offload everything (profiling)."""
        return None if self.plan is None else self.plan.kept

    @property
    def profiling(self) -> bool:
        return self.plan is None

    @property
    def watching(self) -> bool:
        """Whether the next step's peak should be measured: profiling, or verifying a fresh plan."""
        return self.plan is None or self._since_plan < 3

    def observe(self, group_bytes: Sequence[int], peak: Optional[int],
                forward_peak: Optional[int] = None) -> Optional[Plan]:
        """Feed one finished step (``peak`` None when it was not measured, ``forward_peak`` the peak before
        backward began); returns a new plan if one was made."""
        self._since_plan += 1
        if peak is None:
            if self.plan is not None and list(group_bytes) != self._bytes:
                self.plan = None
            return None
        self.measured_peak = peak
        if self.plan is None:  # the profiling pass: everything was offloaded
            self._floor, self._bytes, self._forward_peak = peak, list(group_bytes), forward_peak
            return self._replan()
        if list(group_bytes) != self._bytes:  # shapes changed: start over from a safe pass
            self.plan = None
            return None
        if peak > self.budget and self.plan.kept:  # under-predicted: give back the overshoot and re-plan
            self._slack += peak - self.plan.predicted_peak + self.granule
            return self._replan()
        return None

    def lower(self, failed_at: Optional[int] = None, fraction: float = 0.5) -> Optional[Plan]:
        """The device ran out of memory in a step that ran the current plan: lower the budget so that the plan
        keeps at most ``1 - fraction`` of the bytes the failing one kept, make that plan and return it; None
        when there is nothing left to lower (no plan yet: the profiling pass offloads everything; or a plan
        that keeps nothing).

        The new budget is the lower of the failing plan's predicted peak and ``failed_at`` (device memory
        allocated when the error was raised, if measured: where the device really gave out) less ``fraction``
        of the kept bytes, and no lower than the floor (the all-offloaded peak), where the plan keeps nothing,
        as the profiling step did, which fit.
        """
        plan = self.plan
        if plan is None or not plan.kept_bytes or self._floor is None:
            return None
        start = plan.predicted_peak if failed_at is None else min(plan.predicted_peak, failed_at)
        target = start - int(plan.kept_bytes * fraction)
        if target > self._floor:
            self.budget = target
            new = self._replan()
            if new.kept_bytes <= plan.kept_bytes * (1 - fraction):
                return new
        self.budget = min(self.budget, max(target, self._floor))
        self.plan = Plan(frozenset(), sum(self._bytes or ()), 0, self._floor, self.budget)
        self._since_plan = 0
        return self.plan

    def _replan(self) -> Plan:
        assert self._floor is not None and self._bytes is not None
        floor = min(self._floor + self._slack, max(self.budget, self._floor))  # overshoot: at worst keep nothing
        forward = None if self._forward_peak is None else self._forward_peak + self._slack
        self.plan = solve(self._bytes, floor, self.budget, self.granule, forward)
        self._since_plan = 0
        return self.plan


#: The budget of a CPU run without one: the host is the device, nothing needs to fit.
UNBOUNDED = 2**62


def device_budget(budget: Optional[MemoryBudget], device: torch.device) -> int:
    """Bytes a step may use on ``device``: the user's budget, or its capacity less a safety margin (the larger
    of 2 GiB and 10%, for the allocator's fragmentation and other processes). On a CPU device with no budget,
    nothing needs to move: the host is the device."""
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
        margin = max(2 * GiB, capacity // 10)
    else:
        capacity, margin = psutil.virtual_memory().total, 0
        if budget is None:
            return UNBOUNDED
    return budget.resolve(capacity) if budget is not None else capacity - margin
