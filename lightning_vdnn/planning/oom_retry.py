"""Out of memory in ``"auto"`` mode: lower the budget, re-plan, and run the same batch again.

A CUDA out-of-memory error in a step that ran a plan says the plan kept more on the device than the device
had room for (a prediction that erred, fragmentation, another process). The strategy
(``integrations/lightning_hooks.py``) catches it around forward and backward (backward from the precision
plugin, ``integrations/precision_plugins.py``), has the planner lower its budget (``AutoPlanner.lower``), and
runs the batch again, after putting back what the failed attempt changed:

- the RNG state, so dropout draws the same masks as the attempt that failed (and as plain training);
- the running statistics of normalization layers (BatchNorm updates them in forward);
- the gradients. Backward accumulates into fresh ``.grad`` tensors (:class:`GradStash`), added to those of the
  previous micro-batches only once autograd has finished, with the very in-place add autograd itself uses, so
  a backward that fails half-way leaves the accumulated gradients as they were and a successful one leaves
  them bit for bit as plain training would. The cost: with gradient accumulation, the micro-batches after the
  first hold a second set of gradients until their backward ends (the first, after ``zero_grad`` sets
  gradients to None, and a run without accumulation hold nothing extra). The planner measures it like any
  other memory.

- what ``self.log`` accumulated (Lightning's result collection: the strategy hands in
  ``integrations/adapters/lightning.LoggedResults``), so a batch that runs again is logged once, as plain
  training logs it.

Not put back: other state a user's ``training_step`` changes (its own counters, a torchmetrics ``Metric`` it
updates itself). Retries are off under manual optimization (the step may already have stepped an
optimizer), layer streaming (blocks update during backward) and DeepSpeed (ranks meet in collectives).
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol

import torch
from torch import Tensor, nn

from lightning_vdnn.units import format_bytes
from lightning_vdnn.rng import RngState

#: Share of the failing plan's kept bytes that each retry of one batch gives up: a quarter first (the
#: device said no to the predicted peak, perhaps narrowly: most of the plan's benefit is kept), then half,
#: then all of it: the third retry runs what the profiling step ran, with everything offloaded, which fit.
LOWER_BY = (0.25, 0.5, 1.0)
#: Budget lowerings tried for one batch before giving up.
MAX_RETRIES = len(LOWER_BY)


class StepOutOfMemory(torch.OutOfMemoryError):
    """Out of memory in ``"auto"`` mode with no lower plan left to try, or ``MAX_RETRIES`` times on one batch.
    A ``torch.OutOfMemoryError``, so handlers written for that one still catch it."""


class BudgetLowered(UserWarning):
    """The ``"auto"`` planner lowered ``memory_budget`` after an out-of-memory error (one per lowering)."""


class Restorable(Protocol):
    def restore(self) -> None: ...


class StepSnapshot:
    """What a training step's forward changes besides autograd's graph, taken before its first attempt and put
    back before each retry: the CPU (and device) RNG state, the running statistics of norm layers and, given
    as ``logged``, a snapshot of what ``self.log`` accumulated (anything with ``restore()``; None: nothing)."""

    def __init__(self, stats: list[Tensor], device: torch.device, logged: Optional[Restorable] = None) -> None:
        self.rng = RngState(device)
        self.stats = [(t, t.clone()) for t in stats]
        self.logged = logged

    def restore(self) -> None:
        self.rng.restore()
        with torch.no_grad():
            for t, saved in self.stats:
                t.copy_(saved)
        if self.logged is not None:
            self.logged.restore()


class GradStash:
    """Sets ``.grad`` aside so that one backward accumulates into fresh tensors; :meth:`merge` adds the set-aside
    gradients back (``prev += new``, autograd's own accumulation), :meth:`drop` forgets a failed backward's."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.saved = [(p, p.grad) for p in params if p.requires_grad]
        for p, _ in self.saved:
            p.grad = None

    def merge(self) -> None:
        for p, prev in self.saved:
            if prev is None:
                continue
            if p.grad is not None:
                prev.add_(p.grad)
            p.grad = prev
        self.saved = []

    def drop(self) -> None:
        for p, prev in self.saved:
            p.grad = prev
        self.saved = []


class Attempts:
    """One batch's attempts: its arguments (backward may need to run forward again), the snapshot to restore,
    and the budgets tried."""

    def __init__(self, args: tuple, kwargs: dict, snapshot: StepSnapshot, budget: int) -> None:
        self.args, self.kwargs, self.snapshot = args, kwargs, snapshot
        self.budgets = [budget]

    @property
    def retries(self) -> int:
        return len(self.budgets) - 1

    def give_up(self, step: int, failure: str, reason: str) -> StepOutOfMemory:
        tried = ", ".join(format_bytes(b) for b in self.budgets)
        return StepOutOfMemory(
            f"Out of memory in training step {step} with activation_offload='auto' ({reason}); memory_budget "
            f"tried on this batch: {tried}. Set memory_budget below {format_bytes(self.budgets[-1])}, or make the "
            f"step smaller (batch size, sequence length); layer_streaming=True also moves the weights to the "
            f"host. The last error: {_first_line(failure)}"
        )


def lowered_message(old: int, new: int, kept_before: int, kept_after: int, step: int) -> str:
    return (
        f"lightning_vdnn auto: out of memory in training step {step}; memory_budget lowered from "
        f"{format_bytes(old)} to {format_bytes(new)} ({new} bytes), activations kept on the device from "
        f"{format_bytes(kept_before)} to {format_bytes(kept_after)}; the same batch runs again. Set "
        f"memory_budget={format_bytes(new).replace(' ', '')!r} to start there next time."
    )


def _first_line(text: str) -> str:
    return next(iter(text.strip().splitlines()), "") or "(no message)"


def cuda_allocated(device: torch.device) -> Optional[int]:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None

