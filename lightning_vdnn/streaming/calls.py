"""A block's call and its result as flat lists of tensors, and how a call splits into microbatches.

Layer streaming runs each block inside an autograd ``Function``, which takes and returns tensors only, while a
library block is called with anything: keyword arguments, ``None``, rotary ``(cos, sin)`` tuples, cache objects,
and returns a tensor, a tuple, a dict or a ``ModelOutput``. :class:`Flat` takes such a structure apart with
``torch.utils._pytree`` (dataclasses pytree does not know are opened too) into its tensor leaves, and puts it
back together around new tensors; every other leaf passes through as it is.

Microbatches split the tensors whose dim 0 is the batch (the rows of the first positional tensor, the hidden
states) and hand the others whole to every chunk (:class:`ChunkPlan`); the chunks' results are joined leaf by leaf
(:class:`Joined`): a leaf with one row per chunk row is written into one tensor, any other leaf (computed alike
in every chunk, a position bias of dim 0 one) is the first chunk's.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from lightning_vdnn.compiled import inner_call, set_inner_call
from lightning_vdnn.streaming.hf_conventions import folded_batch, is_cache


class _Fields:
    """A dataclass instance pytree treats as a leaf, opened: its init fields, and the instance to rebuild from."""

    __slots__ = ("obj", "names", "values")

    def __init__(self, obj: Any, names: tuple[str, ...], values: list[Any]) -> None:
        self.obj, self.names, self.values = obj, names, values


pytree.register_pytree_node(
    _Fields, lambda f: (f.values, (f.obj, f.names)), lambda values, ctx: _Fields(ctx[0], ctx[1], list(values)),
    serialized_type_name="lightning_vdnn.streaming.calls._Fields")


def _open(tree: Any) -> Any:
    def visit(leaf: Any) -> Any:
        if dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            names = tuple(f.name for f in dataclasses.fields(leaf) if f.init)
            return _Fields(leaf, names, [_open(getattr(leaf, n)) for n in names])
        return leaf
    return pytree.tree_map(visit, tree)


def _close(tree: Any) -> Any:
    def visit(node: Any) -> Any:
        if isinstance(node, _Fields):
            return dataclasses.replace(node.obj, **{n: _close(v) for n, v in zip(node.names, node.values)})
        return node
    return pytree.tree_map(visit, tree, is_leaf=lambda node: isinstance(node, _Fields))


class _Mark:
    """Stands in for tensor leaf ``k`` where a structure is kept without its tensors."""

    __slots__ = ("k",)

    def __init__(self, k: int) -> None:
        self.k = k


class Flat:
    """A structure taken apart: :attr:`tensors` are its tensor leaves in order; :meth:`rebuild` puts the structure
    back together around other tensors. It keeps no tensor itself (the caller decides what is saved)."""

    def __init__(self, tree: Any) -> None:
        leaves, self.spec = pytree.tree_flatten(_open(tree))
        self.tensors: list[Tensor] = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                leaves[i] = _Mark(len(self.tensors))
                self.tensors.append(leaf)
        self.leaves = leaves

    def take(self) -> list[Tensor]:
        """The tensor leaves, forgotten here."""
        tensors, self.tensors = self.tensors, []
        return tensors

    def rebuild(self, tensors: Sequence[Tensor]) -> Any:
        """The structure with ``tensors`` in place of its tensor leaves."""
        leaves = [tensors[leaf.k] if isinstance(leaf, _Mark) else leaf for leaf in self.leaves]
        return _close(pytree.tree_unflatten(leaves, self.spec))

    def names(self) -> list[str]:
        """A readable name per tensor leaf, for messages: ``args[0]``, ``position_embeddings[1]``."""
        named = [None] * sum(isinstance(leaf, _Mark) for leaf in self.leaves)
        for path, leaf in pytree.tree_flatten_with_path(pytree.tree_unflatten(self.leaves, self.spec))[0]:
            if isinstance(leaf, _Mark):
                named[leaf.k] = _describe(path)
        return named


def _describe(path: tuple) -> str:
    """``((args, kwargs), ...)`` paths as a user writes them: ``args[1]``, ``attention_mask``, ``x[0]['k']``."""
    text = pytree.keystr(path)
    if len(path) >= 2 and getattr(path[0], "idx", None) in (0, 1):
        head, rest = path[1], pytree.keystr(path[2:])
        if path[0].idx == 0:
            return f"args[{getattr(head, 'idx', head)}]{rest}"
        return f"{getattr(head, 'key', head)}{rest}"
    return text or "output"


class CallFlat(Flat):
    """A block call ``(args, kwargs)`` taken apart; :attr:`first` is the index of its first positional tensor
    (the hidden states; else its first tensor), whose dim 0 is the batch."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__((args, kwargs))
        positional = len(pytree.tree_leaves(_open(args)))  # leaves of args come first
        at = [leaf.k for leaf in self.leaves[:positional] if isinstance(leaf, _Mark)]
        self.first = at[0] if at else 0

    def call(self, fn: Any, tensors: Sequence[Tensor]) -> Any:
        args, kwargs = self.rebuild(tensors)
        return fn(*args, **kwargs)


