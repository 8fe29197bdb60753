"""What ``lightning_vdnn`` relies on inside Accelerate where Accelerate has no public hook for it.

Written against accelerate 1.16.0 (``tests/test_adapters.py`` checks both conventions below, and fails naming
the one that changed).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

#: The Accelerate release this module was written (and tested) against.
WRITTEN_AGAINST = "1.16.0"

#: Where Accelerate's mixed precision keeps the forward it wrapped; ``extract_model_from_parallel`` (behind
#: ``accelerator.unwrap_model``) follows ``__wrapped__`` back to it to peel the wrappers off.
ORIGINAL_FORWARD = "_original_forward"


def wrap_forward(model: nn.Module, around: Callable[[], Any]) -> None:
    """Run ``model``'s forward inside the context manager ``around()`` makes, wrapped the way Accelerate wraps
    it for mixed precision, so that ``accelerator.unwrap_model(model)`` peels this wrapper off too."""
    forward = model.forward
    func = getattr(forward, "__func__", None)

    @functools.wraps(func or forward)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with around():
            return forward(*args, **kwargs)

    if func is not None:
        model.__dict__.setdefault(ORIGINAL_FORWARD, forward)
    model.forward = wrapped


def after_backward(accelerator: Any, done: Callable[[], None]) -> None:
    """Call ``done()`` after each ``accelerator.backward(loss)`` returns or raises. Accelerate has no hook or
    callback there, so this instance's ``backward`` is wrapped (its signature: ``backward(loss, **kwargs)``)."""
    backward = accelerator.backward

    @functools.wraps(backward)
    def backward_then_done(loss: Any, **kwargs: Any) -> None:
        try:
            backward(loss, **kwargs)
        finally:
            done()

    accelerator.backward = backward_then_done
