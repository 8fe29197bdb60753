"""``VDNNStrategy``: the Lightning glue. Mechanism lives in ``offload.py``; configuration in ``config.py``."""

from __future__ import annotations

from typing import Any, Optional, Union

import dataclasses

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from torch.optim import Optimizer

from lightning_vdnn.checkpoint import AtomicCheckpointIO
from lightning_vdnn.config import MemorySpec, Policy, VDNNConfig
from lightning_vdnn.layers import resolve_layers
from lightning_vdnn.offload import ActivationOffloader
from lightning_vdnn.planner import AutoPlanner, device_budget
from lightning_vdnn.report import MemoryReport
from lightning_vdnn.streaming import LayerStreamer

#: Names registered in Lightning's ``StrategyRegistry`` on ``import lightning_vdnn``.
REGISTERED = {
    "vdnn": ("vDNN activation offload, planned to fit the device ('auto')", {"activation_offload": "auto"}),
    "vdnn_all": ("vDNN: offload every saved activation to host memory", {"activation_offload": "all"}),
    "vdnn_conv": ("vDNN: offload the inputs of Conv/Linear/attention layers", {"activation_offload": "conv"}),
    "vdnn_none": ("vDNN hooks installed, nothing moved (overhead baseline)", {"activation_offload": "none"}),
    "l2l": ("L2L: block weights, grads and optimizer state in host memory, streamed one block ahead",
            {"layer_streaming": True, "activation_offload": "none"}),
}


