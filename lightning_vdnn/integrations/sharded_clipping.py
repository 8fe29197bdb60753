"""Gradient clipping for :class:`~lightning_vdnn.L2LZeroStrategy`, as Lightning's ``Precision`` hook.

With layer streaming across ranks a streamed block's gradients are not in ``p.grad``: each rank holds its
range of them in host memory, so the norm must be summed over the ranks' pieces
(``ShardedLayerStreamer.clip_grad_norm_``). Lightning clips through the precision plugin
(``Precision.clip_grad_by_norm`` / ``clip_grad_by_value``, called by ``LightningModule.clip_gradients``), and
the plugin is whichever the Trainer chose for ``precision=``; :func:`with_sharded_clipping` gives the strategy
that plugin's class with the two methods overridden, the plugin's settings and state unchanged
(``precision_plugins.extended``).
"""

from __future__ import annotations

from typing import Any, Union

from lightning.pytorch.plugins.precision import Precision
from torch.optim import Optimizer
from typing_extensions import override

from lightning_vdnn.integrations.precision_plugins import extended


class ShardedClipping(Precision):
    """Clipping over every rank's pieces of the streamed blocks' gradients; put before a plugin class."""

    streamer: Any  # the ShardedLayerStreamer whose blocks' gradients live partitioned on the host

    @override
    def clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        self.streamer.clip_grad_norm_(_params(optimizer), float(clip_val))

    @override
    def clip_grad_by_value(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        self.streamer.clip_grad_value_(_params(optimizer), float(clip_val))


def with_sharded_clipping(plugin: Precision, streamer: Any) -> Precision:
    """A plugin of ``plugin``'s class plus :class:`ShardedClipping`, sharing its settings and state (scaler,
    dtype): the strategy uses it during ``fit`` and puts ``plugin`` back afterwards."""
    return extended(plugin, ShardedClipping, streamer=streamer)


def _params(optimizer: Optimizer) -> list[Any]:
    return [p for group in optimizer.param_groups for p in group["params"]]
