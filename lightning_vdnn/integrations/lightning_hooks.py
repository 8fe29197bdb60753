"""The Lightning hooks that run activation offload inside a strategy, shared by every strategy we ship.

``VDNNStrategy`` (one device) and ``VDNNZeroStrategy`` (DeepSpeed ZeRO) differ in how they place the model
and step the optimizer, not in how they offload: both wrap ``training_step`` in the offloader's
``capture()``, close the pass after backward, feed the ``"auto"`` planner after the optimizer step and
report (a table and a plot at the end of ``fit``, ``report/callbacks.py``). :class:`OffloadHooks` holds that once; it goes first in the
bases so its hooks wrap the strategy's. It overrides no ``backward``: the pass is closed in Lightning's
``post_backward`` hook. Under ``"auto"`` on one device, an out-of-memory error in forward or backward runs the batch
again under a lower budget (``planning/oom_retry.py``; backward from the Trainer's precision plugin, extended for it
in ``integrations/precision_plugins.py``), and plans may recompute layers in backward
(``offload/recompute.py``); not under DeepSpeed, whose ZeRO-3 gathers a layer's parameters in hooks a recompute would
skip, nor with layer streaming, which already recomputes its blocks.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any, Callable, Optional, TypeVar

import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_vdnn.buffers import running_stats
from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.integrations.adapters.lightning import LoggedResults, running_hook
from lightning_vdnn.integrations.precision_plugins import RetriedBackward, extended
from lightning_vdnn.streaming.host_state import optimizer_state_bytes
from lightning_vdnn.layers import offload_units
from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.planning.activation_plan import AutoPlanner, Later, Plan
from lightning_vdnn.planning.compiled_budget import CompiledBudget
from lightning_vdnn.planning.watch import PeakMeter
from lightning_vdnn.report.callbacks import MemorySummary
from lightning_vdnn.report.memory_report import MemoryReport, layer_ranges
from lightning_vdnn.planning.oom_retry import (LOWER_BY, MAX_RETRIES, Attempts, BudgetLowered, GradStash, StepSnapshot,
                                  cuda_allocated, lowered_message)
from lightning_vdnn.units import UNBOUNDED, format_bytes

T = TypeVar("T")


class OffloadHooks:
    """Mixin for a Lightning ``Strategy``: vDNN activation offload around its training step.

    The strategy provides ``vdnn_config`` (a :class:`VDNNConfig`), ``root_device`` and ``lightning_module``,
    and calls :meth:`_attach` once the model sits where it computes (``setup`` of a fit).
    """

    vdnn_config: VDNNConfig
    _offloader: Optional[ActivationOffloader] = None
    _planner: Optional[AutoPlanner] = None
    _compiled_budget: Optional[CompiledBudget] = None
    _forward_peak: Optional[int] = None
    _backward_peak: Optional[int] = None
    _state_before: Optional[int] = None  # optimizer state on the device when the profiling step began
    _last_report: Optional[MemoryReport] = None
    _retry_oom = False  # strategies that may run a batch again after an OOM set it (not DeepSpeed: collectives)
    _recompute = False  # strategies whose "auto" plans may recompute layers set it (not DeepSpeed: ZeRO-3 hooks)
    _attempts: Optional[Attempts] = None
    _closure_loss: Optional[Tensor] = None  # the loss the running backward started from, while it may be retried
    _user_precision: Optional[Precision] = None  # the Trainer's plugin while fit runs backward through ours
    _norm_stats: Optional[list[Tensor]] = None
    #: what measures a watched step's peak for the ``"auto"`` planner on a CPU device; None: the saved bytes it
    #: keeps in place (the host is the device). Tests plug in a count of the layers' working set.
    activation_meter: Optional[PeakMeter] = None

    # -- set up and tear down ----------------------------------------------------------------------------
    def _offload_layers(self) -> Optional[nn.Module]:
        """The layers offload prefetches by and the planner decides by (``layers.offload_units``)."""
        cfg = self.vdnn_config
        return offload_units(self.lightning_module, cfg.layers,
                             cfg.activation_offload == "auto" and self._plans_recompute())

    def _plans_recompute(self) -> bool:
        return self._recompute and getattr(self, "_streamer", None) is None

    def _attach(self) -> None:
        cfg = self.vdnn_config
        self._offloader = ActivationOffloader(
            self.root_device, policy=cfg.offload_policy, min_offload_bytes=cfg.min_offload_bytes,
            prefetch_layers=cfg.prefetch_layers, pin_memory=cfg.pin_memory,
            max_inflight_bytes=cfg.max_inflight_bytes, watch_ops=cfg.selective_recompute,
            watch_pointwise=cfg.lean_activations,
        )
        self._offloader.attach(self.lightning_module, self._offload_layers())
        self._attempts, self._norm_stats = None, None
        self._compiled_budget = CompiledBudget(cfg.compiled_activation_budget)
        self._compiled_budget.start()
        if cfg.activation_offload == "auto":
            self._planner = AutoPlanner.for_device(cfg.budget, self.root_device, recompute=self._plans_recompute(),
                                                   selective=cfg.selective_recompute, lean=cfg.lean_activations)
        if self._retries_oom() and self._user_precision is None:  # a failed backward runs again from the plugin's
            self._user_precision = self.precision_plugin
            self.precision_plugin = extended(self._user_precision, RetriedBackward, retry=self._retry_backward)

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._release()
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        self._release()
        super().teardown()

    def _release(self) -> None:
        """Streams drained, hooks removed, host buffers freed: the strategy can run ``fit`` again."""
        if self._offloader is not None:
            self._last_report = self.memory_report()
        self._close_offloader()

    def _close_offloader(self) -> None:
        if self._user_precision is not None:
            self.precision_plugin, self._user_precision = self._user_precision, None
        if self._compiled_budget is not None:
            self._compiled_budget.stop()
        if self._offloader is not None:
            self._offloader.close()
            self._offloader, self._planner = None, None

    # -- the step ----------------------------------------------------------------------------------------
    def _watching_cuda(self) -> bool:
        return self._planner is not None and self._planner.watching and self.root_device.type == "cuda"

    def _retries_oom(self) -> bool:
        """OOM retry: ``"auto"``, automatic optimization, no layer streaming, and a strategy that allows it."""
        return (self._retry_oom and self._planner is not None and self.lightning_module.automatic_optimization
                and getattr(self, "_streamer", None) is None)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        if self._offloader is None:
            return super().training_step(*args, **kwargs)
        # time layers and sample memory only in the steps the planner measures (a fixed policy: the first)
        self._offloader.watch = self._planner.watching if self._planner is not None else self._offloader.passes == 0
        if not self._retries_oom():
            self._attempts = None
            return self._forward(*args, **kwargs)
        if self._norm_stats is None:
            self._norm_stats = running_stats(self.lightning_module)
        snapshot = StepSnapshot(self._norm_stats, self.root_device, LoggedResults(self.lightning_module.trainer))
        self._attempts = Attempts(args, kwargs, snapshot, self._planner.budget)
        return self._with_retries(lambda: self._forward(*args, **kwargs))

    def _forward(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        if self.activation_meter is not None and self._planner is not None and self._planner.watching:
            self.activation_meter.reset()
        if self._watching_cuda():
            torch.cuda.reset_peak_memory_stats(self.root_device)
            if self._planner.profiling and self._state_before is None:
                self._state_before = optimizer_state_bytes(self.optimizers, device=self.root_device)
        with self._offloader.capture():
            return super().training_step(*args, **kwargs)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        if self._watching_cuda():
            self._forward_peak = torch.cuda.max_memory_allocated(self.root_device)
        # the loss autograd runs from: an OOM retry detaches it (it holds the failed graph) before running again
        self._closure_loss = closure_loss if self._attempts is not None else None

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        if self._watching_cuda():
            self._backward_peak = torch.cuda.max_memory_allocated(self.root_device)
        if self._offloader is not None:
            self._offloader.finish_pass()
        super().post_backward(closure_loss)

    def _retry_backward(self, loss: Tensor, backward: Callable[[Tensor], None], plugin: Precision) -> bool:
        """The precision plugin's ``backward(loss)`` (``precision_plugins.RetriedBackward``), with this attempt's
        gradients kept apart until autograd has finished: merged into the accumulated ones (as plain training
        has them), or dropped. After an OOM: re-plan, run ``training_step`` again, then backward on its loss.
        Returns False when the re-run ``training_step`` skipped the batch."""
        if self._attempts is None:
            backward(loss)
            return True
        module = self.lightning_module
        while True:
            stash = GradStash(module.parameters())
            try:
                backward(loss)
            except torch.OutOfMemoryError as err:
                stash.drop()
                failure, at = str(err), cuda_allocated(self.root_device)
            except BaseException:
                stash.drop()
                raise
            else:
                stash.merge()
                self._attempts = self._closure_loss = None
                return True
            for held in (self._closure_loss, loss):  # what the failed graph hangs from, here and in Lightning's loop
                if held is not None:
                    held.detach_()
            loss = self._closure_loss = None
            self._recover(failure, at)
            out = self._rerun_training_step()
            closure_loss = ClosureResult.from_training_step_output(out, module.trainer.accumulate_grad_batches
                                                                   ).closure_loss
            if closure_loss is None:  # training_step skipped the batch this time: nothing to run backward on
                self._attempts = None
                return False
            self.pre_backward(closure_loss)
            loss = plugin.pre_backward(closure_loss, module)

    def _rerun_training_step(self) -> STEP_OUTPUT:
        """The failed batch's ``training_step`` again, from inside ``backward``: under its own hook name, so
        that what it logs lands where the first attempt's did (which ``_recover`` took back out)."""
        attempts, module = self._attempts, self.lightning_module
        with running_hook(module, "training_step"):
            return self._with_retries(lambda: self._forward(*attempts.args, **attempts.kwargs))

    def _with_retries(self, attempt: Callable[[], T]) -> T:
        while True:
            try:
                return attempt()
            except torch.OutOfMemoryError as err:
                failure, at = str(err), cuda_allocated(self.root_device)
            # the exception (and its traceback, which holds the failed forward's tensors) is gone here
            self._recover(failure, at)

    def _recover(self, failure: str, allocated: Optional[int]) -> None:
        """After an OOM: forget the failed pass, free memory, lower the budget (or give up), restore the step's
        state so the same batch runs again as if for the first time."""
        attempts, planner, offloader = self._attempts, self._planner, self._offloader
        offloader.abort_pass()
        gc.collect()
        if self.root_device.type == "cuda":
            torch.cuda.empty_cache()
        step = self.lightning_module.trainer.global_step
        if planner.plan is None:
            raise attempts.give_up(step, failure, "in the step that profiles the model, with every activation "
                                   "offloaded: no plan to lower") from None
        if attempts.retries >= MAX_RETRIES:
            raise attempts.give_up(step, failure, f"{MAX_RETRIES} lower budgets tried") from None
        old_budget, kept_before = planner.budget, planner.plan.kept_bytes
        plan = planner.lower(allocated, LOWER_BY[attempts.retries])
        if plan is None:
            raise attempts.give_up(step, failure, "the plan already kept every activation off the device") from None
        attempts.budgets.append(planner.budget)
        planner.apply_to(offloader)
        rank_zero_warn(lowered_message(old_budget, planner.budget, kept_before, plan.kept_bytes, step),
                       category=BudgetLowered)
        attempts.snapshot.restore()

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model=model, **kwargs)
        if self._planner is not None and self._offloader is not None:
            self._update_plan()
        return out

    def _update_plan(self) -> None:
        """Feed the planner the step just finished and apply a new plan, if any, to the next step."""
        planner, offloader = self._planner, self._offloader
        peak = None
        if planner.watching:
            cuda = self.root_device.type == "cuda"
            meter = self.activation_meter
            peak = (torch.cuda.max_memory_allocated(self.root_device) if cuda else meter.read() if meter is not None
                    else offloader.report().kept_bytes)
        later = None
        if planner.profiling and peak is not None and self._state_before is not None:
            state = optimizer_state_bytes(self.optimizers, device=self.root_device) - self._state_before
            held = 0 if self._frees_grads_early() else grad_bytes(self.lightning_module, self.root_device)
            later = Later(state=state, grads=held,
                          backward_peak=self._backward_peak)
            self._state_before = None
        old, replans = planner.plan, planner.replans
        plan = self._observe(planner, peak, later)
        made = planner.plan
        if self._compiled_budget.after_observe(planner, plan, offloader.layer_modules()):
            rank_zero_info(recompiled_message(made, self._compiled_budget.applied))
            plan = None
        planner.apply_to(offloader)
        if plan is not None:
            over = old is not None and planner.replans > replans
            rank_zero_info(plan_message(plan, (peak, old.predicted_peak) if over else None))

    def _observe(self, planner: AutoPlanner, peak: Optional[int], later: Optional[Later]) -> Optional[Plan]:
        """The planner fed the step just finished (``VDNNStrategy`` adds batch chunks where the budget needs them)."""
        return planner.observe(self._offloader.layer_profile(), peak, self._forward_peak, later)

    def _frees_grads_early(self) -> bool:
        """Whether the last step's gradients are freed as the next batch starts (``integrations/early_grad_free.py``), not held through
        its forward."""
        return False

    # -- the end of fit -----------------------------------------------------------------------------------
    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        trainer = self.lightning_module.trainer
        if self._offloader is not None and self._shows_report(trainer):
            MemorySummary().on_train_end(trainer, self.lightning_module)

    def _shows_report(self, trainer: Any) -> bool:
        """Whether the strategy prints the report itself: not when the Trainer has a ``MemorySummary`` (it has
        printed it); else ``fit_report``, or when that is None, whether the Trainer summarizes the model
        (``enable_model_summary``): the summary at the start of ``fit`` and this report at its end are the same
        kind of output."""
        if any(isinstance(cb, MemorySummary) for cb in trainer.callbacks):
            return False
        wanted = self.vdnn_config.fit_report
        return wanted if wanted is not None else any(isinstance(cb, ModelSummary) for cb in trainer.callbacks)

    # -- numbers -----------------------------------------------------------------------------------------
    @property
    def planning(self) -> bool:
        """Whether the next training step is one the ``"auto"`` planner measures: its profiling step(s), or one of
        the steps that check a new plan's peak. These are slower than the steps that follow (their layers are
        timed, their memory sampled); a timer of steady-state speed leaves them out."""
        return self._planner is not None and self._offloader is not None and self._planner.watching

    def step_metrics(self) -> dict[str, float]:
        """The latest training step's offload numbers (``MemoryReport.metrics()``), which
        :class:`~lightning_vdnn.MemoryMonitor` logs; empty outside ``fit``."""
        return self._offloader.report().metrics() if self._offloader is not None else {}

    def memory_report(self) -> MemoryReport:
        """Offload statistics of the latest training step on this rank (empty before training)."""
        return self._offload_report()

    def _offload_report(self) -> MemoryReport:
        if self._offloader is None:
            return self._last_report or MemoryReport(policy=self.vdnn_config.offload_policy)
        report = self._offloader.report()
        planner = self._planner
        if planner is None:
            return report
        return dataclasses.replace(report, **planner.report_fields(len(self._offloader.layer_bytes())),
                                   compiled_activation_budget=self._compiled_budget.applied)


