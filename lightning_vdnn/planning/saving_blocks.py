"""``saved_blocks="auto"``: how many streamed blocks keep their activations on the device, chosen from the budget.

A streamed block that saves its activations skips its recompute in backward, about a third of its compute (gpt_1b
with 8 microbatches on an H200: 10 ms of a 1.47 s step per block), and holds what it saved from its
forward to its backward. With ``activation_offload="none"`` that stays on the device, so the choice is the most
blocks whose activations fit the memory the step leaves.

Model: the first step recomputes every streamed block, measures its device peak (``PeakMeter``; a CPU device has
none, and counts as 0) and what each block saves during its recompute (``streamer.saved_bytes``, the block's
whole batch). ``s`` saving blocks, spread evenly as ``saved_blocks=s`` places them, add their bytes::

    predicted(s) = measured + sum(saved_bytes[i] for i in spread(s))

which counts them all alive at the step's peak: safe, since the recompute peak it adds to is one of theirs. The
largest ``s`` within the budget. The next steps are measured; a peak over the budget is added to the floor and
the choice lowered, as ``planning/resident_blocks.py`` does for resident blocks. Switching costs nothing: which blocks save is
read at each forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from lightning_vdnn.planning.activation_solver import BudgetTooSmall
from lightning_vdnn.streaming.block_runs import spread
from lightning_vdnn.streaming.streamer import LayerStreamer
from lightning_vdnn.planning.watch import PeakMeter, WatchedSteps


@dataclass(frozen=True)
class SavedChoice:
    """How many streamed blocks save their activations, and the peak that predicts."""

    saved: int
    predicted_peak: int
    budget: int


def choose_saved(floor: int, saved_bytes: Sequence[int], budget: int, most: Optional[int] = None) -> SavedChoice:
    """The most streamed blocks (at most ``most``, default all), spread as ``saved_blocks`` spreads them, whose
    ``saved_bytes`` fit ``budget`` on top of ``floor``, the peak with every block recomputing.

    Raises:
        BudgetTooSmall: ``budget < floor``; the message states the minimum.
    """
    BudgetTooSmall.check(floor, budget, "with every streamed block recomputing",
                         "or make the step smaller (batch size, sequence length).")
    total = len(saved_bytes)
    best = SavedChoice(0, floor, budget)
    for count in range(1, (total if most is None else min(most, total)) + 1):
        peak = floor + sum(saved_bytes[i] for i in spread(count, total))
        if peak <= budget:
            best = SavedChoice(count, peak, budget)
    return best


class AutoSaving:
    """What ``VDNNStrategy`` runs between steps for ``saved_blocks="auto"``: measure the steps it watches (the
    first, and :data:`~lightning_vdnn.planning.watch.VERIFY_STEPS` after each change) and say when to change.

    Args:
        budget: bytes the step may peak at on the device (``planner.device_budget``).
        meter: the device's peak memory (:class:`~lightning_vdnn.planning.watch.PeakMeter`).
    """

    def __init__(self, budget: int, meter: PeakMeter) -> None:
        self.budget, self.meter = budget, meter
        self.choice: Optional[SavedChoice] = None
        self.measured_peak: Optional[int] = None
        self._floor = 0
        self._bytes: list[int] = []
        self.steps = WatchedSteps(meter)

    def between_steps(self, step: int, streamer: LayerStreamer) -> Optional[int]:
        """At the start of a batch, ``step`` optimizer steps done: the number of saving blocks to switch to
        now, or None.

        Raises:
            BudgetTooSmall: the step with every block recomputing peaked above the budget.
        """
        if not self.steps.ended(step):
            return None
        peak = self.meter.read()
        if peak is not None:
            self.measured_peak = peak
        old = self.choice
        if old is None:
            streamer.measure_saved = False
            self._floor, self._bytes = peak or 0, [b or 0 for b in streamer.saved_bytes]
            self.choice = choose_saved(self._floor, self._bytes, self.budget)
        elif peak is not None and peak > self.budget and old.saved:
            self._floor = min(self._floor + peak - old.predicted_peak, self.budget)
            self.choice = choose_saved(self._floor, self._bytes, self.budget, most=old.saved - 1)
        else:
            return None
        self.steps.after_change()
        return self.choice.saved

    def watch(self, step: int, streamer: LayerStreamer) -> None:
        """After :meth:`between_steps` (and any change): measure the step about to run, if it is one to watch."""
        if self.steps.start(step):
            streamer.measure_saved = self.choice is None

    def stats(self) -> dict[str, Optional[int]]:
        """The report's fields for the choice (``MemoryReport``)."""
        return {"saved_budget_bytes": self.budget,
                "saved_predicted_peak_bytes": self.choice.predicted_peak if self.choice else None,
                "saved_measured_peak_bytes": self.measured_peak}
