"""What ``lightning_vdnn`` uses of torch's private (underscored) API, where torch has no public one.

Written against torch 2.13.0 (``tests/test_adapters.py`` checks every name below, and fails naming the one
that changed). Public torch API is used directly everywhere else.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch._functorch import config as functorch_config
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import _get_autocast_kwargs

#: The torch release this module was written (and tested) against.
WRITTEN_AGAINST = "2.13.0"

#: What ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` puts on the module and on
#: each ignored tensor (``ddp_unignore`` takes them back).
DDP_IGNORE_LIST, DDP_IGNORED_FLAG = "_ddp_params_and_buffers_to_ignore", "_ddp_ignored"

#: Where ``nn.Module`` keeps its forward hooks, and which of them take the call's keyword arguments (dicts keyed by
#: the hook's id); ``nn.Module._call_impl`` reads both on every call.
FORWARD_HOOKS, FORWARD_HOOKS_WITH_KWARGS = "_forward_hooks", "_forward_hooks_with_kwargs"
_CAPTURE = object()  # the id of the one hook :func:`forward_hooks_set_aside` leaves

#: The setting of AOTAutograd's min-cut partitioner that bounds what a compiled graph saves for its backward:
#: 1 (torch's default) saves what the min cut chooses; lower saves less and recomputes more inside the compiled
#: backward, 0 the least. ``torch.compile`` has no public way to set it (its ``options`` are inductor's).
PARTITIONER_BUDGET = "activation_memory_budget"


def partitioner_budget() -> float:
    """The partitioner's memory budget that graphs compiled from now on are partitioned under."""
    return getattr(functorch_config, PARTITIONER_BUDGET)


def set_partitioner_budget(value: float) -> None:
    """Partition graphs compiled from now on under ``value`` (graphs already compiled keep theirs)."""
    setattr(functorch_config, PARTITIONER_BUDGET, float(value))


def autocast_kwargs(device_type: str) -> tuple[Optional[dict[str, Any]], dict[str, Any]]:
    """The autocast settings in force for ``device_type`` (None where it has no autocast) and for the CPU, as
    ``torch.utils.checkpoint`` captures them for its recompute (``torch.autocast(**kwargs)`` replays them)."""
    return _get_autocast_kwargs(device_type)


def outside_dispatch_modes() -> Any:
    """A context in which no ``TorchDispatchMode`` sees the ops run: work of ours inside a selective checkpoint's
    recompute (SAC replays the forward's ops by their order, and fails on one the forward did not run)."""
    return _disable_current_modes()


def ddp_ignore(module: nn.Module, names: Iterable[str]) -> None:
    """DDP neither broadcasts nor reduces the parameters and buffers ``names`` of ``module`` (set before it
    wraps it). torch's only way to say so (pytorch/pytorch#43690) is this private static method."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(names))


def ddp_unignore(module: nn.Module) -> None:
    """Take back what :func:`ddp_ignore` put on ``module`` and its tensors."""
    module.__dict__.pop(DDP_IGNORE_LIST, None)
    for t in (*module.parameters(), *module.buffers()):
        t.__dict__.pop(DDP_IGNORED_FLAG, None)


def around_zero_grad(optimizer: Optimizer, before: Callable[[bool], None],
                     after: Callable[[bool], None]) -> Callable[[], None]:
    """Call ``before(set_to_none)`` and ``after(set_to_none)`` around each ``optimizer.zero_grad`` (the class's
    own, a subclass's override included, called once as the caller asked); returns what undoes it.

    ``torch.optim.Optimizer`` has public hooks around ``step`` and ``state_dict`` but none around
    ``zero_grad`` (its signature: ``zero_grad(self, set_to_none=True)``), so this instance's method is wrapped.
    Layer streaming needs it twice: zeroing in place rewrites host gradients a queued block update still reads
    (``before`` waits for it), and a block whose gradients are not in ``p.grad`` (``streaming/sharded.py``)
    clears its own record (``after``)."""
    previous = optimizer.__dict__.get("zero_grad")
    zero_grad = optimizer.zero_grad

    @functools.wraps(zero_grad)
    def zero_grad_between(set_to_none: bool = True) -> None:
        before(set_to_none)
        zero_grad(set_to_none=set_to_none)
        after(set_to_none)

    optimizer.zero_grad = zero_grad_between

    def undo() -> None:
        if previous is None:
            optimizer.__dict__.pop("zero_grad", None)
        else:
            optimizer.zero_grad = previous
    return undo


def has_forward_hooks(module: nn.Module, ignore: Callable[[Any], bool]) -> bool:
    """Whether ``module`` has forward hooks of its own (not counting global ones) other than those ``ignore``
    picks."""
    return any(not ignore(hook) for hook in getattr(module, FORWARD_HOOKS).values())


@contextlib.contextmanager
def forward_hooks_set_aside(modules: Sequence[nn.Module], capture: Callable[[nn.Module, tuple, dict, Any], None],
                            keep: Callable[[Any], bool]) -> Iterator[list[tuple[dict, dict]]]:
    """While inside, each module's forward hooks but those ``keep`` picks are set aside, and ``capture(module,
    args, kwargs, output)`` runs after the kept ones in their place; yields the hooks set aside per module,
    ``(hooks, with_kwargs)``, for :func:`run_forward_hooks`. torch can add and remove hooks publicly, not suspend
    them: their dicts are swapped and put back."""
    saved = [(getattr(m, FORWARD_HOOKS), getattr(m, FORWARD_HOOKS_WITH_KWARGS)) for m in modules]
    aside = [(OrderedDict((i, h) for i, h in hooks.items() if not keep(h)), with_kwargs) for hooks, with_kwargs in saved]
    try:
        for m, (hooks, with_kwargs) in zip(modules, saved):
            kept = OrderedDict((i, h) for i, h in hooks.items() if keep(h))
            kept[_CAPTURE] = capture
            setattr(m, FORWARD_HOOKS, kept)
            setattr(m, FORWARD_HOOKS_WITH_KWARGS, {**{i: True for i in kept if i in with_kwargs}, _CAPTURE: True})
        yield aside
    finally:
        for m, (hooks, with_kwargs) in zip(modules, saved):
            setattr(m, FORWARD_HOOKS, hooks)
            setattr(m, FORWARD_HOOKS_WITH_KWARGS, with_kwargs)


def run_forward_hooks(module: nn.Module, kept: tuple[dict, dict], args: tuple, kwargs: dict, output: Any) -> list[Any]:
    """Run the hooks :func:`forward_hooks_set_aside` kept for ``module`` as its call would have, in order; returns
    what each returned."""
    hooks, with_kwargs = kept
    return [hook(module, args, kwargs, output) if hook_id in with_kwargs else hook(module, args, output)
            for hook_id, hook in list(hooks.items())]


def uncompiled_call(module: nn.Module) -> Callable[..., Any]:
    """``module``'s call as it runs without ``module.compile()`` (hooks and ``forward``, eagerly): what
    ``nn.Module.__call__`` runs when no compiled call is set, which it otherwise prefers."""
    return module._call_impl


def backward_accumulates(leaf: Tensor) -> bool:
    """Inside a backward pass: whether it accumulates into ``leaf.grad`` (``loss.backward()``, or
    ``torch.autograd.backward`` with ``inputs`` naming it), not ``torch.autograd.grad`` or ``backward(inputs=...)``
    naming others. The engine's own answer, which ``torch.autograd.graph.register_multi_grad_hook`` asks too;
    there is no public one."""
    return torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(leaf).node)
