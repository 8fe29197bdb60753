"""The Lightning hooks that run activation offload inside a strategy, shared by every strategy we ship.

``VDNNStrategy`` (one device) and ``VDNNZeroStrategy`` (DeepSpeed ZeRO) differ in how they place the model
and step the optimizer, not in how they offload: both wrap ``training_step`` in the offloader's
``capture()``, close the pass after backward, feed the ``"auto"`` planner after the optimizer step and
report. :class:`OffloadHooks` holds that once; it goes first in the bases so its hooks wrap the strategy's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.layers import resolve_layers
from lightning_vdnn.offload import ActivationOffloader
from lightning_vdnn.planner import UNBOUNDED, AutoPlanner, device_budget
from lightning_vdnn.report import MemoryReport


class OffloadHooks:
    """Mixin for a Lightning ``Strategy``: vDNN activation offload around its training step.

    The strategy provides ``vdnn_config`` (a :class:`VDNNConfig`), ``root_device`` and ``lightning_module``,
    and calls :meth:`_attach` once the model sits where it computes (``setup`` of a fit).
    """

    vdnn_config: VDNNConfig
    _offloader: Optional[ActivationOffloader] = None
    _planner: Optional[AutoPlanner] = None
    _forward_peak: Optional[int] = None
    _last_report: Optional[MemoryReport] = None

    # -- set up and tear down ----------------------------------------------------------------------------
    def _offload_layers(self) -> Optional[nn.Module]:
        """The blocks prefetch counts in: ``vdnn_config.layers`` resolved, or None (every leaf module)."""
        path = self.vdnn_config.layers
        return resolve_layers(self.lightning_module, path)[1] if path else None

    def _attach(self) -> None:
        cfg = self.vdnn_config
        self._offloader = ActivationOffloader(
            self.root_device, policy=cfg.offload_policy, min_offload_bytes=cfg.min_offload_bytes,
            prefetch_layers=cfg.prefetch_layers, pin_memory=cfg.pin_memory,
            max_inflight_bytes=cfg.max_inflight_bytes,
        )
        self._offloader.attach(self.lightning_module, self._offload_layers())
        if cfg.activation_offload == "auto":
            self._planner = AutoPlanner(device_budget(cfg.budget, self.root_device))

    def on_exception(self, exception: BaseException) -> None:
        self._release()
        super().on_exception(exception)

    def teardown(self) -> None:
        self._release()
        super().teardown()

    def _release(self) -> None:
        """Streams drained, hooks removed, host buffers freed: the strategy can run ``fit`` again."""
        if self._offloader is not None:
            self._last_report = self.memory_report()
            self._offloader.close()
            self._offloader = None
            self._planner = None

    # -- the step ----------------------------------------------------------------------------------------
    def _watching_cuda(self) -> bool:
        return self._planner is not None and self._planner.watching and self.root_device.type == "cuda"

    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        if self._offloader is None:
            return super().training_step(*args, **kwargs)
        if self._watching_cuda():
            torch.cuda.reset_peak_memory_stats(self.root_device)
        with self._offloader.capture():
            return super().training_step(*args, **kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        if self._watching_cuda():
            self._forward_peak = torch.cuda.max_memory_allocated(self.root_device)
        try:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        finally:
            if self._offloader is not None:
                self._offloader.finish_pass()

    def optimizer_step(self, optimizer: Optimizer, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._planner is not None and self._offloader is not None:
            self._update_plan()
        self._log_report()
        return out

    def _update_plan(self) -> None:
        """Feed the planner the step just finished and apply a new plan, if any, to the next step."""
        planner, offloader = self._planner, self._offloader
        peak = None
        if planner.watching:
            cuda = self.root_device.type == "cuda"
            peak = torch.cuda.max_memory_allocated(self.root_device) if cuda else offloader.report().kept_bytes
        plan = planner.observe(offloader.layer_bytes(), peak, self._forward_peak)
        offloader.keep_layers = planner.keep
        if plan is not None:
            rank_zero_info(
                f"lightning_vdnn auto plan: {len(plan.kept)} layers stay on the device, "
                f"{plan.offloaded_bytes / 2**30:.2f} GiB of activations go to the host per step; predicted peak "
                f"{plan.predicted_peak / 2**30:.2f} GiB " + (
                    "(no budget: a CPU run)." if plan.budget >= UNBOUNDED else
                    f"within a budget of {plan.budget / 2**30:.2f} GiB.")
            )

    # -- numbers -----------------------------------------------------------------------------------------
    def _log_report(self) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self._offloader is None or trainer is None or not trainer.loggers:
            return
        step = trainer.global_step
        if step % max(trainer.log_every_n_steps, 1) == 0:
            metrics = self._offloader.report().metrics()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

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
        plan = planner.plan
        layers = len(self._offloader.layer_bytes())
        return dataclasses.replace(
            report, policy="auto", budget_bytes=planner.budget, measured_peak_bytes=planner.measured_peak,
            predicted_peak_bytes=plan.predicted_peak if plan else None,
            layers_kept=len(plan.kept) if plan else 0, layers_offloaded=layers - len(plan.kept) if plan else layers,
        )
