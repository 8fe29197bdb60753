"""``resident_blocks="auto"``: how many of the streamed blocks stay on the device, chosen from ``memory_budget``.

A resident block costs device memory and saves host work: the host optimizer, not PCIe, bounds a streamed
step (gpt_1b on an H200: 0.37x of in-GPU throughput with every block streamed, 0.86x with two thirds
resident), so the choice is the most blocks that fit. The first ones, as ``resident`` means in
``streaming/streamer.py``: the next forward starts with them while the host finishes updating the rest.

Model: the first step streams every block (exact, as with ``resident_blocks=0``) and its device peak is
measured (``torch.cuda.max_memory_allocated``; a CPU device has none, and counts as 0). Making block ``i``
resident adds what it then holds on the device, in the dtypes it would have there, read from the real tensors
once the first step has created the optimizer state (block updates still queued are waited for): its fp32
weights and its share of the user's ``optimizer.state`` all step; its gradient from its backward to the
optimizer step, and there, unless the optimizer is fused, one temporary of its weights' size (a multi-tensor
Adam's square root of the second moment); and under autocast the low-precision weight copy autocast caches
through forward. When the last step's gradients are freed as the batch starts (``integrations/early_grad_free.py``), that copy and the
gradient are never alive together and only the larger phase counts; otherwise forward holds both (gpt_1b:
counting the copy beside the gradient over-predicted 20 resident blocks by 2 GB, and left 3 of the blocks that
fit 63% of the in-GPU peak streaming). Its input is held either way (a streamed block keeps it for its
recompute). Keeping its activations from forward to backward adds ``activations[i]`` (measured during the first
step's recompute, plus the weight copy its backward then needs; 0 when activation offload moves them,
``"all"``); otherwise the block runs under activation checkpointing, as the streamed ones recompute. A streamed
block may save its activations instead (``saved_blocks``, left to this choice under ``"none"`` or ``"auto"``):
that adds ``saving[i]``, the same bytes without the weight copy (its saves view the slot). Streaming's device
buffers change with the slots the streamed blocks get (``LayerStreamer.slot_count``). All of it is alive when the
streamed step peaks (backward of the streamed blocks, which come after the resident ones), so with ``k`` blocks
resident of which the first ``j`` keep their activations, and ``s`` streamed blocks saving theirs (spread as
``saved_blocks`` spreads them)::

    predicted(k, s, j) = measured + sum(cost[:k]) - slots_freed(k) + sum(saving[k + spread(s)]) + sum(activations[:j])

Blocks first: the largest ``k`` (at most all but one) with ``predicted(k, 0, 0) <= budget``, then the largest
``s``, then the largest ``j`` within it. A streamed block costs its host update (about 15 ms of AdamW per gpt_1b
block on the H200's host), which bounds the step once the updates outlast the device's work; a recomputing block
its forward again (about 1.2 ms). The streamer is then rebuilt between two steps (:func:`switch`): weights,
gradients and optimizer state move, so training continues exactly as before. The next steps are measured again;
a peak over the budget (an allocator's rounding, temporaries of the optimizer step) is added to the floor and the
choice lowered, activations kept first, then blocks, as the activation planner does (``planning/activation_plan.py``). With the
``"auto"`` activation planner on too, blocks come first, activations get what they leave: the planner profiles
again after each switch, and an overshoot while it keeps activations is its to correct.

Widening (on a GPU, under ``"none"``, once the choice is verified). Most resident blocks is the right start
while the host bounds the step; once the step is the device's, the host has room. Each block streamed then frees
its weights and optimizer state (gpt_1b: 0.8 GB), which keep the activations of more than one block (0.56 GB
each) that were recomputed. So from the watched steps' wall time and host update time per block, as many more
blocks stream as the host hides (:data:`HIDDEN` of the step), choosing the count that recomputes the fewest
blocks; the next watched steps are timed and, if slower than the choice before (:data:`SLOWER`), that one comes
back for good. Not under ``"auto"``: there the activation planner moves to the host the saves the choice made room
for, and the wider choice runs slower (measurements: ``benchmarks/README.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch.optim import Optimizer

from lightning_vdnn.planning.block_costs import block_activations, block_costs, slots_freed
from lightning_vdnn.streaming.host_state import state_to_device
from lightning_vdnn.planning.activation_solver import BudgetTooSmall
from lightning_vdnn.planning.saving_blocks import choose_saved
from lightning_vdnn.streaming.streamer import LayerStreamer
from lightning_vdnn.planning.watch import VERIFY_STEPS, PeakMeter, WatchedSteps

__all__ = ["AutoResidency", "Choice", "PeakMeter", "ResidencyPlanner", "VERIFY_STEPS", "block_activations",
           "block_costs", "choose", "differs", "slots_freed", "switch"]

#: Share of a step the host updates of the streamed blocks may take and still be hidden under it: a block's
#: update runs between its backward and its next forward, which leaves out the start of backward and the end of
#: forward; and each update slows as more run beside the blocks' copies (gpt_1b on an H200: 15 ms a block with
#: one streamed, 20 ms with nine). A choice this makes too wide runs slower and is given back.
HIDDEN = 0.75
#: A widened choice slower than this over the one before it is given back (measurement noise: about 3%).
SLOWER = 1.03
#: Steps timed per choice before widening or giving back (the fastest counts).
TIMED_STEPS = 2

@dataclass(frozen=True)
class Choice:
    """How many leading blocks stay on the device, how many of those keep their activations (the rest recompute
    them in backward, as streamed blocks do), how many streamed blocks save theirs (``saved_blocks``), and the
    peak that predicts."""

    resident: int
    predicted_peak: int
    budget: int
    kept: Optional[int] = None  # None: every resident block keeps its activations
    saving: Optional[int] = None  # None: the streamer's own (``saved_blocks``)
    recomputing: int = 0  # blocks whose forward runs again in backward (streamed ones only if ``saving`` is set)

    def describe(self, blocks: int) -> str:
        """One line for the log: where the ``blocks`` blocks run and what the step is predicted to peak at."""
        streamed = blocks - self.resident
        saving = "" if self.saving is None else f" ({self.saving} saving their activations)"
        return (f"{self.resident} of {blocks} blocks on the device ({self.resident - self.recompute_from} "
                f"recomputing their activations), {streamed} streamed from host memory{saving}; predicted peak "
                f"{self.predicted_peak / 2**30:.2f} GiB within a budget of {self.budget / 2**30:.2f} GiB")

    @property
    def recompute_from(self) -> int:
        """The first resident block that recomputes (``resident`` when none does)."""
        return self.resident if self.kept is None else self.kept


def choose(floor: int, costs: Sequence[int], budget: int, freed: Optional[Sequence[int]] = None,
           activations: Optional[Sequence[int]] = None, most: Optional[int] = None,
           saving: Optional[Sequence[int]] = None) -> Choice:
    """The most leading blocks resident (at most ``most``, default all but one) with
    ``floor + sum(costs[:k]) - freed[k]`` within ``budget``; then, with ``saving``, the most streamed blocks,
    spread as ``saved_blocks`` spreads them, that save their activations within it; then the most resident
    blocks, first ones first, that also keep theirs. ``floor``: the peak with every block streamed; ``costs[i]``:
    device bytes block ``i`` adds when resident and recomputing; ``activations[i]``: what it adds on top by
    keeping its activations (default none); ``saving[i]``: what it adds by saving them while streamed (no weight
    copy: its saves view the slot); ``freed[k]``: streaming buffers no longer needed with ``k`` resident.
    Streamed blocks save first: for the same activations they hold no autocast copy of their weights.

    Blocks first: a streamed block costs the host its update (gpt_1b on an H200: about 15 ms of AdamW per
    block and step, which bounds the step), a resident one that recomputes costs its forward again (about 1.2 ms).

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
    saved = None
    if saving is not None:
        picked = choose_saved(peak, saving[resident:], budget)
        saved, peak = picked.saved, picked.predicted_peak
    kept = 0
    while kept < resident and peak + activations[kept] <= budget:
        peak += activations[kept]
        kept += 1
    streamed = len(costs) - resident
    recomputing = resident - kept + streamed - (streamed if saved is None else saved)
    return Choice(resident, peak, budget, kept, saved, recomputing)


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
        self._saving: Optional[list[int]] = None
        self._most = 0  # most blocks resident: all but one, fewer once widened
        self.before: Optional[Choice] = None  # the choice a widened one replaced

    def profile(self, peak: Optional[int], costs: Sequence[int], freed: Sequence[int],
                activations: Optional[Sequence[int]] = None, saving: Optional[Sequence[int]] = None) -> Choice:
        """The step with every block streamed peaked at ``peak`` (None: not measurable, counted as 0).
        ``saving``: what each block would hold saving its activations while streamed (None: streamed blocks
        keep the streamer's own ``saved_blocks``)."""
        self.measured_peak = peak
        self._floor, self._costs, self._freed = peak or 0, list(costs), list(freed)
        self._activations = list(activations) if activations is not None else [0] * len(self._costs)
        self._saving = list(saving) if saving is not None else None
        self._most = len(self._costs) - 1
        self.choice = self._choose(self._most)
        return self.choice

    def widen(self, step_seconds: float, host_seconds: float) -> Optional[Choice]:
        """More blocks streamed, so that what they free keeps activations that are recomputed now, as far as the
        host hides their updates (``host_seconds`` each, against :data:`HIDDEN` of a ``step_seconds`` step): the
        choice that recomputes the fewest blocks, with the fewest streamed among equals; None when no choice
        recomputes fewer than the current one. A streamed block in a step bound by the device costs no more
        than a resident one, once its loads run ahead (``LayerStreamer.slot_count``)."""
        old = self.choice
        if old is None or self._saving is None or not old.recomputing or host_seconds <= 0:
            return None
        blocks = len(self._costs)
        hidden = min(blocks, int(HIDDEN * step_seconds / host_seconds + 1e-9))  # 1e-9: 0.6 / 0.2 is 2.999..
        best = old
        for streamed in range(blocks - old.resident + 1, hidden + 1):
            new = self._choose(blocks - streamed)
            if new.recomputing < best.recomputing:
                best = new
        if best is old:
            return None
        self.before, self.choice, self._most = old, best, best.resident
        return best

    def give_back(self) -> Choice:
        """The widened choice ran slower than the one before it: that one again, for good."""
        assert self.before is not None
        self.choice, self._most, self.before = self.before, self.before.resident, None
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
        if new.resident == old.resident and new.recompute_from >= old.recompute_from and (
                new.saving or 0) >= (old.saving or 0):  # holds no less: one block fewer
            new = self._choose(old.resident - 1)
        self.choice, self._most = new, new.resident
        return new

    def record(self, peak: Optional[int]) -> None:
        """A watched step peaked at ``peak`` (None: not measurable): the peak the report shows."""
        if peak is not None:
            self.measured_peak = peak

    def _choose(self, most: int) -> Choice:
        return choose(self._floor, self._costs, self.budget, self._freed, self._activations, most, self._saving)


