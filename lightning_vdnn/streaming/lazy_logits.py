"""The logits a chunked head hands its model instead of computing them: a stand-in that records what the model does to
them on the way to its loss, so that each chunk of tokens can have the same done to its own logits.

Many ``transformers`` causal LMs change the head's output before the loss: Granite divides by ``logits_scaling``,
Cohere multiplies by ``logit_scale``, Gemma 2 and 3 soft-cap (``cap * tanh(logits / cap)``), OPT makes them
contiguous, some cast to float32. Each of those acts on every token's logits alone, so applying it to a chunk's
logits gives that chunk's share of what it gives on the whole batch. :class:`LazyLogits` is what the head returns
(``streaming/chunked_head.py``): a zero broadcast to the logits' shape (no memory) whose ``__torch_function__``
answers shape and dtype questions and, for such per-token ops, returns another stand-in with the op appended,
nothing computed. The loss function then gets the last one and :meth:`LazyLogits.replay` runs its ops on each
chunk's logits.

Per token means: element-wise ops (``tanh``, ``neg``, dtype casts, ``contiguous``, ``clamp`` with number bounds)
and arithmetic with a number or a tensor that broadcasts along the vocabulary only (a scalar parameter, a bias of
one value per word). Anything else (a reduction, an index over the tokens, a mask of the batch's shape) raises
``RuntimeError`` naming the op and the fix, before it computes anything.
"""

from __future__ import annotations

from numbers import Number
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

#: Ops of one tensor that act on each element alone (their other arguments: numbers, dtypes, devices, flags).
ELEMENTWISE = frozenset({
    "tanh", "tanh_", "neg", "neg_", "__neg__", "sigmoid", "exp", "float", "double", "half", "bfloat16", "to",
    "contiguous", "clamp", "clamp_", "clip", "clip_", "abs", "relu"})
#: Arithmetic with one other operand: a number, or a tensor broadcasting along the last (vocabulary) dimension.
ARITHMETIC = frozenset({
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "div", "div_", "true_divide", "__truediv__",
    "__rtruediv__", "__itruediv__", "divide", "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_",
    "__sub__", "__rsub__", "__isub__", "subtract"})
#: Questions about the tensor that compute nothing (property getters too: ``shape``, ``dtype``, ``device``).
METADATA = frozenset({
    "__get__", "size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "is_complex", "element_size",
    "__len__", "get_device", "__format__", "untyped_storage", "data_ptr", "storage_offset", "is_pinned"})


class LazyLogits(Tensor):
    """A causal LM's logits not yet computed (see the module docstring); make one with :meth:`start`.

    ``origin`` is whatever made it (the chunked head's call), for the loss to check that what it receives came from
    the head it stands in for."""

    _ops: tuple[Callable[[Tensor], Tensor], ...] = ()
    _names: tuple[str, ...] = ()
    origin: Any = None
    model: str = "the model"

    @staticmethod
    def start(hidden: Tensor, vocab: int, origin: Any, model: str = "the model") -> "LazyLogits":
        """The stand-in for ``head(hidden)``: its shape (``hidden``'s with the last dimension ``vocab``), dtype and
        device, no op yet; ``model`` names the model in errors."""
        out = _wrap(hidden.new_zeros(()).expand(*hidden.shape[:-1], vocab), (), (), origin)
        out.model = model
        return out

    @property
    def ops(self) -> tuple[str, ...]:
        """The names of the ops recorded, in order."""
        return self._names

    def replay(self, logits: Tensor) -> Tensor:
        """The recorded ops applied to ``logits`` (a chunk's, with as many dimensions as this stand-in)."""
        for op in self._ops:
            logits = op(logits)
        return logits

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name == "__repr__":
            lazy = args[0]
            return f"LazyLogits(shape={tuple(lazy.shape)}, dtype={lazy.dtype}, ops={list(lazy.ops)})"
        if name in METADATA:
            return Tensor.__torch_function__(func, (Tensor,), args, kwargs)  # on the broadcast zero: no memory
        lazies = [a for a in tree_leaves((args, kwargs)) if isinstance(a, LazyLogits)]  # in a list too (cat)
        if len(lazies) != 1 or not _per_token(name, lazies[0], args, kwargs):
            raise NotLogitsPerToken(name, lazies[0].model)
        lazy = lazies[0]

        def op(x: Tensor, _func=func, _args=args, _kwargs=kwargs, _lazy=lazy) -> Tensor:
            return _func(*(x if a is _lazy else a for a in _args),
                         **{k: (x if v is _lazy else v) for k, v in _kwargs.items()})

        if _in_place(name):  # ``logits.mul_(s)``: the model goes on with the same object
            lazy._ops, lazy._names = lazy._ops + (op,), lazy._names + (name,)
            return lazy
        out = _wrap(_result_base(op, lazy), lazy._ops + (op,), lazy._names + (name,), lazy.origin)
        out.model = lazy.model
        return out


class NotLogitsPerToken(RuntimeError):
    """A model applied to its logits, before its loss, an op that does not act on each token alone."""

    def __init__(self, op: str, model: str = "the model") -> None:
        super().__init__(
            f"{model} applies {op!r} to its head's logits before its loss, an op that does not act on each token "
            "alone: with microbatches the head and loss of a call with labels run a chunk of tokens at a time, "
            "which follows per-token ops only (scaling, soft-capping, dtype casts). Call the model without labels "
            "and compute the loss from .logits yourself (the head then runs whole), or use microbatches=1.")
        self.op = op


def _wrap(base: Tensor, ops: tuple, names: tuple, origin: Any) -> LazyLogits:
    out = base.as_subclass(LazyLogits)
    out._ops, out._names, out.origin = ops, names, origin
    return out


def _per_token(name: str, lazy: LazyLogits, args: tuple, kwargs: dict) -> bool:
    others = [a for a in (*args, *kwargs.values()) if a is not lazy]
    if name in ELEMENTWISE:
        return not any(isinstance(a, Tensor) for a in others) or (name == "to" and _only_dtype_source(others))
    if name in ARITHMETIC:
        return all(isinstance(a, (Number, bool, str)) or a is None or _along_vocab(a, lazy.dim()) for a in others)
    return False


def _in_place(name: str) -> bool:
    return name.startswith("__i") or (name.endswith("_") and not name.endswith("__"))


def _only_dtype_source(others: list) -> bool:
    """``logits.to(other)``: a tensor whose dtype and device the logits take (nothing read from it)."""
    return sum(isinstance(a, Tensor) for a in others) == 1


def _along_vocab(t: Any, dims: int) -> bool:
    """A tensor that broadcasts against one chunk's logits as against the batch's: every dimension but the last 1."""
    return isinstance(t, Tensor) and not isinstance(t, LazyLogits) and t.dim() <= dims and all(
        s == 1 for s in t.shape[:-1])


def _result_base(op: Callable[[Tensor], Tensor], lazy: LazyLogits) -> Tensor:
    """What ``op`` makes of the logits, as a broadcast zero: its dtype and device from ``op`` run on one element, its
    shape the logits' (a per-token op broadcasts nothing in)."""
    with torch.no_grad():
        one = op(torch.zeros((1,) * lazy.dim(), dtype=lazy.dtype, device=lazy.device))
    return one.new_zeros(()).expand(lazy.shape)
