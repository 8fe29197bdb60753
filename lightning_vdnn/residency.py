"""``resident_blocks="auto"``: how many of the streamed blocks stay on the device, chosen from ``memory_budget``.

A resident block costs device memory and saves host work: the host optimizer, not PCIe, bounds a streamed
step (gpt_1b on an H200: 0.37x of in-GPU throughput with every block streamed, 0.86x with two thirds
resident), so the choice is the most blocks that fit. The first ones, as ``resident`` means in
``streaming.py``: the next forward starts with them while the host finishes updating the rest.

Model: the first step streams every block (exact, as with ``resident_blocks=0``) and its device peak is
measured (``torch.cuda.max_memory_allocated``; a CPU device has none, and counts as 0). Making block ``i``
resident adds what it then holds on the device, in the dtypes it would have there, read from the real tensors
once the first step has created the optimizer state (block updates still queued are waited for): its fp32
weights and its share of the user's ``optimizer.state`` all step; its gradient from its backward to the
optimizer step, and there, unless the optimizer is fused, one temporary of its weights' size (a multi-tensor
Adam's square root of the second moment); and under autocast the low-precision weight copy autocast caches
through forward. When the last step's gradients are freed as the batch starts (``grads.py``), that copy and the
gradient are never alive together and only the larger phase counts; otherwise forward holds both (gpt_1b:
counting the copy beside the gradient over-predicted 20 resident blocks by 2 GB, and left 3 of the blocks that
fit 63% of the in-GPU peak streaming). Its input is held either way (a streamed block keeps it for its
recompute). Keeping its activations from forward to backward adds ``activations[i]`` (measured during the first
step's recompute, plus the weight copy its backward then needs; 0 when activation offload moves them,
``"all"``/``"auto"``); otherwise the block runs under activation checkpointing, as the streamed ones recompute.
Streaming's device buffers shrink only if the blocks left to stream are smaller than the largest one. All of it
is alive when the streamed step peaks (backward of the streamed blocks, which come after the resident ones), so
with ``k`` blocks resident of which the first ``j`` keep their activations::

    predicted(k, j) = measured + sum(cost[:k]) - slots_freed(k) + sum(activations[:j])

Blocks first: the largest ``k`` (at most all but one) with ``predicted(k, 0) <= budget``, then the largest
``j <= k`` within it. A streamed block costs its host update, which bounds the step (about 15 ms of AdamW per
gpt_1b block on the H200's host), a recomputing resident one its forward again (about 2 ms). The streamer is
then rebuilt between two steps (:func:`switch`): weights, gradients and optimizer state move, so training
continues exactly as before. The next steps are measured again; a peak over the budget (an allocator's
rounding, temporaries of the optimizer step) is added to the floor and the choice lowered, activations kept
first, then blocks, as the activation planner does (``planner.py``). With the ``"auto"`` activation planner on
too, blocks come first, activations get what they leave: the planner profiles again after each switch, and an
overshoot while it keeps activations is its to correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_vdnn.host_blocks import optimizer_state_bytes, state_to_device
from lightning_vdnn.planner import BudgetTooSmall
from lightning_vdnn.streaming import LayerStreamer

#: Watched steps after a switch before the choice is trusted (as ``AutoPlanner`` verifies a plan).
VERIFY_STEPS = 3


@dataclass(frozen=True)
class Choice:
    """How many leading blocks stay on the device, how many of those keep their activations (the rest recompute
    them in backward, as streamed blocks do), and the peak that predicts."""

    resident: int
    predicted_peak: int
    budget: int
    kept: Optional[int] = None  # None: every resident block keeps its activations

    @property
    def recompute_from(self) -> int:
        """The first resident block that recomputes (``resident`` when none does)."""
        return self.resident if self.kept is None else self.kept


def choose(floor: int, costs: Sequence[int], budget: int, freed: Optional[Sequence[int]] = None,
           activations: Optional[Sequence[int]] = None, most: Optional[int] = None) -> Choice:
    """The most leading blocks resident (at most ``most``, default all but one) with
    ``floor + sum(costs[:k]) - freed[k]`` within ``budget``, then the most of those, first ones first, that also
    keep their activations within it. ``floor``: the peak with every block streamed; ``costs[i]``: device bytes
    block ``i`` adds when resident and recomputing; ``activations[i]``: what it adds on top by keeping its
    activations (default none); ``freed[k]``: streaming buffers no longer needed with ``k`` resident.

    Blocks first: a streamed block costs the host its update (gpt_1b on an H200: about 15 ms of AdamW per
    block and step, which bounds the step), a resident one that recomputes costs its forward again (about 2 ms).

    Raises:
        BudgetTooSmall: ``budget < floor``; the message states the minimum.
    """
    BudgetTooSmall.check(floor, budget, "with every block streamed",
                         "or make the step smaller (batch size, sequence length, microbatches=...).")
    freed = freed if freed is not None else [0] * (len(costs) + 1)
    activations = activations if activations is not None else [0] * len(costs)
    most = len(costs) - 1 if most is None else min(most, len(costs) - 1)  # one block at least keeps streaming
    resident, peak, added = 0, floor, 0
    for k in range(1, most + 1):
        added += costs[k - 1]
        if floor + added - freed[k] <= budget:
            resident, peak = k, floor + added - freed[k]
    kept = 0
    while kept < resident and peak + activations[kept] <= budget:
        peak += activations[kept]
        kept += 1
    return Choice(resident, peak, budget, kept)


class PeakMeter:
    """The device's peak allocated memory since :meth:`reset`: CUDA's allocator statistics, None on a CPU
    device (there, the host is the device). Tests and other allocators plug in their own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> Optional[int]:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


