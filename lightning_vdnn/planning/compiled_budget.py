"""Compiled blocks that shed their own activations: torch's partitioner budget instead of whole-block recompute.

A block compiled by itself (``block.compile()``) saves for backward what AOTAutograd's min-cut partitioner chooses.
Under a memory budget below 1 (``torch._functorch.config.activation_memory_budget``, ``adapters/torch.py``) the
partitioner saves less and recomputes the ops that made the rest inside the compiled backward, cheapest first
(the elementwise ops and norms, which inductor fuses into kernels backward runs anyway). Bytes shed that way cost
less than recomputing the block whole, matrix multiplies included, which is what a plan's ``recompute`` does
(measured in ``benchmarks/README.md``).

``compiled_activation_budget="auto"`` (``VDNNConfig``): the ``"auto"`` planner plans from its first profile as
usual; where that plan recomputes compiled layers whole, the bytes those recomputes shed, less the room the plan
leaves under its budget, set torch's budget (:func:`next_budget`), the compiled code is dropped
(``torch.compiler.reset()``: every compiled function compiles again on its next call, the user's others too), and
the planner profiles again: the compiled blocks save less, and the new plan recomputes fewer of them, or none.
What the partitioner saves is not proportional to its budget (it solves a knapsack over the graph's ops), and the
planner's predicted peak errs high, so once the new plan has run its checked steps, its measured peak and the
bytes the blocks saved under the first budget set it once more: :data:`MAX_COMPILES`. A number: torch's budget for the
whole fit, from its first step. ``None``: torch's setting is left alone. The setting found is put back at the end.

Numerics: a value the partitioner recomputes is computed by the compiled backward's own kernel, which may keep it
in float32 where the saved one was rounded to the compute dtype, so gradients can differ from compiled plain
training's in the last bits (as with any recompute inside a compiled graph). Eager modules are not affected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from lightning_vdnn.compiled import is_compiled
from lightning_vdnn.config import CompiledBudgetSpec
from lightning_vdnn.integrations.adapters.torch import partitioner_budget, set_partitioner_budget
from lightning_vdnn.offload.trace import LayerProfile
from lightning_vdnn.planning.activation_solver import Plan
from lightning_vdnn.units import UNBOUNDED

if TYPE_CHECKING:
    from lightning_vdnn.planning.activation_plan import AutoPlanner

#: The lowest budget ``"auto"`` sets. Below it the partitioner starts recomputing matrix multiplies, which sheds
#: bytes no cheaper than a whole-block recompute; the planner's own recomputes do the rest.
LEAST = 0.5
#: Times ``"auto"`` compiles the blocks again in a fit: a first budget from the first plan, and one from what the
#: blocks saved under it (the partitioner's bytes are not proportional to its budget).
MAX_COMPILES = 2
#: A budget this near the one in force is not worth compiling again for.
CLOSE = 0.05


def compiled_saved(layers: Sequence[LayerProfile], compiled: Sequence[bool]) -> int:
    """What the compiled layers save for backward, in all."""
    if len(compiled) != len(layers):
        raise ValueError(f"{len(compiled)} compiled flags for {len(layers)} layers: give one per layer.")
    return sum(p.saved_bytes for p, c in zip(layers, compiled) if c)


def compiled_target(plan: Plan, layers: Sequence[LayerProfile], compiled: Sequence[bool],
                    peak: Optional[int] = None) -> int:
    """What the compiled layers may save for ``plan`` to need no whole recompute of them: what they save, less what
    its whole recomputes of them shed, plus the room it leaves under its budget (none without a budget) at ``peak``,
    its measured peak, else its predicted one."""
    shed = sum(p.saved_bytes - (p.recompute_bytes or 0) for g, (p, c) in enumerate(zip(layers, compiled))
               if c and g in plan.recomputed and g not in plan.selective)
    at = plan.predicted_peak if peak is None else peak
    room = max(0, plan.budget - at) if plan.budget < UNBOUNDED else 0
    return compiled_saved(layers, compiled) - shed + room


def next_budget(seen: Sequence[tuple[float, int]], target: int) -> float:
    """torch's budget under which the compiled layers would save ``target`` bytes, read off the line through the
    last two ``(budget, bytes saved)`` seen (through ``(0, 0)`` after the first), within ``[LEAST, 1]``."""
    if not seen:
        raise ValueError("no (budget, bytes saved) seen yet: profile the compiled layers first.")
    b1, s1 = seen[-1]
    b0, s0 = seen[-2] if len(seen) > 1 else (0.0, 0)
    budget = b1 if s0 == s1 else b1 + (target - s1) * (b0 - b1) / (s0 - s1)
    return min(1.0, max(LEAST, budget))


class CompiledBudget:
    """torch's partitioner budget over one fit: set at :meth:`start`, adjusted from plans at most
    :data:`MAX_COMPILES` times (:meth:`adjust_for`), the value found put back at :meth:`stop`.

    Args:
        setting: ``VDNNConfig.compiled_activation_budget``: ``"auto"``, a budget in ``[0, 1]``, or None.
    """

    def __init__(self, setting: CompiledBudgetSpec) -> None:
        self.setting = setting
        self.applied: Optional[float] = None  # the budget this fit set; None: torch's own
        self.compiles = 0  # times "auto" compiled the blocks again
        self._found: Optional[float] = None
        self._seen: list[tuple[float, int]] = []  # (torch's budget, bytes the compiled layers saved under it)

    def start(self) -> None:
        self._found, self._seen, self.compiles = partitioner_budget(), [], 0
        if isinstance(self.setting, (int, float)):
            self._apply(float(self.setting))

    def adjust_for(self, plan: Optional[Plan], layers: Sequence[LayerProfile], compiled: Sequence[bool],
                   peak: Optional[int] = None) -> bool:
        """Under ``"auto"``: the budget at which the compiled layers would save what ``plan`` can hold of them
        (:func:`compiled_target`, at ``peak``, the plan's measured peak, where it has run) set and the compiled code
        dropped, so that they compile again under it; not where the first plan recomputes none of them, nor for a
        change under :data:`CLOSE`. Returns whether it did: the caller profiles again."""
        if self.setting != "auto" or plan is None or not any(compiled) or self.compiles >= MAX_COMPILES:
            return False
        now, saved = partitioner_budget(), compiled_saved(layers, compiled)
        target = compiled_target(plan, layers, compiled, peak)
        if not self._seen and target >= saved:
            return False
        if self._seen and self._seen[-1][0] == now:  # the same budget seen again: its latest bytes
            self._seen.pop()
        self._seen.append((now, saved))
        budget = next_budget(self._seen, target)
        if abs(budget - now) < CLOSE:
            return False
        self.compiles += 1
        self._apply(budget)
        torch.compiler.reset()
        return True

    def after_observe(self, planner: "AutoPlanner", plan: Optional[Plan],
                      modules: Sequence[Optional[nn.Module]]) -> bool:
        """:meth:`adjust_for` where ``planner`` just made ``plan`` (its predicted peak) or just finished checking its
        plan (its measured peak), ``modules`` the last pass's layers; where it compiles again, the planner profiles
        again. Returns whether it did."""
        checked = plan is None and planner.just_checked
        if plan is None and not checked:
            return False
        if not self.adjust_for(planner.plan, planner.planned_from()["layers"], compiled_flags(modules),
                               planner.measured_peak if checked else None):
            return False
        planner.profile_again()
        return True

    def stop(self) -> None:
        """Put back the budget :meth:`start` found (graphs compiled meanwhile keep theirs)."""
        if self._found is not None and self.applied is not None:
            set_partitioner_budget(self._found)
        self._found = None

    def _apply(self, budget: float) -> None:
        set_partitioner_budget(budget)
        self.applied = budget


def compiled_flags(modules: Sequence[Optional[nn.Module]]) -> list[bool]:
    """Per layer (``ActivationOffloader.layer_modules``): whether its module runs a compiled call."""
    return [m is not None and is_compiled(m) for m in modules]