class ChunkPlan:
    """Which of a call's tensors split into ``microbatches`` chunks along dim 0 (:attr:`split`) and which every
    chunk gets whole: the batch is dim 0 of the call's first positional tensor; a tensor whose dim 0 is that many
    rows splits; one of dim 0 of one row, a scalar, or one no dimension of which is the batch goes whole. A tensor
    ``transformers`` passes with the batch folded into dim 0 with another dimension, batch outermost
    (``hf_conventions.folded_batch``: Bloom's ALiBi bias, ``batch * heads`` rows), splits in runs of that many rows
    per sample (:attr:`fold`). A call that carries a key/value cache (generation: training calls have theirs taken
    out) runs as one chunk: the chunks would write their keys into the one cache one after another.

    Raises:
        ValueError: a tensor whose dim 0 is not the batch but another dimension is (a sequence-first layout): its
            batch dimension cannot be told. The message names the argument and what to do.
    """

    def __init__(self, call: CallFlat, tensors: Sequence[Tensor], microbatches: int, where: str) -> None:
        hidden = tensors[call.first] if tensors else None
        rows = hidden.size(0) if hidden is not None and hidden.dim() else 1
        count = max(1, min(microbatches, rows))
        if count > 1 and (any(is_cache(leaf) for leaf in call.leaves) or any(t.is_nested for t in tensors)):
            count = 1
        self.sizes = _sizes(rows, count)
        self.split = [False] * len(tensors)
        self.fold = [1] * len(tensors)  # rows of dim 0 per sample
        if count == 1:
            return
        names = None
        for j, t in enumerate(tensors):
            if t.dim() and t.shape[0] == rows:
                self.split[j] = True
                continue
            if t.dim() and t.shape[0] % rows == 0 and t.shape[0] != 1:
                names = names or call.names()
                if folded_batch(names[j]):
                    self.split[j], self.fold[j] = True, t.shape[0] // rows
                    continue
            if t.dim() and t.shape[0] != 1 and rows in t.shape[1:]:
                names = names or call.names()
                raise ValueError(
                    f"microbatches={microbatches} splits dim 0 of the arguments of {where} that hold the batch "
                    f"({rows} rows, dim 0 of {names[call.first]}), but {names[j]} has shape {tuple(t.shape)}: its "
                    "batch dimension cannot be told. Pass it batch-first (dim 0 the batch), with dim 0 of 1 to share "
                    "it across the batch, or use microbatches=1.")

    def chunks(self, tensors: Sequence[Tensor]) -> list[list[Tensor]]:
        """Each chunk's tensors: split ones their rows, the others whole."""
        if len(self.sizes) == 1:
            return [list(tensors)]
        parts = [t.split(self._rows(j)) if s else [t] * len(self.sizes)
                 for j, (t, s) in enumerate(zip(tensors, self.split))]
        return [[part[k] for part in parts] for k in range(len(self.sizes))]

    def _rows(self, j: int) -> list[int]:
        """Tensor ``j``'s dim-0 rows in each chunk."""
        return [size * self.fold[j] for size in self.sizes]

    def join_grads(self, grads: list[list[Optional[Tensor]]]) -> list[Optional[Tensor]]:
        """Per input tensor, the gradient of the whole call from each chunk's: split ones' rows written in
        order, whole ones' summed (last chunk first, the order backward ran them in)."""
        out: list[Optional[Tensor]] = []
        for j, split in enumerate(self.split):
            pieces = [g[j] for g in grads]
            if split:
                rows = Rows(self._rows(j))
                for k, piece in enumerate(pieces):
                    rows.put(k, piece)
                out.append(rows.out)
            else:
                total = None
                for piece in reversed(pieces):
                    if piece is not None:
                        total = piece if total is None else total + piece
                out.append(total)
        return out


def _sizes(rows: int, count: int) -> list[int]:
    """``rows`` in ``count`` chunks differing by at most one, larger ones first (``Tensor.tensor_split``'s)."""
    base, extra = divmod(rows, count)
    return [base + (k < extra) for k in range(count)]