class VDNNStrategy(SingleDeviceStrategy):
    """Train a model whose activations do not fit on the device, by keeping them in host memory.

    Activations that autograd saves for backward are copied to pinned host memory on a side stream while
    forward produces them and prefetched back one layer ahead of backward (vDNN, Rhu et al. 2016). The user's
    LightningModule is untouched: the hooks wrap its ``training_step``.

    Args:
        activation_offload: ``"all"``, ``"conv"``, ``"none"`` or ``"auto"`` (see :class:`VDNNConfig`).
        min_offload_bytes: saved tensors smaller than this stay on the device (default 1 MiB).
        prefetch_layers: layers brought back ahead of backward (default 1, as in vDNN).
        max_inflight_bytes: device memory that may wait for its copy to the host before compute waits for it.
        pin_memory: page-locked host buffers (default True; falls back to pageable with a warning).
        layers: dotted path from the LightningModule to its repeated blocks (``"model.blocks"``); blocks then
            are the layers prefetch counts in. ``None``: every leaf module is a layer.
        memory_budget: what ``"auto"`` fits the step into: bytes, ``"8GiB"``, ``"60%"``, or None (the device
            less a margin). A budget below the smallest reachable peak fails after the first step, stating it.
        layer_streaming: L2L (``streaming.py``): the blocks at ``layers`` (``None`` detects them) keep weights,
            grads and optimizer state in host memory; one block computes on the device while the next arrives.
        microbatches, zero_stage, offload_optimizer, offload_params: later
            milestones; a value that needs them raises ``NotImplementedError`` naming the missing feature.
        device: the device to train on; normally left to the Trainer's ``accelerator``/``devices``.

    Raises:
        ValueError, TypeError: at construction, for any argument out of range, naming the value.

    Example::

        import lightning_vdnn
        trainer = Trainer(strategy="vdnn_all", accelerator="gpu", devices=1, precision="bf16-mixed")
        trainer.fit(model)
        print(trainer.strategy.memory_report())
    """

    strategy_name = "vdnn"

    def __init__(
        self,
        activation_offload: Policy = "auto",
        *,
        min_offload_bytes: int = 2**20,
        prefetch_layers: int = 1,
        max_inflight_bytes: int = 2**28,
        pin_memory: bool = True,
        layer_streaming: bool = False,
        layers: Optional[str] = None,
        memory_budget: MemorySpec = None,
        microbatches: int = 1,
        zero_stage: int = 0,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        device: Union[str, torch.device, None] = None,
        accelerator: Any = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        config: Optional[VDNNConfig] = None,
    ) -> None:
        self.config = config or VDNNConfig(
            activation_offload=activation_offload, min_offload_bytes=min_offload_bytes,
            prefetch_layers=prefetch_layers, max_inflight_bytes=max_inflight_bytes, pin_memory=pin_memory,
            layer_streaming=layer_streaming,
            layers=layers, memory_budget=memory_budget, microbatches=microbatches, zero_stage=zero_stage,
            offload_optimizer=offload_optimizer, offload_params=offload_params,
        )
        super().__init__(device=device or "cpu", accelerator=accelerator, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        self._device_given = device is not None
        self._offloader: Optional[ActivationOffloader] = None
        self._planner: Optional[AutoPlanner] = None
        self._forward_peak: Optional[int] = None
        self._last_report: Optional[MemoryReport] = None
        self._streamer: Optional[LayerStreamer] = None

    @property
    def checkpoint_io(self) -> CheckpointIO:
        """Atomic local writes (temporary file, fsync, rename) unless the user plugged in their own."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Optional[CheckpointIO]) -> None:
        self._checkpoint_io = io

    # The accelerator connector fills ``parallel_devices`` from Trainer(accelerator=..., devices=...); a single
    # device strategy exposes it so that ``strategy="vdnn_all"`` follows the Trainer's device choice.
    @property
    def parallel_devices(self) -> Optional[list[torch.device]]:
        return [self._root_device] if self._device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[list[torch.device]]) -> None:
        if not devices:
            return
        if len(devices) > 1:
            raise ValueError(
                f"VDNNStrategy trains on one device, but the Trainer asked for {len(devices)} ({devices}). "
                "Use devices=1; several devices need DeepSpeed ZeRO (zero_stage), which is not built yet."
            )
        self._root_device = torch.device(devices[0])
        self._device_given = True

    # -- lifecycle ---------------------------------------------------------------------------------------
    def model_to_device(self) -> None:
        if not self.config.layer_streaming:
            return super().model_to_device()
        # L2L: the blocks' weights stay in host memory; everything else goes to the device
        precision = getattr(self.precision_plugin, "precision", "32-true")
        self._streamer = LayerStreamer(self.lightning_module, self.config.layers, self.root_device,
                                       precision=precision, pin_memory=self.config.pin_memory)

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        if self._streamer is not None and trainer.state.fn == "fit":
            self._streamer.attach_optimizers(self.optimizers)
        if trainer.state.fn == "fit":
            self._attach()

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        if self._streamer is not None:  # Lightning moved all state to the device; block state lives on the host
            for optimizer in self.optimizers:
                self._streamer.keep_state_on_host(optimizer)

    def _attach(self) -> None:
        module = self.lightning_module
        layers = resolve_layers(module, self.config.layers)[1] if self.config.layers else None
        layers = self._streamer.container if self._streamer is not None else layers
        cfg = self.config
        self._offloader = ActivationOffloader(
            self.root_device, policy=cfg.offload_policy, min_offload_bytes=cfg.min_offload_bytes,
            prefetch_layers=cfg.prefetch_layers, pin_memory=cfg.pin_memory,
            max_inflight_bytes=cfg.max_inflight_bytes,
        )
        self._offloader.attach(module, layers)
        if cfg.activation_offload == "auto":
            self._planner = AutoPlanner(device_budget(cfg.budget, self.root_device))

    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        if self._offloader is None:
            return super().training_step(*args, **kwargs)
        if self._planner is not None and self._planner.watching and self.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.root_device)
        with self._offloader.capture():
            return super().training_step(*args, **kwargs)

    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        if self._planner is not None and self._planner.watching and self.root_device.type == "cuda":
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
                f"{plan.predicted_peak / 2**30:.2f} GiB within a budget of {plan.budget / 2**30:.2f} GiB."
            )

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
        """Offload (and layer-streaming) statistics of the latest training step (empty before training)."""
        report = self._offload_report()
        return report if self._streamer is None else dataclasses.replace(report, **self._streamer.stats())

    def _offload_report(self) -> MemoryReport:
        if self._offloader is None:
            return self._last_report or MemoryReport(policy=self.config.offload_policy)
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

    def on_exception(self, exception: BaseException) -> None:
        self._release()
        super().on_exception(exception)

    def teardown(self) -> None:
        self._release()
        super().teardown()

    def _release(self) -> None:
        """Streams drained, hooks removed, host buffers freed: the strategy can run ``fit`` again."""
        if self._offloader is not None or self._streamer is not None:
            self._last_report = self.memory_report()
        if self._streamer is not None:
            self._streamer.close()
            self._streamer = None
        if self._offloader is not None:
            self._offloader.close()
            self._offloader = None
            self._planner = None

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, (description, kwargs) in REGISTERED.items():
            strategy_registry.register(name, cls, description=description, override=True, **kwargs)


def register() -> None:
    """Register the strategy names with Lightning (done on ``import lightning_vdnn``)."""
    VDNNStrategy.register_strategies(StrategyRegistry)
