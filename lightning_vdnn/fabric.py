"""``VDNNFabricStrategy``: vDNN activation offload for Lightning Fabric loops, registered under the same names.

Fabric calls a model through ``_FabricModule(strategy.setup_module(module))``; the strategy returns the
module wrapped so that its forward runs under the offloader's capture (as DDP returns a wrapper), and its
``backward`` closes the pass after ``fabric.backward(loss)``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.precision import Precision
from lightning.fabric.strategies import STRATEGY_REGISTRY, SingleDeviceStrategy
from torch import Tensor, nn

from lightning_vdnn.api import ActivationOffload, make_config
from lightning_vdnn.config import MemorySpec, Policy, VDNNConfig
from lightning_vdnn.report import MemoryReport
from lightning_vdnn.strategy import REGISTERED

#: The configuration fields Fabric supports: activation offload. Names needing more are not registered.
FABRIC_FIELDS = frozenset({"activation_offload", "min_offload_bytes", "prefetch_layers", "max_inflight_bytes",
                           "pin_memory", "layers", "memory_budget"})


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
        device: normally left to ``Fabric(accelerator=..., devices=1)``.

    Example::

        fabric = Fabric(strategy="vdnn_all", accelerator="cuda", devices=1)
        model, optimizer = fabric.setup(model, optimizer)
        fabric.backward(loss_fn(model(x), y))   # loss.backward() alone would leave the pass open
        print(fabric.strategy.memory_report())
    """

    def __init__(
        self,
        activation_offload: Policy = "auto",
        *,
        min_offload_bytes: int = 2**20,
        prefetch_layers: int = 1,
        max_inflight_bytes: int = 2**28,
        pin_memory: bool = True,
        layers: Optional[str] = None,
        memory_budget: MemorySpec = None,
        device: Union[str, torch.device, None] = None,
        accelerator: Optional[Accelerator] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision: Optional[Precision] = None,
        config: Optional[VDNNConfig] = None,
    ) -> None:
        self.config = config or make_config(
            activation_offload, min_offload_bytes=min_offload_bytes, prefetch_layers=prefetch_layers,
            max_inflight_bytes=max_inflight_bytes, pin_memory=pin_memory, layers=layers,
            memory_budget=memory_budget)
        super().__init__(device=device or "cpu", accelerator=accelerator, checkpoint_io=checkpoint_io,
                         precision=precision)
        self._device_given = device is not None
        self._wrapped: list[_CapturedForward] = []

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

    def setup_module(self, module: nn.Module) -> nn.Module:
        wrapped = _CapturedForward(module, ActivationOffload(module, self.config, self.root_device))
        self._wrapped.append(wrapped)
        return wrapped

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
        return self._wrapped[index].offload.report()

    def teardown(self) -> None:
        for wrapped in self._wrapped:
            wrapped.offload.close()
        self._wrapped.clear()
        super().teardown()


def fabric_supported(init_params: dict[str, Any]) -> bool:
    """Whether a registered name's arguments are all activation offload, and valid (built) today."""
    if not set(init_params) <= FABRIC_FIELDS:
        return False
    try:
        VDNNConfig(**init_params)
    except (ValueError, TypeError, NotImplementedError):
        return False
    return True


def register_fabric() -> list[str]:
    """Register the names of ``lightning_vdnn.strategy.REGISTERED`` that Fabric supports; returns them."""
    names = []
    for name, (description, init_params) in REGISTERED.items():
        if fabric_supported(init_params):
            STRATEGY_REGISTRY.register(name, VDNNFabricStrategy, description=description, override=True,
                                       **init_params)
            names.append(name)
    return names
