"""Selective (op-level) recompute: a recomputed layer keeps the outputs of its expensive ops and rebuilds only the
cheap ones in backward (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models";
torchtitan's "op-level selective AC").

:data:`SAVED_OPS` is the policy, defined here once: matrix multiplies, attention and convolutions, compute-bound
kernels whose outputs are worth their bytes. Everything else a layer runs (norms, activations, residual adds,
dropout, views) is memory-bound and cheap to run again. For a GPT block the saved outputs are about 60% of what
the block saves for backward (the MLP's 4h-wide GELU output and the norms' outputs are not among them) and the
recompute costs the pointwise kernels' time, a few percent of the block's forward on a GPU.

The mechanism is torch's own (``torch.utils.checkpoint.create_selective_checkpoint_contexts`` with a
:class:`~torch.utils.checkpoint.CheckpointPolicy` per op), under the layer's non-reentrant checkpoint
(``offload/recompute.py``). How it meets the offloader's saved-tensor hooks: the checkpoint's inputs are saved
through them (kept or offloaded like any save), but the outputs SAC keeps are not saved by autograd at all: its
caching ``TorchDispatchMode`` holds them (detached) in a dictionary of the checkpoint until the recompute takes
them, so no ``saved_tensors_hooks`` ever sees them (a reproduction: a ``pack`` hook around
``checkpoint(lambda x: lin2(gelu(lin1(x))), x, context_fn=...)`` with ``addmm`` saved sees ``x`` alone). They
stay on the device, which is where a plan keeps a recomputed layer's saves anyway; :class:`SavedOpsProbe`
counts them in the profiling pass so that the plan counts them as held.

A layer is not recomputed selectively when its forward modifies a saved op's output in place (an in-place ReLU
after a convolution): SAC refuses to hand back a cached tensor that changed after it was cached.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from lightning_vdnn.units import host_clock

_aten = torch.ops.aten


def _ops(*names: str) -> frozenset:
    """The default overloads of these aten ops that this torch build has."""
    return frozenset(getattr(_aten, n).default for n in names if hasattr(_aten, n))


#: Ops whose outputs a selectively recomputed layer keeps: compute-bound (matrix multiplies, attention,
#: convolutions). The rest of the layer is recomputed in backward.
SAVED_OPS: frozenset = _ops(
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward")


def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """SAC's policy: keep :data:`SAVED_OPS`' outputs and those of every op that draws random numbers, recompute
    the rest. The recompute replays the forward's RNG state from its start, so it draws what forward drew only if
    it runs every random op forward ran: with one kept (CUDA's flash attention with dropout draws inside the
    kernel) the dropouts after it would draw other masks. Kept, none is run again and nothing is drawn."""
    if op in SAVED_OPS or _draws(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _draws(op: Any) -> bool:
    """A random op whose output SAC can keep: not one that writes its input (``bernoulli_``, whose result SAC
    would find mutated; recomputed, it draws again from the replayed state, as it does today)."""
    schema = getattr(op, "_schema", None)
    mutates = schema is not None and schema.is_mutable
    return torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()) and not mutates


def contexts(held: Optional[Callable[[torch.Tensor], None]] = None) -> tuple:
    """``checkpoint(..., context_fn=functools.partial(contexts, held))``: the forward under SAC with :func:`policy`;
    ``held`` is called in forward with each tensor SAC keeps (``ctx.op_output``), the offloader's count of them."""
    if held is None:
        return create_selective_checkpoint_contexts(policy)

    def counted(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        decision = policy(ctx, op, *args, **kwargs)
        # a torch whose SAC asks the policy before the op runs (2.11: no ``op_output``): kept outputs go uncounted
        # in the ledger (the measured peak still sees them)
        if decision == CheckpointPolicy.MUST_SAVE and hasattr(ctx, "op_output"):
            for t in _tensors(ctx.op_output):
                held(t)
        return decision

    return create_selective_checkpoint_contexts(counted)


@dataclass(frozen=True)
class OpsFacts:
    """One layer's ops as a selective recompute sees them.

    Attributes:
        kept_bytes: the storages of its :data:`SAVED_OPS`' outputs, whole and each once.
        saved_bytes: of those, the storages autograd saves too (counted by ``recompute_probe.LayerProbe``).
        share: the share of its op time the other ops take.
        mutated: a kept output is modified in place later in its forward.
    """

    kept_bytes: int
    saved_bytes: int
    share: float
    mutated: bool


class SavedOpsProbe(TorchDispatchMode):
    """Watches one layer's forward at a time in the profiling pass (which recomputes nothing): per layer, the bytes
    of :data:`SAVED_OPS`' outputs (whole storages, each once: what SAC would hold), the share of the forward's op
    time the other ops take (what a selective recompute costs of the forward), and whether a saved output is
    modified in place (then it may not be recomputed selectively).

    Op times are host clocks on a CPU and CUDA events on a GPU (read in :meth:`share`, after the pass); the
    offloader's own work inside its pack hook is left out (:meth:`paused`). Watching costs host time per op (a
    Python dispatch mode), which on a GPU can slow a layer's forward that the pass also times: the offloader
    watches a layer's ops once per input shapes and reuses the facts in later profiling passes (``warmup``).
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.cuda = device.type == "cuda"
        self.bytes: dict[int, int] = collections.defaultdict(int)
        self.mutated: set[int] = set()
        self.watched: set[int] = set()
        self._storages: dict[int, tuple[weakref.ref, int]] = {}  # address -> (storage, layer)
        self._times: dict[int, list] = collections.defaultdict(list)  # layer -> [(saved op, start, end)]
        self._group: Optional[int] = None
        self._paused = 0

    def enter(self, group: int) -> None:
        """Layer ``group``'s forward starts: watch its ops."""
        self.exit()
        self._group = group
        self.watched.add(group)
        self.__enter__()

    def exit(self) -> None:
        """Its forward returned (or failed)."""
        if self._group is not None:
            self._group = None
            self.__exit__(None, None, None)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def cached_storage(self, t: torch.Tensor, group: int) -> bool:
        """Whether ``t`` lies in a saved op's output of layer ``group``."""
        seen = self._storages.get(t.untyped_storage().data_ptr())
        return seen is not None and seen[1] == group and seen[0]() is t.untyped_storage()

    def share(self, group: int) -> float:
        """The share of layer ``group``'s op time that a selective recompute runs again."""
        spans = self._times.get(group, [])
        if self.cuda and spans:
            spans[-1][2].synchronize()
            spans = [(saved, start.elapsed_time(end)) for saved, start, end in spans]
        total = sum(ms for _, ms in spans)
        return sum(ms for saved, ms in spans if not saved) / total if total > 0 else 1.0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        group = self._group
        if group is None or self._paused:
            return func(*args, **kwargs)
        if func._schema.is_mutable and any(self.cached_storage(t, group) for t in _tensors((args, kwargs))):
            self.mutated.add(group)
        start = torch.cuda.Event(enable_timing=True) if self.cuda else host_clock()
        if self.cuda:
            start.record()
        out = func(*args, **kwargs)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._times[group].append((func in SAVED_OPS, start, end))
        else:
            self._times[group].append((func in SAVED_OPS, (host_clock() - start) * 1e3))
        if func in SAVED_OPS:
            for t in _tensors(out):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self._storages or self._storages[storage.data_ptr()][0]() is not storage:
                    self._storages[storage.data_ptr()] = (weakref.ref(storage), group)
                    self.bytes[group] += storage.nbytes()
        return out


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]
