"""``VDNNFabricStrategy``: vDNN activation offload and L2L layer streaming for Lightning Fabric loops,
registered under the same names.

Fabric calls a model through ``_FabricModule(strategy.setup_module(module))``; the strategy returns the
module wrapped so that its forward runs under the offloader's capture (as DDP returns a wrapper), and its
``backward`` closes the pass after ``fabric.backward(loss)``. With layer streaming, ``setup_module`` hands the
blocks to a :class:`~lightning_vdnn.streaming.streamer.LayerStreamer` instead of moving them to the device, and
``setup_optimizer`` lets it step them on the host.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Any, Optional, Union

import dataclasses

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.strategies import SingleDeviceStrategy
from torch import Tensor, nn
from typing_extensions import override

from lightning_vdnn.integrations.model_init import built_on_host
from lightning_vdnn.integrations.options import FABRIC, config_from
from lightning_vdnn.integrations.torch_loop import ActivationOffload
from lightning_vdnn.config import VDNNConfig
from lightning_vdnn.report.memory_report import MemoryReport
from lightning_vdnn.streaming.bf16_grads import check_clipping
from lightning_vdnn.streaming.streamer import LayerStreamer


class _CapturedForward(nn.Module):
    """The module Fabric calls: the user's module, its forward under the offloader's capture (a forward under
    ``torch.no_grad()`` is left alone)."""

    def __init__(self, module: nn.Module, offload: ActivationOffload) -> None:
        super().__init__()
        self.module = module
        self.offload = offload

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.offload:
            return self.module(*args, **kwargs)


class VDNNFabricStrategy(SingleDeviceStrategy):
    """Fabric's single-device strategy with vDNN activation offload (see :class:`~lightning_vdnn.VDNNStrategy`).

    Args:
        activation_offload, min_offload_bytes, prefetch_layers, max_inflight_bytes, pin_memory, layers,
            memory_budget: as in :class:`~lightning_vdnn.VDNNConfig`; ``layers`` is a path under each module
            given to ``fabric.setup``; ``"auto"`` plans each model to fit ``memory_budget``.
        layer_streaming, resident_blocks, microbatches, saved_blocks: L2L, as in
            :class:`~lightning_vdnn.VDNNStrategy`. The host update runs at ``optimizer.step()`` (your loop may
            clip with ``fabric.clip_gradients`` between backward and step, except with ``host_state_dtype="bf16"``,
            whose bf16 host gradients it refuses to clip), first block first, so the next forward overlaps it.
        config: a ready :class:`~lightning_vdnn.VDNNConfig`; options given as well replace its values.
        device: normally left to ``Fabric(accelerator=..., devices=1)``.

    Example::

        fabric = Fabric(strategy="vdnn_all", accelerator="cuda", devices=1)
        model, optimizer = fabric.setup(model, optimizer)
        fabric.backward(loss_fn(model(x), y))   # loss.backward() alone would leave the pass open
        print(fabric.strategy.memory_report())
    """

    @FABRIC.signed
    def __init__(self, *args: Any, device: Union[str, torch.device, None] = None,
                 accelerator: Optional[Accelerator] = None, checkpoint_io: Optional[CheckpointIO] = None,
                 precision: Optional[Precision] = None, config: Optional[VDNNConfig] = None, **options: Any) -> None:
        self.config = config_from(config, FABRIC, args, options)
        self.config.refuse_chunks("VDNNFabricStrategy")
        if self.config.zero_stage:
            raise ValueError(f"zero_stage={self.config.zero_stage}: DeepSpeed ZeRO is Lightning-only "
                             "(Trainer(strategy='vdnn_zeroN')); VDNNFabricStrategy trains on one device.")
        super().__init__(device=device or "cpu", accelerator=accelerator, checkpoint_io=checkpoint_io,
                         precision=precision)
        self._device_given = device is not None
        self._wrapped: list[_CapturedForward] = []
        self._streamers: list[LayerStreamer] = []

    # Fabric's connector fills ``parallel_devices`` from Fabric(accelerator=..., devices=...): so a registered
    # name follows the user's device choice, as Lightning's VDNNStrategy does.
    @property
    def parallel_devices(self) -> Optional[list[torch.device]]:
        return [self._root_device] if self._device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[list[torch.device]]) -> None:
        if not devices:
            return
        if len(devices) > 1:
            raise ValueError(f"VDNNFabricStrategy trains on one device, but Fabric was given {len(devices)} "
                             f"({devices}). Use devices=1.")
        self._root_device = torch.device(devices[0])
        self._device_given = True

    @override
    def module_init_context(self, empty_init: Optional[bool] = None) -> AbstractContextManager:
        """``fabric.init_module()`` builds in host memory under layer streaming (``integrations/model_init.py``)."""
        stack = ExitStack()
        stack.enter_context(super().module_init_context(empty_init))
        stack.enter_context(built_on_host(bool(self.config.layer_streaming)))
        return stack

    @override
    def module_to_device(self, module: nn.Module) -> None:
        if not self.config.layer_streaming:  # streamed blocks stay on the host: setup_module moves the rest
            super().module_to_device(module)

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        if self.config.layer_streaming:
            streamer = LayerStreamer.from_config(module, self.config, self.root_device,
                                                 getattr(self.precision, "precision", "32-true"))
            streamer.set_eager(False)  # Fabric cannot know whether the loop clips between backward and step
            self._streamers.append(streamer)
        wrapped = _CapturedForward(module, ActivationOffload(module, self.config, self.root_device))
        self._wrapped.append(wrapped)
        return wrapped

    @override
    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        for streamer in self._streamers:  # each takes the optimizers that hold its blocks
            streamer.attach_optimizers([optimizer])
        return super().setup_optimizer(optimizer)

    # bf16 host gradients are not p.grad, which Fabric's clipping reads: refused (``streaming/bf16_grads.py``)
    @override
    def clip_gradients_norm(self, module: nn.Module, optimizer: torch.optim.Optimizer, max_norm: Union[float, int],
                            norm_type: Union[float, int] = 2.0, error_if_nonfinite: bool = True) -> Tensor:
        check_clipping(self._streamers, self.precision.main_params(optimizer), "fabric.clip_gradients(max_norm=...)")
        return super().clip_gradients_norm(module, optimizer, max_norm, norm_type, error_if_nonfinite)

    @override
    def clip_gradients_value(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                             clip_val: Union[float, int]) -> None:
        check_clipping(self._streamers, self.precision.main_params(optimizer), "fabric.clip_gradients(clip_val=...)")
        return super().clip_gradients_value(module, optimizer, clip_val)

    # ``fabric.save``/``fabric.load`` hand over the module Fabric calls, which is our capture wrapper: the
    # checkpoint holds the user's module's keys (no ``module.`` prefix), so it loads into a plain model.
    @override
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        self.synchronize()  # host updates still queued land before the weights are read
        return super().get_module_state_dict(_user_module(module))

    @override
    def load_module_state_dict(self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        self.synchronize()  # no queued update may land on top of the loaded weights
        super().load_module_state_dict(_user_module(module), state_dict, strict=strict)

    @override
    def get_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        self.synchronize()
        return super().get_optimizer_state(optimizer)

    def synchronize(self) -> None:
        """Wait for the streamed blocks' queued host updates: call it before reading block weights yourself
        between ``optimizer.step()`` and the next forward (``fabric.save`` and ``teardown`` do)."""
        for streamer in self._streamers:
            streamer.synchronize()

    @override
    def backward(self, tensor: Tensor, module: Optional[nn.Module], *args: Any, **kwargs: Any) -> None:
        try:
            super().backward(tensor, module, *args, **kwargs)
        finally:  # the model given to fabric.backward(model=...), else every model set up
            for wrapped in self._wrapped:
                if module is None or module is wrapped:
                    wrapped.offload.step_done()

    def memory_report(self, index: int = 0) -> MemoryReport:
        """Offload statistics of the last pass of the ``index``-th model given to ``fabric.setup``."""
        if not self._wrapped:
            return MemoryReport(policy=self.config.offload_policy)
        report = self._wrapped[index].offload.report()
        return dataclasses.replace(report, **self._streamers[index].stats()) if self._streamers else report

    @override
    def teardown(self) -> None:
        try:
            for streamer in self._streamers:
                streamer.close()
        finally:
            self._streamers.clear()
            for wrapped in self._wrapped:
                wrapped.offload.close()
            self._wrapped.clear()
            super().teardown()


def _user_module(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, _CapturedForward) else module

