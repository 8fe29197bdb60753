"""What ``lightning_vdnn`` relies on inside Accelerate where Accelerate has no public hook for it.

Written against accelerate 1.16.0 (``tests/test_adapters.py`` checks both conventions below, and fails naming
the one that changed).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import Tensor, nn

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


#: ``Accelerator``'s clipping methods; their first argument is the parameters (an iterable, or one tensor).
CLIPPING = ("clip_grad_norm_", "clip_grad_value_")


def before_clipping(accelerator: Any, check: Callable[[list, str], None]) -> None:
    """Call ``check(parameters, "accelerator.<method>")`` before each of ``accelerator``'s :data:`CLIPPING` methods
    (signatures ``clip_grad_norm_(parameters, max_norm, norm_type=2)``, ``clip_grad_value_(parameters,
    clip_value)``). Accelerate has no hook there, so this instance's methods are wrapped; ``parameters`` is made a
    list first, as a generator could be read only once."""
    for name in CLIPPING:
        method = getattr(accelerator, name)

        @functools.wraps(method)
        def checked(parameters: Any, *args: Any, _method: Callable = method, _name: str = name, **kwargs: Any) -> Any:
            parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
            check(parameters, f"accelerator.{_name}")
            return _method(parameters, *args, **kwargs)

        setattr(accelerator, name, checked)
