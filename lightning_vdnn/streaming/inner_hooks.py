"""Forward hooks on modules inside a streamed block: run once per block call, on the whole batch's outputs, which
reach backward.

``transformers`` records router logits (for the MoE load-balancing loss) and attention weights with forward hooks
on the modules inside each layer. Inside a streamed block such a hook would see each microbatch's outputs apart
(two router-logit tensors per layer where plain training has one), and a tensor it keeps would be cut from
backward: the block's forward graph is dropped, backward recomputes the block. So while a streamed block runs,
the hooks of the modules inside it are set aside and each hooked call's output is captured, chunk by chunk;
the chunks' outputs are joined along dim 0 (a leaf with a multiple of each chunk's rows: tokens flattened batch
first) and come out of the block's autograd ``Function`` as extra outputs, which the hooks then receive, after
the block's forward and before the block's own hooks. In backward the recompute captures the same calls again,
and their gradients join the block's.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_vdnn.compiled import OwnHook
from lightning_vdnn.integrations.adapters.torch import forward_hooks_set_aside, has_forward_hooks, run_forward_hooks
from lightning_vdnn.streaming.calls import Flat

#: One hooked call: (module, args, kwargs, output).
Call = tuple[nn.Module, tuple, dict, Any]


def hooked_modules(block: nn.Module) -> list[nn.Module]:
    """The modules inside ``block`` (not itself: its hooks see the streamed call's result) with forward hooks
    other than ours (the offloader's layer boundaries, ``compiled.OwnHook``, which run in place, per chunk)."""
    return [m for m in block.modules() if m is not block and has_forward_hooks(m, _ours)]


def _ours(hook: Any) -> bool:
    return isinstance(hook, OwnHook)


class InnerHooks:
    """The hooked modules of one block while it streams (none: false), whose calls are captured instead of hooked,
    and ``run``, the block's call to run it by (a block compiled by itself runs eagerly while it has hooked modules:
    their hooks would run inside its compiled graph, out of reach)."""

    def __init__(self, modules: list[nn.Module], run: Callable[..., Any]) -> None:
        self.modules, self.run = modules, run
        self.kept: Optional[list[tuple[dict, dict]]] = None  # the hooks set aside, per module

    def __bool__(self) -> bool:
        return bool(self.modules)

    @contextlib.contextmanager
    def capture(self, calls: list[Call]) -> Iterator[None]:
        """Inside, each hooked call lands in ``calls`` and no hook of the modules runs (no-op without any)."""
        if not self.modules:
            yield
            return
        with forward_hooks_set_aside(self.modules, lambda *call: calls.append(call), _ours) as kept:
            if self.kept is None:
                self.kept = kept
            yield


class InnerOutputs:
    """The hooked calls of one streamed block call, joined over its chunks: :attr:`tensors` (their outputs' tensor
    leaves, joined) leave the block's ``Function``; :meth:`run_hooks` hands them to the hooks set aside."""

    def __init__(self, hooks: InnerHooks, chunks: list[list[Call]], sizes: Sequence[int], where: str) -> None:
        differ = ValueError(f"microbatches={len(sizes)}: the hooked modules inside {where} ran differently for "
                            "different chunks of the batch, so their hooks cannot see one call per module as in "
                            "plain training; use microbatches=1.")
        if any([c[0] for c in calls] != [c[0] for c in chunks[0]] for calls in chunks):
            raise differ
        self.hooks, self.sizes = hooks, list(sizes)
        self.calls: list[tuple[nn.Module, Flat, Any, int]] = []  # module, joined (args, kwargs), output Flat, leaves
        self.tensors: list[Tensor] = []
        self.folds: list[Optional[int]] = []  # per leaf: rows per chunk row, or None (the first chunk's)
        for j, (module, *_) in enumerate(chunks[0]):
            called, flats = [Flat((c[j][1], c[j][2])) for c in chunks], [Flat(c[j][3]) for c in chunks]
            if any(f.spec != flats[0].spec for f in flats) or any(f.spec != called[0].spec for f in called):
                raise differ
            joined, _ = _join([f.take() for f in called], self.sizes)
            called[0].tensors = [t.detach() for t in joined]
            leaves, folds = _join([f.take() for f in flats], self.sizes)
            self.calls.append((module, called[0], flats[0], len(leaves)))
            self.tensors += [t.detach() for t in leaves]
            self.folds += folds
        self.wanted = [t.requires_grad for t in _leaves(chunks[0])]

    def layout(self) -> "InnerLayout":
        return InnerLayout(self.folds, self.sizes)

    def run_hooks(self, tensors: Sequence[Tensor]) -> None:
        """The hooks set aside, once per hooked call, on the joined outputs (``tensors``: :attr:`tensors` as the
        block's ``Function`` returned them)."""
        it = iter(tensors)
        for (module, called, flat, count), kept in zip(self.calls, self._kept_of()):
            args, kwargs = called.rebuild(called.tensors)
            output = flat.rebuild(list(itertools.islice(it, count)))
            if any(r is not None for r in run_forward_hooks(module, kept, args, kwargs, output)):
                raise RuntimeError(f"A forward hook on {type(module).__name__} inside a streamed block returned a new "
                                   "output: layer streaming runs the hooks of modules inside a block after the "
                                   "block, too late to change what it computes. Hook the block itself, or train "
                                   "with activation offload alone (layer_streaming=False).")

    def _kept_of(self) -> list[tuple[dict, dict]]:
        by_module = dict(zip(map(id, self.hooks.modules), self.hooks.kept or []))
        return [by_module[id(module)] for module, *_ in self.calls]


class InnerLayout:
    """What backward keeps of :class:`InnerOutputs`: how each leaf splits over the chunks."""

    def __init__(self, folds: list[Optional[int]], sizes: list[int]) -> None:
        self.folds, self.starts = folds, list(itertools.accumulate(sizes, initial=0))

    def grads_of_chunk(self, k: int, grads: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
        out: list[Optional[Tensor]] = []
        for fold, g in zip(self.folds, grads):
            if g is None or fold is None:
                out.append(g if k == 0 else None)
            else:
                out.append(g[fold * self.starts[k]: fold * self.starts[k + 1]])
        return out

    @staticmethod
    def leaves(calls: list[Call]) -> list[Tensor]:
        """The recompute's hooked outputs, in the order of the joined leaves."""
        return _leaves(calls)


def _leaves(calls: list[Call]) -> list[Tensor]:
    return [t for call in calls for t in Flat(call[3]).take()]


def _join(per_chunk: list[list[Tensor]], sizes: list[int]) -> tuple[list[Tensor], list[Optional[int]]]:
    """Leaf by leaf over the chunks: concatenated along dim 0 where each chunk's has the same multiple ``fold`` of
    its rows, else the first chunk's (fold None)."""
    if len(per_chunk) == 1:
        return per_chunk[0], [None] * len(per_chunk[0])
    joined, folds = [], []
    for leaves in zip(*per_chunk):  # (under no_grad: the joined leaves leave the block's Function detached)
        first = leaves[0]
        fold = first.shape[0] // sizes[0] if first.dim() and first.shape[0] % sizes[0] == 0 else 0
        if fold and all(t.dim() == first.dim() and t.shape[1:] == first.shape[1:] and t.shape[0] == fold * n
                        for t, n in zip(leaves, sizes)):
            with torch.no_grad():
                joined.append(torch.cat(leaves))
            folds.append(fold)
        else:
            joined.append(first)
            folds.append(None)
    return joined, folds
