"""What our strategies add to the Trainer's precision plugin, through Lightning's ``Precision`` hooks.

Lightning runs backward and clipping through the strategy's ``precision_plugin``, whichever the Trainer chose
for ``precision=`` (``MixedPrecision``, ``DoublePrecision``, ``HalfPrecision``, a user's own). To add to one of
its methods without overriding ``Strategy.backward`` (which Lightning's own strategies leave alone, and tests
patch), :func:`extended` gives the strategy a plugin of that class with a mixin put before it, sharing its
settings and state: ``isinstance(trainer.precision_plugin, <the user's class>)`` stays true, and its checkpoint
state is filed under the same key. The strategy uses it during ``fit`` and puts the user's plugin back after.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override


def extended(plugin: Precision, mixin: type, **attrs: Any) -> Precision:
    """A plugin of ``plugin``'s class plus ``mixin`` (a ``Precision`` subclass overriding some of its methods),
    with ``plugin``'s attributes (the same scaler and dtype objects) and ``attrs`` set on it only."""
    cls = _with(mixin, type(plugin))
    out = cls.__new__(cls)
    out.__dict__.update(vars(plugin))
    out.__dict__.update(attrs)
    return out


@functools.cache
def _with(mixin: type, base: type) -> type:
    if issubclass(base, mixin):
        return base
    cls = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
    cls.__qualname__ = base.__qualname__  # checkpoints file the plugin's state under it: keep them portable
    return cls


class RetriedBackward(Precision):
    """Backward through the strategy's OOM retry (``planning/oom_retry.py``): an out-of-memory error in the
    plugin's own ``backward`` re-plans, runs the batch's ``training_step`` again and its backward, from here.

    ``retry(loss, backward, plugin)`` runs ``backward(loss)`` (the plugin's) until it succeeds and returns
    False when the re-run ``training_step`` skipped the batch (returned None): then ``post_backward`` calls no
    ``on_after_backward`` hook, as plain Lightning calls none for a skipped batch."""

    retry: Callable[[Tensor, Callable[[Tensor], None], Precision], bool]
    _skipped = False

    @override
    def backward(self, tensor: Tensor, model: "pl.LightningModule", optimizer: Optional[Optimizer], *args: Any,
                 **kwargs: Any) -> None:
        plugin_backward = super().backward

        def backward(loss: Tensor) -> None:
            plugin_backward(loss, model, optimizer, *args, **kwargs)

        self._skipped = not self.retry(tensor, backward, self)

    @override
    def post_backward(self, tensor: Tensor, module: "pl.LightningModule") -> Tensor:
        if self._skipped:
            self._skipped = False
            return tensor.detach()
        return super().post_backward(tensor, module)
