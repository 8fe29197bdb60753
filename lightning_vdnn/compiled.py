"""Our module hooks and compiled models: they run around a compiled module's call, never inside a compiled region.

``Module.compile()`` compiles the module's whole ``_call_impl``, its forward hooks included, and
``torch.compile(model)`` traces every submodule's hooks with the model. A hook with Python side effects (layer marks, timers, storage
addresses) traced by Dynamo either breaks the graph or is guarded on, and recompiles whenever its state changes.
So our hooks keep out of compiled code two ways:

* on a module compiled by itself (regional compilation, ``block.compile()``), :func:`register_call_hooks` puts
  them around the compiled call (on ``_compiled_call_impl``, which ``Module.__call__`` runs instead of its
  ``_call_impl``): they run eagerly, once per call, before and after the compiled region;
* inside a region compiled as a whole, every hook starts with ``if compiling(): return``, which Dynamo folds to
  a constant: the hook leaves nothing in the graph and nothing to guard on. The region is one layer to us then.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple, dict], None]
PostHook = Callable[[nn.Module, tuple, Any], None]

compiling = torch.compiler.is_compiling
_ids = itertools.count()


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module(...)`` runs a compiled call (``Module.compile()``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compiled_leaves(root: nn.Module) -> list[nn.Module]:
    """The leaf modules of ``root``, a module compiled by itself counting as one leaf (its insides run compiled)."""
    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        children = list(m.children())
        if not children or is_compiled(m):
            out.append(m)
        for child in ([] if is_compiled(m) else children):
            visit(child)

    visit(root)
    return out


class CallBoundary:
    """Stands in ``module._compiled_call_impl``: our hooks, eagerly, around the compiled call ``inner``."""

    def __init__(self, module: nn.Module, inner: Callable[..., Any]) -> None:
        self.module, self.inner = module, inner
        self.pre: dict[int, PreHook] = {}
        self.post: dict[int, PostHook] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for hook in tuple(self.pre.values()):
            hook(self.module, args, kwargs)
        out = self.inner(*args, **kwargs)
        for hook in tuple(self.post.values()):
            hook(self.module, args, out)
        return out


def inner_call(call: Optional[Callable[..., Any]]) -> Optional[Callable[..., Any]]:
    """The compiled call under our boundaries."""
    while isinstance(call, CallBoundary):
        call = call.inner
    return call


class CallHooks:
    """The handle :func:`register_call_hooks` returns; :meth:`remove` takes the hooks off."""

    def __init__(self, module: nn.Module, key: int, handles: list[Any]) -> None:
        self.module, self.key, self.handles = module, key, handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        call = getattr(self.module, "_compiled_call_impl", None)
        parent = None
        while isinstance(call, CallBoundary):  # ours, wherever it is now in the chain of boundaries
            call.pre.pop(self.key, None)
            call.post.pop(self.key, None)
            if not call.pre and not call.post:  # the last hooks gone: the boundary goes too
                if parent is None:
                    self.module._compiled_call_impl = call.inner
                else:
                    parent.inner = call.inner
            else:
                parent = call
            call = call.inner


class OwnHook:
    """A hook of one module, inert in a copy of it: ``copy.deepcopy(module)`` during fit (a user saving a
    snapshot, EMA and weight-averaging callbacks) shares it rather than copying the offloader or streamer behind
    it (locks, CUDA streams, pinned buffers: not copyable), and the copy, never planned or measured, runs as a
    plain module."""

    def __init__(self, module: nn.Module, hook: Callable[..., Any]) -> None:
        self.module, self.hook = weakref.ref(module), hook

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        return self.hook(module, *args) if module is self.module() else None

    def __deepcopy__(self, memo: dict) -> "OwnHook":
        return self


def register_call_hooks(module: nn.Module, pre: Optional[PreHook] = None,
                        post: Optional[PostHook] = None) -> CallHooks:
    """``pre(module, args, kwargs)`` before and ``post(module, args, output)`` after each call of ``module``: as
    forward hooks on a module that is not compiled, around the compiled call on one that is. A copy of
    ``module`` does not run them (:class:`OwnHook`)."""
    key = next(_ids)
    pre = None if pre is None else OwnHook(module, pre)
    post = None if post is None else OwnHook(module, post)
    if not is_compiled(module):
        handles = []
        if pre is not None:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            handles.append(module.register_forward_hook(post))
        return CallHooks(module, key, handles)
    boundary = module._compiled_call_impl
    if not isinstance(boundary, CallBoundary):
        boundary = module._compiled_call_impl = CallBoundary(module, boundary)
    if pre is not None:
        boundary.pre[key] = pre
    if post is not None:
        boundary.post[key] = post
    return CallHooks(module, key, [])


def set_inner_call(module: nn.Module, call: Callable[..., Any]) -> None:
    """Make ``call`` the compiled call of ``module`` under our boundaries (their hooks still run around it)."""
    parent = module._compiled_call_impl
    if not isinstance(parent, CallBoundary):
        module._compiled_call_impl = call
        return
    while isinstance(parent.inner, CallBoundary):
        parent = parent.inner
    parent.inner = call


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A saved-tensor hook: never a frame Dynamo compiles. Autograd calls it from wherever a tensor is saved; inside
    compiled code it runs outside the graph anyway (AOTAutograd's saves go through it at run time), but from a
    compiled model's frame that fell back to eager, Dynamo would compile it as a frame of its own, and break in it."""
    return torch.compiler.disable(fn, recursive=True)
