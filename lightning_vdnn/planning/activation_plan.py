"""What ``activation_offload="auto"`` does with each layer's saved activations, given a memory budget: keep them on
the device, offload them to the host, or recompute the layer in backward.

Profile. The first step offloads everything (safe: the least device memory it can take) and is measured (on a GPU
the second: the first is a warm-up, slowed by library set-up and by pinning the host buffers, see ``warmup``): its
peak, ``floor``; the peak when forward ends, ``forward_peak``; and per layer a :class:`LayerProfile` (``offload/trace.py``,
``offload/recompute_probe.py``): the bytes it saves for backward ``b`` (device memory: each saved storage whole
and once, ``offload/ledger.py``), what it would still save if recomputed ``r`` (its inputs
that no earlier layer saved, and what functional code after it saves), its forward compute time ``f``, the time
``t`` one copy of its saves takes (span by span, as the offloader copies them) at the bandwidth the step's copies reached, and the compute ``w`` a copy can hide
under. The profiling step runs before its optimizer step creates the optimizer state, which every later step holds
through forward and backward: :class:`Later` raises the measured peaks by it. The plan is reused every step, and
made again when the layers' input shapes change (an epoch's short last batch, a new sequence length) or a
measured peak overshoots the prediction.

Cost model: time a layer adds to a step over keeping everything on the device, and memory it holds over ``floor``.

- keep: 0 ms; holds ``b`` from its forward until its backward.
- offload: the copy time compute does not hide, on the copy link (``planning/copy_link.py``): copies to the host
  queue on one stream in forward order, each as its layer's forward ends, and hide if the queue drains before
  forward ends; copies back queue on the other in backward order, each issued as backward reaches a cue layer
  above it (as early as the budget allows while the layers between still run, as late as still lets it arrive in
  time), and hide if they arrive before backward reads them; backward costs about twice forward. What runs late
  is exposed. The leading layers are the ones that hide (the most forward follows them, backward needs them last,
  when it holds least), so the solver tries, for each ``k``, layers ``[0, k)`` offloaded and the rest chosen by
  the dynamic program, which prices any other offload by its own windows: ``max(0, t - w) + max(0, t - 2w)``
  (``w`` the next layer's measured forward; ``LayerProfile.offload_ms``), and no less than the link says it costs
  alone. On a CPU device copies are inline (``w = 0``): nothing hides, and the plans are those of the per-layer
  model. Holds nothing beyond the floor, which has one layer's copies in flight, except where the link holds more:
  bytes still queued to the host as a later layer's forward ends, and bytes copied back ahead while the layers
  above still run, both counted in the predicted peak at that point; the plan tells the offloader how much may
  be in flight (``Plan.inflight_bytes``) and when each copy back starts (``Plan.prefetch_from``).
- recompute: ``f`` again in backward (activation checkpointing); holds ``r`` on the device, and its backward
  rebuilds the rest, ``b - r``, all at once.
- recompute selectively (``offload/selective.py``): the layer's matrix multiplies and attention keep their outputs,
  the cheap ops between them run again in backward: costs ``f`` times the share of the layer's op time those ops
  took in the profile; holds ``r`` and the kept outputs; its backward rebuilds what it saved less those. A choice
  within "recompute": per layer whole or selective, whichever the solver finds cheaper at the budget (a GPT block
  recomputed selectively holds about 60% of its bytes for a few percent of its forward).
- recompute a segment, layers ``[i, j)`` under one checkpoint (``offload/recompute.py``): their ``f`` summed; holds
  layer ``i``'s inputs and what the code after layer ``j - 1`` saves; its backward rebuilds the storages the run
  saved, each once (``segment_costs.segment_bytes``). Where one layer alone frees nothing (a CNN's leaf
  modules, each saving its input), a run frees all but its first input.
- keep lean (``offload/pointwise.py``, with ``lean_activations``): keep, less its GELU/SiLU outputs ``p``, which
  its backward makes again from the inputs it keeps, all at once: costs those kernels (timed in the profile).

Everything held is alive when forward ends and is freed as backward passes its layer, so with ``H(<=g)`` the bytes
held by layers up to ``g`` and ``base = min(forward_peak, floor)``, the predicted peak is
``max(floor, base + H(all), max over recomputed g of base + H(<=g) + b_g - r_g)`` (a segment counts as one layer).

Solver with segments: the same dynamic program, where a layer ``g`` may also end a segment that started at any
``i`` up to ``MAX_SEGMENT`` layers back, from the costs before ``i`` (a DP over boundaries, as Chen et al.'s sqrt(n)
checkpointing and Checkmate choose what to rebuild, here with the held bytes as state).

Solver: minimise the summed cost subject to predicted peak <= budget. Every peak term is a prefix sum of held bytes,
so a dynamic program over the layers in forward order, with the bytes held so far as its state, is exact; sizes are
rounded up to granules (at most 1 MiB, at most 65536 of them in the budget), so it takes O(layers x 65536) steps,
milliseconds. Not a greedy rule (vDNN's dynamic policy, Capuchin's ranking by cost per byte): a knapsack with
sizes that differ has no greedy optimum. Not an ILP (Checkmate): it would add a solver dependency to optimise
per-tensor graphs we do not schedule; at layer granularity the DP is already exact. How far from optimal: optimal
for the model up to the rounding. Each size rounds up by less than a granule, so the predicted peak errs only on
the safe side, by at most a granule per layer, and a plan that would fit only to the byte may be passed over.
Among plans of equal predicted time it takes the one that keeps the most (keeping does no work the model could
misjudge), and per layer keep, then offload, then recompute, toward the tail of forward (backward needs it first).

What the model leaves out, caught by measuring the peak of the steps after each new plan (an overshoot is given
back and the plan made again; when the plan made again is the same plan, the model cannot see what overshot,
and the next steps run the profiling step's plan, which fit, keeping and recomputing nothing; a plan timed on the
copy link that overshoots is made again without the link, not with the overshoot given back from every later plan:
its copies in flight and ahead are what it adds to the per-layer model's bytes, and where the profiling step's
layer times were long, it held them longer than timed): copies queue on one
stream, so a long copy spills into the next windows, or hides under several short layers; a recomputed layer
whose input an earlier layer offloaded waits for that copy at the start of its backward. (The profiling step's
layer times leave out compute's waits for the in-flight cap and for the host pinning buffers: with them every
layer looked slow, offloading looked free and recomputing dear; runs 8 and 9 planned gpt_1b at 75% with no
recompute.)

``solve`` keeps the keep-or-offload model with step time proportional to the bytes moved (a GPU bound by PCIe):
the subset-sum that keeps the most bytes that fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional, Sequence, Union

import psutil
import torch

from lightning_vdnn.config import MemoryBudget
from lightning_vdnn.offload.trace import LayerProfile
from lightning_vdnn.planning import copy_link
from lightning_vdnn.planning.activation_solver import Plan, _plan, bytes_only, least_times, solve_layers
from lightning_vdnn.units import UNBOUNDED, GiB, MiB

if TYPE_CHECKING:
    from lightning_vdnn.offload.offloader import ActivationOffloader

#: Plans made again after measured peaks over the budget before the planner settles for the profiling step's plan
#: (keep nothing, recompute nothing), which fit.
MAX_REPLANS = 3
#: How far over its budget a measured peak may be and the budget still count as kept (``MemoryReport``): the
#: allocator's rounding and the step's small tensors the model does not count.
BUDGET_TOLERANCE = 0.02
#: Steps whose peak is measured after a new plan, to check it.
CHECKED_STEPS = 3

@dataclass(frozen=True)
class Later:
    """What every step after the profiling one holds on the device that the profiling step did not, through all
    of its forward and backward: the optimizer state its optimizer step created (``state``), and, through forward,
    the gradients Lightning clears only after ``training_step`` (``grads``). Without it the first step's peak,
    taken before that state existed, under-predicts the next steps by it.

    Attributes:
        state: bytes of optimizer state on the device created by the profiling step.
        grads: bytes of gradients on the device still held when the next forward runs.
        backward_peak: the profiling step's device peak when backward ended (before its optimizer step).
    """

    state: int
    grads: int = 0
    backward_peak: Optional[int] = None

    def floor(self, peak: int, forward_peak: Optional[int]) -> tuple[int, Optional[int]]:
        """The profiled ``peak`` and ``forward_peak`` as the next steps will reach them: the optimizer step's
        own peak had the state already; forward and backward gain it."""
        if self.backward_peak is None:
            return peak, forward_peak
        forward = None if forward_peak is None else forward_peak + self.state + self.grads
        return max(peak, self.backward_peak + self.state, forward or 0), forward


class AutoPlanner:
    """Profile, plan, verify: the first pass offloads everything and measures; later passes run the plan and
    re-plan when shapes change or the measured peak overshoots the budget.

    Args:
        budget: bytes the step may peak at on the device.
        granule: rounding of sizes in the solver.
        recompute: whether plans may recompute layers (off where something else owns the layers' forward:
            layer streaming, DeepSpeed ZeRO-3's parameter hooks).
        selective: whether a recompute may be selective (``VDNNConfig.selective_recompute``).
        lean: whether a kept layer may be kept lean (``VDNNConfig.lean_activations``).
        warmup: profiling passes before the one planned from. A device's first step times more than the layers:
            library set-up and the allocators' growth (gpt_1b's layers take 0.6-2 s each in its first step,
            1.6-3.7 ms once warm). Each layer's times are the least seen over the passes; the bytes and peaks are
            the last pass's, which already holds the optimizer state (so :class:`Later` is not applied).
    """

    def __init__(self, budget: int, granule: int = MiB, recompute: bool = True, warmup: int = 0,
                 selective: bool = True, lean: bool = True) -> None:
        if warmup < 0:
            raise ValueError(f"warmup={warmup!r} must be a number of passes >= 0.")
        self.budget = budget
        self.granule = granule
        self.recompute = recompute
        self.allow_selective, self.allow_lean = selective, lean
        self.warmup = warmup
        self._profiles: list[list[LayerProfile]] = []  # the warm-up passes so far
        self.plan: Optional[Plan] = None
        self.measured_peak: Optional[int] = None
        self._floor: Optional[int] = None
        self._forward_peak: Optional[int] = None
        self._layers: Optional[list[LayerProfile]] = None
        self._slack = 0  # raised when a measured peak overshoots a prediction
        self._link = True  # plans may time copies on the copy link (until a link plan overshoots)
        self.replans = 0  # plans made again because a measured peak overshot the budget
        self._since_plan = 0

    @classmethod
    def for_device(cls, budget: Optional[MemoryBudget], device: torch.device, recompute: bool = True,
                   selective: bool = True, lean: bool = True) -> "AutoPlanner":
        """The planner of steps on ``device``: the user's ``budget`` resolved there (:func:`device_budget`), and on a
        GPU one warm-up pass before the profile (see ``warmup``)."""
        return cls(device_budget(budget, device), recompute=recompute, warmup=int(device.type == "cuda"),
                   selective=selective, lean=lean)

    @property
    def keep(self) -> Optional[frozenset[int]]:
        """Layers whose saves stay on the device in the next pass (kept or recomputed); None: offload everything
        (profiling)."""
        return None if self.plan is None else self.plan.on_device

    @property
    def recomputed(self) -> frozenset[int]:
        """Layers to recompute in the next pass's backward."""
        return frozenset() if self.plan is None else self.plan.recomputed

    @property
    def selective(self) -> frozenset[int]:
        """Of the layers recomputed in the next pass, those recomputed selectively."""
        return frozenset() if self.plan is None else self.plan.selective

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """Runs of recomputed layers ``[start, end)`` recomputed as one segment in the next pass."""
        return () if self.plan is None else self.plan.segments

    @property
    def prefetch_from(self) -> tuple[tuple[int, int], ...]:
        """``(layer, cue)``: offloaded layers whose copy back the next pass starts as backward reaches ``cue``."""
        return () if self.plan is None else self.plan.prefetch_from

    @property
    def inflight_bytes(self) -> int:
        """Bytes the next pass's forward may queue to the host at once beyond the offloader's own bound."""
        return 0 if self.plan is None else self.plan.inflight_bytes

    @property
    def floor(self) -> Optional[int]:
        """The profiled peak with every activation offloaded, as the next steps reach it (None: not profiled)."""
        return self._floor

    def apply_to(self, offloader: "ActivationOffloader") -> None:
        """Give ``offloader`` the plan for its next pass: every choice it acts on, from one place."""
        lean = frozenset() if self.plan is None else self.plan.lean
        offloader.set_plan(self.keep, self.recomputed, self.segments, self.selective, self.prefetch_from,
                           self.inflight_bytes, lean)

    @property
    def profiling(self) -> bool:
        return self.plan is None

    @property
    def watching(self) -> bool:
        """Whether the next step's peak should be measured: profiling, or verifying a fresh plan."""
        return self.plan is None or self._since_plan < CHECKED_STEPS

    @property
    def just_checked(self) -> bool:
        """Whether the step just observed was the last of the steps that check the current plan: its peak,
        ``measured_peak``, is the plan's as it runs."""
        return self.plan is not None and self._since_plan == CHECKED_STEPS

    def observe(self, layers: Sequence[Union[int, LayerProfile]], peak: Optional[int],
                forward_peak: Optional[int] = None, later: Optional[Later] = None) -> Optional[Plan]:
        """Feed one finished step: its layers (profiles, or bytes alone), ``peak`` (None when not measured),
        ``forward_peak`` (the peak before backward began) and, for the profiling step, what the steps after it
        hold that it did not (``later``); returns a new plan if one was made."""
        layers = [p if isinstance(p, LayerProfile) else bytes_only(p) for p in layers]
        self._since_plan += 1
        if self.plan is not None and self._changed(layers):  # new shapes: start over from a safe pass
            self.plan = None
            return None
        if peak is None:
            return None
        self.measured_peak = peak
        if self.plan is None:  # a profiling pass: everything was offloaded
            if len(self._profiles) < self.warmup:
                self._profiles.append(layers)
                return None
            warmed, self._profiles, self.warmup = self._profiles, [], 0  # once: later re-profiles plan at once
            layers = least_times(layers, warmed)
            if not self.recompute:
                layers = [replace(p, recompute_bytes=None, segment=None, selective=None) for p in layers]
            elif not self.allow_selective:
                layers = [replace(p, selective=None) for p in layers]
            if not self.allow_lean:
                layers = [replace(p, pointwise_bytes=0, pointwise_ms=0.0) for p in layers]
            if later is not None and not warmed:
                peak, forward_peak = later.floor(peak, forward_peak)
            self._floor, self._layers, self._forward_peak = peak, layers, forward_peak
            return self._replan()
        if peak > self.budget and self.plan.on_device:  # under-predicted: give back the overshoot and re-plan
            old = self.plan
            self.replans += 1
            if old.linked:  # the link's copies in flight and ahead are its least certain bytes: plan without it
                self._link = False
            else:
                self._slack += peak - old.predicted_peak + self.granule
            new = self._replan()
            if (new.kept, new.recomputed, new.segments, new.selective, new.lean) == \
                    (old.kept, old.recomputed, old.segments, old.selective, old.lean) or \
                    self.replans > MAX_REPLANS:  # blind to what overshot, or still over: the safe plan
                self.plan = _plan(self._layers, frozenset(), frozenset(), self._floor, self._floor, self.budget)
            return self.plan
        return None

    def profile_again(self, warmup: int = 1) -> None:
        """Drop the plan: the next steps profile again, the first ``warmup`` of them not planned from (after the
        layers changed, e.g. compiled again: their first call's times are the compiler's)."""
        self.plan, self._profiles, self.warmup = None, [], warmup

    def planned_from(self) -> dict:
        """What the current plan was solved from (profiles, floor, budget, slack, whether on the copy link), so that
        it can be solved again elsewhere (``benchmarks/replan.py``); empty before the first plan."""
        if self._layers is None:
            return {}
        return dict(layers=self._layers, floor=self._floor, forward_peak=self._forward_peak, budget=self.budget,
                    slack=self._slack, granule=self.granule, replans=self.replans, link=self._link, plan=self.plan)

    def _changed(self, layers: list[LayerProfile]) -> bool:
        """Other input shapes, or other bytes in a layer that ran as profiled (a recomputed one saves less)."""
        old, redone = self._layers or [], self.recomputed
        return len(layers) != len(old) or any(
            p.inputs != q.inputs or (g not in redone and p.saved_bytes != q.saved_bytes)
            for g, (p, q) in enumerate(zip(layers, old)))

    def lower(self, failed_at: Optional[int] = None, fraction: float = 0.5) -> Optional[Plan]:
        """The device ran out of memory in a step that ran the current plan: lower the budget so that the plan
        keeps at most ``1 - fraction`` of the bytes the failing one kept on the device, make that plan and return
        it; None when there is nothing left to lower (no plan yet: the profiling pass offloads everything; or a
        plan that keeps nothing and recomputes nothing).

        The new budget is the lower of the failing plan's predicted peak and ``failed_at`` (device memory
        allocated when the error was raised, if measured: where the device really gave out) less ``fraction``
        of the kept bytes, and no lower than the floor (the all-offloaded peak), where the plan keeps nothing,
        as the profiling step did, which fit. A failing plan timed on the copy link is made again without it.
        """
        plan = self.plan
        if plan is None or not (plan.kept_bytes or plan.recomputed) or self._floor is None:
            return None
        start = plan.predicted_peak if failed_at is None else min(plan.predicted_peak, failed_at)
        target = start - int(plan.kept_bytes * fraction)
        self._link = self._link and not plan.linked  # as after an overshoot (``observe``): its least certain bytes
        if target > self._floor:
            self.budget = target
            new = self._replan()
            if new.kept_bytes <= plan.kept_bytes * (1 - fraction):
                return new
        self.budget = min(self.budget, max(target, self._floor))
        layers = self._layers or []
        self.plan = _plan(layers, frozenset(), frozenset(), self._floor, self._floor, self.budget)
        self._since_plan = 0
        return self.plan

    def _replan(self) -> Plan:
        assert self._floor is not None and self._layers is not None
        self.plan = solve_planned(self._layers, self._floor, self.budget, self.granule, self._forward_peak,
                                  self._slack, self._link)
        self._since_plan = 0
        return self.plan

    def report_fields(self, layers: int) -> dict:
        """The plan's numbers for a ``MemoryReport`` of a pass of ``layers`` layers."""
        plan = self.plan
        fields = dict(policy="auto", budget_bytes=self.budget, measured_peak_bytes=self.measured_peak,
                      predicted_peak_bytes=plan.predicted_peak if plan else None, budget_replans=self.replans,
                      budget_kept=self.budget_kept)
        if plan is None:
            return dict(fields, layers_kept=0, layers_offloaded=layers, layers_recomputed=0, segments=0,
                        layers_selective=0, layers_lean=0)
        return dict(fields, layers_kept=len(plan.kept), layers_recomputed=len(plan.recomputed),
                    layers_offloaded=max(0, layers - len(plan.on_device)), segments=len(plan.segments),
                    layers_selective=len(plan.selective), layers_lean=len(plan.lean), offloaded_layers=plan.offloaded,
                    predicted_copy_ms=plan.copy_ms, predicted_exposed_copy_ms=plan.exposed_copy_ms)

    @property
    def budget_kept(self) -> Optional[bool]:
        """Whether the last measured peak stayed within :data:`BUDGET_TOLERANCE` over the budget (None: not
        measured, or no budget)."""
        if self.measured_peak is None or self.budget >= UNBOUNDED:
            return None
        return self.measured_peak <= self.budget * (1 + BUDGET_TOLERANCE)


def solve_planned(layers: Sequence[LayerProfile], floor: int, budget: int, granule: int,
                  forward_peak: Optional[int] = None, slack: int = 0, link: bool = True) -> Plan:
    """The plan :class:`AutoPlanner` makes from these inputs (its :meth:`~AutoPlanner.planned_from`): ``slack``, the
    overshoots given back, raises the floor (at worst to the budget: keep nothing) and the forward peak; ``link``:
    copies may be timed on the copy link, where the profile says they can hide (not on a CPU device: inline)."""
    raised = min(floor + slack, max(budget, floor))
    forward = None if forward_peak is None else forward_peak + slack
    linked = dict(link=True) if link and copy_link.has_overlap(layers) else {}
    return solve_layers(layers, raised, budget, granule, forward, **linked)


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