class WatchedSteps:
    """The steps a choice from a budget measures, the first (profiling) one and :data:`VERIFY_STEPS` after each
    change, each from its first batch to the next step's (``AutoResidency``, ``saving.AutoSaving``)."""

    def __init__(self, meter: PeakMeter) -> None:
        self.meter = meter
        self._window: Optional[int] = None  # the optimizer step whose peak is being measured
        self._left = 1  # watched steps still to come: the profiling step first

    def ended(self, step: int) -> bool:
        """At the start of a batch, ``step`` optimizer steps done: whether a watched step has just ended (its
        peak is then ``meter.read()``)."""
        if self._window is None or step <= self._window:  # nothing watched, or its step still running
            return False
        self._window = None
        return True

    def after_change(self) -> None:
        self._left = VERIFY_STEPS

    def start(self, step: int) -> bool:
        """Measure the step about to run if it is one to watch; whether it is."""
        if self._window is not None or self._left <= 0:
            return False
        self._left -= 1
        self._window = step
        self.meter.reset()
        return True


def block_costs(streamer: LayerStreamer, optimizers: Iterable[Optimizer], grads_in_forward: bool = True) -> list[int]:
    """Device bytes each streamed block would add to the step's peak if resident, activations aside (see the
    module docstring); call it after a step, when the optimizer state exists. ``grads_in_forward``: the last
    step's gradients are still allocated through forward, beside autocast's weight copies."""
    optimizers = list(optimizers)
    costs = []
    for b in streamer.blocks:
        weights = sum(p.numel() * p.element_size() for p in b.params)
        grads = sum(p.numel() * p.element_size() for p in b.params if p.requires_grad)
        state = optimizer_state_bytes(optimizers, b.params)
        casts = _cast_bytes(streamer, b.numel)
        forward = casts + (grads if grads_in_forward else 0)
        step = grads + _step_temporaries(optimizers, b.params, streamer.device)
        costs.append(weights + state + max(forward, step))
    return costs


def _step_temporaries(optimizers: list[Optimizer], params: list[Tensor], device: torch.device) -> int:
    """Device bytes the optimizer step allocates beside the state for ``params`` resident on ``device``: one
    tensor of each one's size for the multi-tensor (foreach) kernels, which torch picks by default on CUDA; none
    when fused or per tensor."""
    groups = {id(p): g for opt in optimizers for g in opt.param_groups for p in g["params"]}
    total = 0
    for p in params:
        group = groups.get(id(p))
        if not p.requires_grad or group is None or group.get("fused"):
            continue
        foreach = group.get("foreach")
        if foreach or (foreach is None and device.type == "cuda"):
            total += p.numel() * p.element_size()
    return total


def block_activations(streamer: LayerStreamer, kept: bool) -> list[int]:
    """Device bytes each streamed block's activations would add if it were resident and kept them, measured
    during the first step's recompute (``streamer.saved_bytes``), and autocast's weight copy, which backward
    then needs; 0 when activation offload moves them."""
    return [(saved or 0) + _cast_bytes(streamer, b.numel) if kept else 0
            for saved, b in zip(streamer.saved_bytes, streamer.blocks)]


def _cast_bytes(streamer: LayerStreamer, numel: int) -> int:
    """Autocast's low-precision copy of a resident block's weights (none without autocast)."""
    dtype = streamer.autocast_dtype
    return numel * dtype.itemsize if dtype != streamer.host_dtype else 0


def slots_freed(streamer: LayerStreamer) -> list[int]:
    """For each ``k``, the device bytes of streaming buffers that ``k`` leading blocks resident no longer need
    (the slots are sized to the largest streamed block: nothing, when the blocks are alike)."""
    numels = [b.numel for b in streamer.blocks]
    host, staged = streamer.host_dtype.itemsize, streamer.stage is not None

    def buffers(rest: list[int]) -> int:  # two slots, the gradient buffer, the cast staging buffer
        most = max(rest, default=0)
        return 2 * most * streamer.dtype.itemsize + most * host + (most * host if staged else 0)

    return [buffers(numels) - buffers(numels[k:]) for k in range(len(numels))]


