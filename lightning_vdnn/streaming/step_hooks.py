"""A piece of work inside ``optimizer.step()``, after the step's backward and before the optimizer's own update,
through torch's public step hooks (``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``).

The host steppers (``streaming/host_optimizer.py``, ``streaming/host_outside.py``) must act once the step's
gradients exist and before the optimizer's body updates what stays on the device. Called as
``optimizer.step()`` after ``backward()``, that is the step pre-hook. Called with a closure (Lightning always
passes one), torch runs the pre-hooks *before* the closure's backward; a pre-hook may hand torch new
arguments, so it hands it the closure followed by the work. Several such hooks nest that way: each wraps the
closure the one registered before it returned, so their work runs in registration order in both cases.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional

from torch.optim import Optimizer


class StepHooks:
    """``ready()`` inside every ``optimizer.step`` once the step's gradients exist (see the module docstring),
    ``done()`` after the step; until :meth:`remove`.

    Args:
        optimizer: the user's optimizer; nothing of it is replaced.
        ready: the work before the optimizer's own update.
        done: the work after the step returned (not run if the step raised: torch skips post-hooks then).
        backward: a context manager factory entered around the step's closure (its backward is the step's).
    """

    def __init__(self, optimizer: Optimizer, ready: Callable[[], None], done: Callable[[], None],
                 backward: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> None:
        self.ready, self.backward = ready, backward
        self._handles = [optimizer.register_step_pre_hook(self._before),
                         optimizer.register_step_post_hook(lambda *_: done())]

    def _before(self, optimizer: Optimizer, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        # ``args`` starts with the optimizer itself: ``step(self, closure=None)``
        positional = len(args) > 1
        closure = args[1] if positional else kwargs.get("closure")
        if closure is None:
            self.ready()
            return None

        def closure_then_ready() -> Any:
            with self.backward():
                loss = closure()
            self.ready()
            return loss

        if positional:
            return (args[0], closure_then_ready, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_ready}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