class Rows:
    """Chunk results written into one tensor as they arrive, in any order: keeping the pieces for ``torch.cat``
    would hold the block's output twice. A single chunk is used as it is; a chunk that brings None (no gradient)
    leaves zeros in its rows, and ``out`` stays None if no chunk brings anything."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.starts = list(itertools.accumulate(sizes, initial=0))
        self.out: Optional[Tensor] = None
        self._empty: list[int] = []  # chunks that brought None before ``out`` existed

    def put(self, k: int, piece: Optional[Tensor]) -> None:
        """``piece`` is chunk ``k`` of the result (the same rows as chunk ``k`` of the input)."""
        if piece is None:
            if self.out is None:
                self._empty.append(k)
            else:
                self.out[self.starts[k]: self.starts[k + 1]].zero_()
            return
        if len(self.starts) == 2:
            self.out = piece
            return
        if self.out is None:
            self.out = piece.new_empty((self.starts[-1], *piece.shape[1:]))
            for j in self._empty:
                self.out[self.starts[j]: self.starts[j + 1]].zero_()
        self.out[self.starts[k]: self.starts[k + 1]].copy_(piece)


class Joined:
    """A block's results over the chunks of one call, joined leaf by leaf. The first chunk decides which leaves
    are per row (dim 0 its rows: written in order into one tensor) and which are not (the first chunk's is kept:
    every chunk computes it alike, and only the first chunk's gets a gradient in backward)."""

    def __init__(self, plan: ChunkPlan, where: str) -> None:
        self.plan, self.sizes, self.where = plan, plan.sizes, where
        self.wanted: list[bool] = []  # per result tensor, whether the block's forward made it differentiable
        self.flat: Optional[Flat] = None
        self.rows: list[Optional[Rows]] = []
        self.kept: list[Optional[Tensor]] = []

    @property
    def batched(self) -> list[bool]:
        return [r is not None for r in self.rows]

    def put(self, k: int, out: Any, given: tuple[int, ...]) -> None:
        """Chunk ``k``'s result; ``given``: the shape of the chunk's first positional tensor (for messages)."""
        flat = Flat(out)
        tensors = flat.take()
        if self.flat is None:
            self.flat = flat
            self.rows = [Rows(self.sizes) if t.dim() and t.size(0) == self.sizes[0] else None for t in tensors]
            self.kept = [None if r is not None else t for r, t in zip(self.rows, tensors)]
        elif flat.spec != self.flat.spec or len(tensors) != len(self.rows):
            raise ValueError(f"{self.where} returned a different structure for microbatch {k} than for the first; "
                             "blocks must return the same structure for every chunk of the batch, or use "
                             "microbatches=1.")
        for j, (rows, t) in enumerate(zip(self.rows, tensors)):
            if (rows is not None or j == 0) and len(self.sizes) > 1 and (not t.dim() or t.shape[0] != self.sizes[k]):
                # the first result (the hidden states) must keep the batch; so must any other that did in chunk 0
                raise ValueError(f"microbatches={len(self.sizes)} splits dim 0 of the batch, but {self.where} "
                                 f"returned shape {tuple(t.shape)} for a chunk of shape {given}. Blocks must keep "
                                 "dim 0 the batch (batch-first), or use microbatches=1.")
            if rows is not None:
                rows.put(k, t)

    def result(self) -> tuple[Flat, list[Tensor]]:
        """The joined structure and its tensors."""
        assert self.flat is not None, "no chunk was run"
        return self.flat, [r.out if r is not None else t for r, t in zip(self.rows, self.kept)]

    def grads_of_chunk(self, k: int, grads: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """The gradients chunk ``k``'s results receive out of those of the joined ones."""
        starts = list(itertools.accumulate(self.sizes, initial=0))
        out = []
        for batched, g in zip(self.batched, grads):
            if g is None:
                out.append(None)
            elif batched:
                out.append(g if len(self.sizes) == 1 else g[starts[k]: starts[k + 1]])
            else:
                out.append(g if k == 0 else None)
        return out

    def forget_values(self) -> None:
        """Keep the layout (which leaves are per row) for backward, not the tensors."""
        self.rows = [Rows(self.sizes) if r is not None else None for r in self.rows]
        self.kept = [None] * len(self.kept)


class StreamedCall:
    """A block's call taken over by streaming: ``module(...)`` runs ``streamed`` (the streamed forward, eagerly),
    and :attr:`run` is what runs the block itself inside it, from whichever weights stand in its parameters.

    A block compiled by itself (``block.compile()``) keeps its compiled call as :attr:`run`: each chunk, recompute
    and saving forward runs compiled, hooks included, as ``Module.compile`` compiles them (a recompute runs them
    again, as activation checkpointing does); ``streamed`` takes the compiled call's place, under our hooks'
    boundaries (``compiled.py``). Any other block's instance ``forward`` is replaced, and :attr:`run` is its own.
    The streamed call is never compiled (``torch.compiler.disable``): inside a model compiled as a whole each block
    call is a graph break by design, the block running eagerly in it unless compiled by itself.
    """

    def __init__(self, module: nn.Module, streamed: Any) -> None:
        self.module = module
        self.own = vars(module).get("forward")
        self.compiled = inner_call(getattr(module, "_compiled_call_impl", None))
        streamed = torch.compiler.disable(streamed)
        if self.compiled is not None:
            self.run = self.compiled
            set_inner_call(module, streamed)
        else:
            self.run = module.forward
            module.forward = streamed

    def restore(self) -> None:
        """The block's own call back."""
        if self.compiled is not None:
            set_inner_call(self.module, self.compiled)
        elif self.own is None:
            vars(self.module).pop("forward", None)
        else:
            self.module.forward = self.own