class ResidencyPlanner:
    """Profile, choose, verify: the choice from the all-streamed step, lowered when a measured peak overshoots.

    Args:
        budget: bytes the step may peak at on the device.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.choice: Optional[Choice] = None
        self.measured_peak: Optional[int] = None
        self._floor = 0
        self._costs: list[int] = []
        self._freed: list[int] = []
        self._activations: list[int] = []

    def profile(self, peak: Optional[int], costs: Sequence[int], freed: Sequence[int],
                activations: Optional[Sequence[int]] = None) -> Choice:
        """The step with every block streamed peaked at ``peak`` (None: not measurable, counted as 0)."""
        self.measured_peak = peak
        self._floor, self._costs, self._freed = peak or 0, list(costs), list(freed)
        self._activations = list(activations) if activations is not None else [0] * len(self._costs)
        self.choice = self._choose(len(self._costs))
        return self.choice

    def verify(self, peak: Optional[int]) -> Optional[Choice]:
        """A step ran the current choice and peaked at ``peak``: a lower choice when that overshot the budget,
        else None. The overshoot is added to the floor, so the new choice leaves room for it; it keeps fewer
        activations, or fewer blocks, than the one that overshot."""
        self.record(peak)
        old = self.choice
        if peak is None or old is None or peak <= self.budget or not old.resident:
            return None
        self._floor = min(self._floor + peak - old.predicted_peak, self.budget)
        new = self._choose(old.resident)
        if (new.resident, new.recompute_from) >= (old.resident, old.recompute_from):
            new = self._choose(old.resident - 1)
        self.choice = new
        return new

    def record(self, peak: Optional[int]) -> None:
        """A watched step peaked at ``peak`` (None: not measurable): the peak the report shows."""
        if peak is not None:
            self.measured_peak = peak

    def _choose(self, most: int) -> Choice:
        return choose(self._floor, self._costs, self.budget, self._freed, self._activations, most)


class AutoResidency:
    """What ``VDNNStrategy`` runs between steps for ``resident_blocks="auto"``: measure the steps it watches
    (the first, and :data:`VERIFY_STEPS` after each switch), and say when the streamer should switch.

    Args:
        budget: bytes the step may peak at on the device (``planner.device_budget``).
        meter: the device's peak memory (:class:`PeakMeter`).
        activations: whether a resident block's saved activations stay on the device (no activation offload,
            or ``"conv"``), so that they count in its cost.
        grads_in_forward: whether the last step's gradients stay allocated through the next forward (Lightning
            frees them after ``training_step`` unless ``grads.py`` can free them as the batch starts).
    """

    def __init__(self, budget: int, meter: PeakMeter, activations: bool, grads_in_forward: bool = True) -> None:
        self.planner = ResidencyPlanner(budget)
        self.meter = meter
        self.activations = activations
        self.grads_in_forward = grads_in_forward
        self.steps = WatchedSteps(meter)

    def between_steps(self, step: int, streamer: LayerStreamer, optimizers: Sequence[Optimizer],
                      yield_to_activations: bool = False) -> Optional[Choice]:
        """At the start of a batch, ``step`` optimizer steps done: the resident blocks to switch to now, or
        None. ``yield_to_activations``: the activation planner keeps activations on the device and corrects
        an overshoot itself.

        Raises:
            BudgetTooSmall: the step with every block streamed peaked above the budget.
        """
        if not self.steps.ended(step):
            return None
        peak = self.meter.read()
        if self.planner.choice is None:
            streamer.measure_saved = False
            streamer.synchronize()  # block updates queued into this forward (clipping) create their state now
            choice = self.planner.profile(peak, block_costs(streamer, optimizers, self.grads_in_forward),
                                          slots_freed(streamer),
                                          block_activations(streamer, self.activations))
        elif yield_to_activations:
            self.planner.record(peak)
            choice = None
        else:
            choice = self.planner.verify(peak)
        if choice is None or not choice.resident and streamer.resident == 0:
            return None
        self.steps.after_change()
        return choice

    def watch(self, step: int, streamer: LayerStreamer) -> None:
        """After :meth:`between_steps` (and any switch): measure the step about to run, if it is one to watch."""
        if self.steps.start(step):
            streamer.measure_saved = self.planner.choice is None

    def stats(self) -> dict[str, Optional[int]]:
        """The report's residency fields (``MemoryReport``)."""
        choice = self.planner.choice
        return {"resident_budget_bytes": self.planner.budget,
                "resident_predicted_peak_bytes": choice.predicted_peak if choice else None,
                "resident_measured_peak_bytes": self.planner.measured_peak}


def switch(streamer: LayerStreamer, choice: Choice, optimizers: Sequence[Optimizer],
           build: Callable[[int, int], LayerStreamer]) -> LayerStreamer:
    """``streamer`` closed and rebuilt by ``build(resident, recompute_from)`` between two steps, exactly: queued
    host updates land, every parameter keeps its identity and value, gradients follow their parameters, and the
    optimizer state of the blocks now resident moves to the device (back to the host for those streamed
    again)."""
    resident = choice.resident
    eager = streamer.eager_updates
    streamer.close()
    streamer.blocks = []
    new = build(resident, choice.recompute_from)
    new.set_eager(eager)
    new.attach_optimizers(optimizers)  # also moves the streamed blocks' state to the host
    on_device = [p for block in list(new.container)[:resident] for p in block.parameters()]
    for opt in optimizers:  # the modules outside the blocks keep their state where it is (offload_optimizer)
        state_to_device(opt, on_device, new.device)
    return new