class AutoResidency:
    """What ``VDNNStrategy`` runs between steps for ``resident_blocks="auto"``: measure the steps it watches
    (the first, and :data:`VERIFY_STEPS` after each switch), and say when the streamer should switch.

    Args:
        budget: bytes the step may peak at on the device (``planner.device_budget``).
        meter: the device's peak memory (:class:`PeakMeter`).
        activations: whether a resident block's saved activations stay on the device (no activation offload,
            or ``"conv"``), so that they count in its cost.
        grads_in_forward: whether the last step's gradients stay allocated through the next forward (Lightning
            frees them after ``training_step`` unless ``integrations/early_grad_free.py`` can free them as the batch starts).
        saving: whether streamed blocks may save their activations on the device (``saved_blocks`` left to
            the choice, no activation offload or the planner's).
        widen: whether to stream more blocks once the choice is verified, as far as the host hides their
            updates (:meth:`ResidencyPlanner.widen`): on a GPU, where the host works beside the device.
        clock: seconds, for the watched steps' wall time.
    """

    def __init__(self, budget: int, meter: PeakMeter, activations: bool, grads_in_forward: bool = True,
                 saving: bool = False, widen: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.planner = ResidencyPlanner(budget)
        self.meter = meter
        self.activations = activations
        self.grads_in_forward = grads_in_forward
        self.saving = saving
        self.widens = widen
        self.steps = WatchedSteps(meter, clock)
        self._times: list[float] = []  # wall times of the steps watched and timed since the last change
        self._timing = False  # whether the step being watched is timed
        self._extended = 0  # steps watched beyond the verifying ones, for want of timed ones
        self._host: list[float] = []  # host update seconds per streamed block in those steps
        self._before_seconds: Optional[float] = None  # the step time of the choice a widened one replaced

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
            saving = [b or 0 for b in streamer.saved_bytes] if self.saving else None
            choice = self.planner.profile(peak, block_costs(streamer, optimizers, self.grads_in_forward),
                                          slots_freed(streamer),
                                          block_activations(streamer, self.activations), saving)
        elif yield_to_activations:
            self.planner.record(peak)
            choice = None
        else:
            choice = self.planner.verify(peak)
        if choice is None and self.widens and self.planner.choice is not None:
            choice = self._timed(streamer)
        if choice is None or not differs(choice, streamer):
            return None
        self._times, self._host, self._extended = [], [], 0
        self.steps.after_change()
        return choice

    def _timed(self, streamer: LayerStreamer) -> Optional[Choice]:
        """Once a choice is verified: widen it, or give a widened one back if its steps ran slower (the fastest
        of :data:`TIMED_STEPS` timed steps of each; steps in which the activation planner profiled are not timed,
        and more steps are watched until enough are)."""
        host = streamer.stats().get("host_optimizer_ms")
        if self.steps.seconds is not None and self._timing:
            self._times.append(self.steps.seconds)
        if host and streamer.blocks:  # the mean: an update still running as a step ends counts in the next
            self._host.append(host / 1e3 / len(streamer.blocks))
        if not self.steps.verified:
            return None
        if len(self._times) < TIMED_STEPS:
            self._extended += 1
            if self._extended > 4 * TIMED_STEPS:  # the planner never settles: keep the choice as it is
                self.widens = False
            else:
                self.steps.extend()
            return None
        seconds, planner = min(self._times), self.planner
        if self._before_seconds is None and planner.before is None and self._host:
            choice = planner.widen(seconds, sum(self._host) / len(self._host))
            if choice is not None:
                self._before_seconds = seconds
            else:
                self.widens = False
            return choice
        self.widens = False  # once: widened and measured
        if self._before_seconds is not None and seconds > SLOWER * self._before_seconds:
            return planner.give_back()
        return None

    def watch(self, step: int, streamer: LayerStreamer, timed: bool = True) -> None:
        """After :meth:`between_steps` (and any switch): measure the step about to run, if it is one to watch;
        ``timed``: whether its wall time tells the choice's speed (not while the activation planner profiles)."""
        if self.steps.start(step):
            streamer.measure_saved = self.planner.choice is None
            self._timing = timed

    def stats(self) -> dict[str, Optional[int]]:
        """The report's residency fields (``MemoryReport``)."""
        choice = self.planner.choice
        return {"resident_budget_bytes": self.planner.budget,
                "resident_predicted_peak_bytes": choice.predicted_peak if choice else None,
                "resident_measured_peak_bytes": self.planner.measured_peak}


def differs(choice: Choice, streamer: LayerStreamer) -> bool:
    """Whether ``streamer`` runs something other than ``choice``."""
    return (choice.resident, choice.recompute_from) != (streamer.resident, streamer.recompute_from) or (
        choice.saving is not None and choice.saving != len(streamer.saving))


def switch(streamer: LayerStreamer, choice: Choice, optimizers: Sequence[Optimizer],
           build: Callable[[int, int], LayerStreamer]) -> LayerStreamer:
    """``streamer`` closed and rebuilt by ``build(resident, recompute_from)`` between two steps, exactly: queued
    host updates land, every parameter keeps its identity and value, gradients follow their parameters, and the
    optimizer state of the blocks now resident moves to the device (back to the host for those streamed
    again)."""
    resident = choice.resident
    if (resident, choice.recompute_from) == (streamer.resident, streamer.recompute_from):
        if choice.saving is not None:
            streamer.set_saving(choice.saving)
        return streamer  # at most which streamed blocks save changes: read at each forward
    eager = streamer.eager_updates
    streamer.close()
    streamer.blocks = []
    new = build(resident, choice.recompute_from)
    if choice.saving is not None:
        new.set_saving(choice.saving)
    new.set_eager(eager)
    new.attach_optimizers(optimizers)  # also moves the streamed blocks' state to the host
    on_device = [p for block in list(new.container)[:resident] for p in block.parameters()]
    for opt in optimizers:  # the modules outside the blocks keep their state where it is (offload_optimizer)
        state_to_device(opt, on_device, new.device)
    return new