def plan_message(plan: Plan, overshot: Optional[tuple[int, int]] = None) -> str:
    """The line logged when ``"auto"`` makes a plan; ``overshot``: the measured and predicted peaks of the plan
    whose step went over the budget, which this one replaces."""
    again = "" if overshot is None else (
        f" (re-planned: the last plan's step peaked at {format_bytes(overshot[0])}, predicted "
        f"{format_bytes(overshot[1])})")
    return (
        f"lightning_vdnn auto plan{again}: {len(plan.kept)} layers stay on the device"
        f"{f' ({len(plan.lean)} lean: activation outputs made again in backward)' if plan.lean else ''}, "
        f"{len(plan.recomputed)} are "
        f"recomputed in backward ({len(plan.selective)} selectively), {format_bytes(plan.offloaded_bytes)} of "
        f"activations go to the host per step{_from_layers(plan)} "
        f"(predicted to add {plan.added_ms:.1f} ms); predicted peak {format_bytes(plan.predicted_peak)} " + (
            "(no budget: a CPU run)." if plan.budget >= UNBOUNDED else
            f"within a budget of {format_bytes(plan.budget)}.")
    )


def recompiled_message(plan: Plan, budget: float) -> str:
    """The line logged when a plan's compiled layers are compiled again under another partitioner budget."""
    return (f"lightning_vdnn auto plan: {len(plan.recomputed)} layers recomputed, {len(plan.kept)} kept; compiling "
            f"the compiled layers again with torch's partitioner memory budget at {budget:.2f} (what they save for "
            "backward, the cheap ops recomputed inside the compiled backward) and planning again from the next steps.")


def _from_layers(plan: Plan) -> str:
    """Which layers the plan offloads and how much of their copies is predicted to hide."""
    if not plan.offloaded:
        return ""
    return (f" from layers {layer_ranges(plan.offloaded)} (copies {plan.copy_ms:.1f} ms: {plan.hidden_copy_ms:.1f} "
            f"hidden, {plan.exposed_copy_ms:.1f} exposed)")


def grad_bytes(module: nn.Module, device: torch.device) -> int:
    """Bytes of gradients on ``device``: held into the next forward, cleared only after ``training_step``."""
    return sum(p.grad.nbytes for p in module.parameters() if p.grad is not None and p.grad.device == device)
