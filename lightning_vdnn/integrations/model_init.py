"""Where a model built under the strategy is created: ``LightningModule.configure_model``,
``trainer.init_module()``, ``fabric.init_module()``.

Lightning creates those tensors on the device, to skip a copy. A strategy that may stream the blocks (``l2l``,
``l2l_zero``, ``vdnn``'s ``"auto"``, which streams when the model's state would fill the budget) is there for
models whose state the device cannot hold: built there, they would run out of device memory before the strategy
ever sees them. They are built in host memory instead, in the precision's dtype as Lightning would (and left
uninitialised under ``empty_init=True``); the strategy then moves to the device what stays there.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from lightning_vdnn.config import VDNNConfig


def may_stream(config: VDNNConfig) -> bool:
    """Whether the blocks stream, or ``"auto"`` may decide to before the model moves (the Lightning strategies)."""
    return bool(config.layer_streaming) or config.streams_if_needed


def built_on_host(streams: bool) -> ContextManager:
    """Entered inside the strategy's own init context: host memory where the blocks may stream, else nothing
    (the device, as Lightning chose)."""
    return torch.device("cpu") if streams else contextlib.nullcontext()
