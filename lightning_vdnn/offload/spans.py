"""What the offloader moves: the byte span of storage a saved tensor covers, the record of one span copied to the
host, which saved tensors are weights (never copied), and which layers' inputs the ``"conv"`` policy moves; sets of
storages that tell a storage from a later one at its address."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

Span = tuple[int, int, int]  # (storage address, first byte, end byte)


class StorageSet:
    """Storages by address, without keeping them alive: a freed storage's address may be reused, so only the storage
    itself is a member."""

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, storage: torch.UntypedStorage) -> None:
        self._refs[storage.data_ptr()] = weakref.ref(storage)

    def __contains__(self, storage: torch.UntypedStorage) -> bool:
        ref = self._refs.get(storage.data_ptr())
        return ref is not None and ref() is storage

# Layers whose inputs the "conv" policy offloads: expensive to recompute, large to keep (vDNN_conv).
EXPENSIVE_LAYERS: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.MultiheadAttention,
)


def is_expensive(module: nn.Module) -> bool:
    return isinstance(module, EXPENSIVE_LAYERS) or type(module).__name__.endswith("Attention")


def span_of(t: torch.Tensor, address: Optional[int] = None) -> tuple[Span, int]:
    """The byte span of its storage that ``t`` covers, as (address, first byte, end byte), and its length: two
    saves of one tensor (or of views covering the same bytes) have the same span, and move once. ``address``: its
    storage's, where the caller has it. (Runs for every saved tensor: a contiguous one's span is its elements.)"""
    itemsize = t.element_size()
    if t.is_contiguous() and t.numel():
        nbytes = t.numel() * itemsize
    else:
        nbytes = (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * itemsize
    lo = t.storage_offset() * itemsize
    return (t.untyped_storage().data_ptr() if address is None else address, lo, lo + nbytes), nbytes


class Offloaded:
    """One span of device memory copied to the host, and where its bytes live now."""

    __slots__ = ("nbytes", "lo", "host", "group", "src", "pending", "hold", "dev", "dev_lo", "ready",
                 "last_use", "used", "release", "__weakref__")

    def __init__(self, nbytes: int, lo: int, host: torch.Tensor, group: int, src: torch.UntypedStorage,
                 pending: torch.Tensor, d2h_done: object, release) -> None:
        self.nbytes, self.lo, self.host, self.group = nbytes, lo, host, group
        self.src = weakref.ref(src)  # the original storage, for dedupe
        self.pending = pending       # keeps the source alive until its device->host copy is done
        self.hold = None             # a device copy waiting for its first unpack
        self.dev = weakref.ref(src)  # wherever the bytes are on the device now, if anywhere
        self.dev_lo = 0              # byte offset of this span inside ``dev``
        self.ready = None            # event the consumer waits for before reading ``dev``
        self.last_use = d2h_done     # last copy touching ``host``: the pool's next writer waits for it
        self.used = False            # backward has read it at least once
        self.release = release

    def __del__(self) -> None:
        self.release(self.host, self.last_use)


def never_copied(t: torch.Tensor, device: torch.device, params: set[int]) -> bool:
    """Saved as itself, never copied: on another device than ``device``, a layout not copied as bytes, or a
    weight (storage in ``params``, the addresses of the model's parameters and buffers; parameters, their views
    and autocast copies)."""
    if (t.device != device or t.layout != torch.strided or t.numel() == 0 or t.is_quantized
            or t.is_nested or t.is_conj() or t.is_neg()):
        return True
    return t.untyped_storage().data_ptr() in params or is_weight(t)


def is_weight(t: torch.Tensor) -> bool:
    """A parameter, a view of one, or an autocast copy of one: weights, not activations."""
    return _is_param(t) or _is_param_cast(t)


def _is_param(t: torch.Tensor) -> bool:
    """A parameter, or a view of one, in memory that was not its storage when the pass began: DeepSpeed ZeRO-3
    gathers each layer's weights into fresh memory for forward, frees it after, and gathers again for backward.
    Saved as itself, backward reads the re-gathered weight; a copy would hold the gathered memory all along."""
    base = t._base
    return _parameter(t) or (base is not None and _parameter(base))


def _parameter(t: torch.Tensor) -> bool:
    """``isinstance(t, nn.Parameter)``. Parameter's metaclass answers it in Python for every tensor; for a plain
    ``torch.Tensor`` all it can find is the ``_is_param`` flag, read here directly (every saved tensor passes)."""
    if type(t) is torch.Tensor:
        return bool(getattr(t, "_is_param", False))
    return isinstance(t, nn.Parameter)


def _is_param_cast(t: torch.Tensor) -> bool:
    """An autocast copy of a parameter (``ToCopy`` straight from a leaf): cheap to remake, held by the cast
    cache through forward anyway, and weight memory is the streaming feature's business, not vDNN's."""
    fn = t.grad_fn
    if fn is None or fn.name() != "ToCopyBackward0":
        return False
    nxt = fn.next_functions
    return bool(nxt) and nxt[0][0] is not None and type(nxt[0][0]).__name__ == "AccumulateGrad"

