"""Run the layers a plan marks "recompute" under activation checkpointing, without touching the user's code.

Each chosen layer module gets a ``forward`` on the instance that, when the offloader says the call starting now is
one to recompute, runs the module's own forward through ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``: nothing from inside the layer is saved for backward, and its first saved tensor needed in
backward runs it again, with the RNG state (dropout draws the same masks) and autocast state of the forward.

How it meets the offloader's hooks: the checkpoint saves the layer's tensor inputs through whatever
``saved_tensors_hooks`` are active, so they reach the offloader's pack hook in the layer's group and are kept or
offloaded like any other save; inside the layer the checkpoint's own hooks sit on top of the offloader's, so the
layer's internal tensors never reach it (neither in forward nor when recomputed in backward: they are not counted
as layer bytes, not offloaded). The recompute calls the module's own forward directly, not the module, so its
forward pre-hook does not fire again and cannot open a new layer group in backward.

The decision is per call, by the layer's position in forward (a module called twice is two layers): the wrapper
asks ``decide`` at each call. It is removed when the plan changes (:meth:`Recomputer.install`) and at
:meth:`Recomputer.close`; the module's own ``forward`` is then what it was.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_vdnn.buffers import BufferWatch
from lightning_vdnn.layers import wrap_forward

#: What ``decide`` returns for a call to recompute: a context manager factory that times the recompute.
Timer = Callable[[], ContextManager]


class Recomputer:
    """Wraps the forward of chosen modules so that calls ``decide`` picks run under a checkpoint.

    Args:
        decide: called as a wrapped module's forward starts; None runs it plainly, a :data:`Timer` runs it under
            a checkpoint and times its recompute in backward with that timer.
    """

    def __init__(self, decide: Callable[[], Optional[Timer]]) -> None:
        self._decide = decide
        self._restore: dict[nn.Module, Callable[[], None]] = {}  # wrapped module -> what unwraps it

    @property
    def modules(self) -> frozenset[nn.Module]:
        return frozenset(self._restore)

    def install(self, modules: Iterable[nn.Module]) -> None:
        """Wrap exactly ``modules``: unwrap the others, wrap the new ones."""
        wanted = {id(m): m for m in modules}
        for module in [m for m in self._restore if id(m) not in wanted]:
            self._unwrap(module)
        for module in wanted.values():
            if module not in self._restore:
                self._wrap(module)

    def close(self) -> None:
        self.install(())

    def _wrap(self, module: nn.Module) -> None:
        decide = self._decide
        watch = BufferWatch(module)  # BatchNorm's statistics: updated by the forward, not again by the recompute

        def forward(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            timer = decide()
            if timer is None:
                return inner(*args, **kwargs)
            # tensors given by keyword go in as positional arguments too: the checkpoint saves (and so offloads)
            # only those, and takes the devices whose RNG state it replays from them; none can collide with its
            # own keyword arguments
            names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
            rest = {k: v for k, v in kwargs.items() if k not in names}

            def call(*flat: Any) -> Any:
                return inner(*flat[: len(args)], **rest, **dict(zip(names, flat[len(args):])))

            return checkpoint(_replay(call, timer, watch), *args, *(kwargs[k] for k in names), use_reentrant=False,
                              preserve_rng_state=True)

        self._restore[module] = wrap_forward(module, forward)

    def _unwrap(self, module: nn.Module) -> None:
        self._restore.pop(module)()


def _replay(run: Callable[..., Any], timer: Timer, watch: BufferWatch) -> Callable[..., Any]:
    """``run``, the first call plain (the forward), the later ones (recomputes in backward) under ``timer``, with
    the buffers that forward wrote as they were before it (``buffers.py``)."""
    calls, snap = 0, watch.snapshot()

    def call(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            out = run(*args)
            watch.learn(snap)
            return out
        with timer(), watch.replayed(snap):
            return run(*args)

    return call
