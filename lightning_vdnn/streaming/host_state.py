"""The host side of L2L layer streaming: each block's parameters and gradients as views of flat host buffers.

Keeping one flat (pinned) buffer per block makes a block one host->device copy, and makes the
``nn.Parameter`` objects the user's optimizer holds the host master weights themselves, so
``state_dict()``, optimizer state and checkpoints never touch the device.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_vdnn.offload.host_pool import wait_for
from lightning_vdnn.streaming.pinned_arena import PinnedArena


def host_empty(numel: int, dtype: torch.dtype, pin: bool) -> Tensor:
    """A host buffer, page-locked if asked; falls back to pageable memory with one warning."""
    if pin:
        try:
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        except RuntimeError as err:
            warnings.warn(f"lightning_vdnn: pinning host memory for layer streaming failed ({err}); using pageable "
                          "memory, so weight copies are slower and synchronous.", stacklevel=3)
    return torch.empty(numel, dtype=dtype)


def give_back_pinned() -> None:
    """Return the pinned memory torch's caching host allocator holds unused to the OS (freed buffers stay cached
    otherwise); a no-op where this torch has no ``torch.accelerator.empty_host_cache`` or CUDA is not started."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        empty()


class HostBlock:
    """One block's parameters as views of one flat host buffer, and their gradients likewise.

    The gradient buffers (the device one backward packs into, the host one it is copied to) hold the trained
    parameters only (``requires_grad``), packed in order: a frozen one (LoRA's base weights) costs no host memory
    for a gradient and no bytes over PCIe. Which parameters train is read again at each of the block's backwards
    (:meth:`check_layout`), so freezing or unfreezing during training is followed.

    ``alloc(numel, dtype)`` makes the host buffers (default :func:`host_empty`; a streamer passes its
    :class:`PinnedArena`'s)."""

    def __init__(self, index: int, module: nn.Module, pin: bool,
                 alloc: Optional[Callable[[int, torch.dtype], Tensor]] = None) -> None:
        self.index, self.module = index, module
        self._alloc = alloc or (lambda numel, dtype: host_empty(numel, dtype, pin))
        self.updates = 0  # host optimizer steps so far (fused kernels do not bump tensor versions)
        self.read_done: Any = None  # the last copy of ``flat`` to the device (an update must wait for it)
        #: the weights in the slots' dtype, when it is narrower (bf16): written in the update's pass, and what a
        #: load copies (half the bytes of ``flat``); None: loads copy ``flat`` and cast on the device
        self.copy: Optional[Tensor] = None
        self.copy_version = -1
        self._copy_views: Optional[tuple[Tensor, list[Tensor]]] = None  # (copy, its views): made once per copy
        self.params: list[nn.Parameter] = list(module.parameters())
        slot = {id(p): k for k, p in enumerate(self.params)}
        self.refs = [(m, name, slot[id(p)]) for m in module.modules()
                     for name, p in m._parameters.items() if p is not None]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"Block {index} ({type(module).__name__}) mixes parameter dtypes "
                             f"{sorted(map(str, dtypes))}; layer streaming keeps one flat buffer per block and "
                             "needs one dtype.")
        self.dtype = dtypes.pop()
        self.shapes = [p.shape for p in self.params]
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.numel = self.offsets[-1]
        # what the device slots hold (``padded``), and what one load reads from / one gradient copy writes to
        # the host: the whole block here; a rank's range of it when partitioned (``streaming/sharded.py``)
        self.padded = self.load_numel = self.numel
        self.flat = self._alloc(self.numel, self.dtype)
        self.views = self.split(self.flat)
        with torch.no_grad():
            for p, v in zip(self.params, self.views):
                v.copy_(p.detach())
                p.data = v
        self._init_grads(pin)

    def _init_grads(self, pin: bool) -> None:
        """The host gradient buffer: the trained parameters', ``p.grad`` views of it once gradients land."""
        self._layout_grads()
        self.grad_flat = self._grad_buffer(self.dtype)
        self.grad_views = self.grad_split(self.grad_flat)
        for p in self.params:
            if p.grad is not None:
                p.grad = p.grad.to("cpu")

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped like this block's parameters."""
        return [flat[a:b].view(s) for a, b, s in zip(self.offsets, self.offsets[1:], self.shapes)]

    def leaves(self, buf: Tensor) -> list[Tensor]:
        """This block's weights in the device buffer ``buf`` as autograd leaves, each wanting a gradient where its
        parameter does: what a forward with autograd runs on (the recompute, a saving block's forward)."""
        return [v.detach().requires_grad_(p.requires_grad) for v, p in zip(self.split(buf), self.params)]

    def _layout_grads(self, every: bool = False) -> None:
        """Where each parameter's gradient sits in the packed gradient buffers: the trained ones in order (every one
        with ``every``, a layout that does not depend on which train); :attr:`pack_numel` elements in all, which
        is also the host buffer's :attr:`grad_numel` here (a rank's range of it when partitioned)."""
        self.trained = tuple(p.requires_grad for p in self.params)
        self.grad_spans: list[Optional[tuple[int, int]]] = []
        at = 0
        for p, trained in zip(self.params, self.trained):
            self.grad_spans.append((at, at + p.numel()) if trained or every else None)
            at += p.numel() if trained or every else 0
        self.pack_numel = self.grad_numel = at

    def _grad_buffer(self, dtype: torch.dtype) -> Tensor:
        """A host gradient buffer for the current layout (none of the arena's memory for a frozen block)."""
        return self._alloc(self.grad_numel, dtype) if self.grad_numel else torch.empty(0, dtype=dtype)

    def grad_split(self, flat: Tensor) -> list[Optional[Tensor]]:
        """Views of the packed gradients ``flat`` shaped like the parameters; None for a frozen one."""
        return [None if span is None else flat[span[0]:span[1]].view(shape)
                for span, shape in zip(self.grad_spans, self.shapes)]

    def check_layout(self) -> None:
        """Before the block's backward packs its gradients: if which parameters train changed, lay the gradient
        buffers out again (:meth:`_relayout`)."""
        if tuple(p.requires_grad for p in self.params) != self.trained:
            self._relayout()

    def _relayout(self) -> None:
        """A new host gradient buffer for the parameters that train now; gradients already held move to storage
        of their own."""
        self._release_grads()
        self._layout_grads()
        self.grad_flat = self._grad_buffer(self.grad_flat.dtype)
        self.grad_views = self.grad_split(self.grad_flat)

    @contextlib.contextmanager
    def substituted(self, tensors: list[Tensor]) -> Iterator[None]:
        """Run the block with ``tensors`` in place of its parameters (what ``functional_call`` does, without
        calling ``module.forward``, which streaming replaces with the streamed forward itself)."""
        saved = [m._parameters[name] for m, name, _ in self.refs]
        for m, name, k in self.refs:
            m._parameters[name] = tensors[k]
        try:
            yield
        finally:
            for (m, name, _), p in zip(self.refs, saved):
                m._parameters[name] = p

    def pack_grads(self, dev: Tensor, grads: list[Optional[Tensor]], first: bool) -> None:
        """Write (first microbatch) or add (later ones) weight grads into the packed device buffer ``dev``
        (:attr:`pack_numel` elements; a frozen parameter has no place there, and no gradient)."""
        with torch.no_grad():
            for view, g in zip(self.grad_split(dev), grads):
                if view is None:
                    continue
                if first:
                    view.zero_() if g is None else view.copy_(g)
                elif g is not None:
                    view.add_(g)

    def version(self) -> int:
        """Changes whenever a parameter is written in place (optimizer step, ``load_state_dict``)."""
        return sum(p._version for p in self.params) + self.updates

    # -- the compute-dtype copy a device slot loads, written by the host update (``streaming/host_update.py``) --
    def copy_views(self) -> Optional[list[Tensor]]:
        """Views of :attr:`copy` shaped like the parameters, or None without one (made once: the host update asks
        every step, on a worker that must win the GIL back after every op)."""
        if self.copy is None:
            return None
        if self._copy_views is None or self._copy_views[0] is not self.copy:
            self._copy_views = (self.copy, self.split(self.copy))
        return self._copy_views[1]

    def copy_current(self) -> bool:
        """Whether :attr:`copy` holds the current weights (nothing wrote them since it was made)."""
        return self.copy is not None and self.copy_version == self.version()

    def copy_written(self, current: bool) -> None:
        """An update ran: :attr:`copy` is current if it was before and the update wrote it too."""
        if self.copy is not None:
            self.copy_version = self.version() if current else -1

    def fresh_copy(self) -> Tensor:
        """:attr:`copy`, cast again from the weights when anything else wrote them (a checkpoint's load, another
        optimizer): round to nearest, what the device's cast of the fp32 weights gives."""
        if not self.copy_current():
            self.copy.copy_(self.flat)
            self.copy_version = self.version()
        return self.copy

    # -- what the host optimizer steps (``streaming/host_optimizer.py``): parameter ``k`` and its gradient -------------
    def master_view(self, k: int) -> Optional[Tensor]:
        """The host weights of parameter ``k`` the block's optimizer writes: all of them, as ``p``'s shape."""
        return self.params[k].detach()

    def grad_of(self, k: int) -> Optional[Tensor]:
        """Parameter ``k``'s gradient, shaped like :meth:`master_view` (None before any has landed)."""
        return self.params[k].grad

    def clear_grads(self, keys: list[int], set_to_none: bool) -> None:
        """``optimizer.zero_grad()`` ran over parameters ``keys``: ``p.grad`` is the record, nothing to do."""

    def can_adopt(self) -> bool:
        """Whether the next gradients may be copied straight into ``grad_flat`` (no trained parameter has one)."""
        return all(p.grad is None for p, trained in zip(self.params, self.trained) if trained)

    def adopt(self) -> None:
        """The gradients were copied straight into ``grad_flat``: point the trained ``p.grad`` at them."""
        for p, v in zip(self.params, self.grad_views):
            if v is not None:
                p.grad = v

    def check_accumulation(self, again: bool) -> None:
        """Hook (``streaming/bf16_grads.py``): raise if gradients may not be added to this block's (``again``: a
        second call of the block in this backward)."""

    def accumulate(self, grads: Tensor) -> None:
        """Add the packed ``grads`` into the trained ``p.grad`` as autograd would: set when None, else add."""
        held = [(p, v) for p, v in zip(self.params, self.grad_views) if v is not None]
        if all(p.grad is None for p, _ in held):
            self.grad_flat.copy_(grads)
            self.adopt()
            return
        if all(p.grad is v for p, v in held):
            self.grad_flat.add_(grads)
            return
        for (p, v), new in zip(held, (g for g in self.grad_split(grads) if g is not None)):
            if p.grad is None:
                v.copy_(new)
                p.grad = v
            else:
                p.grad.add_(new)

    # -- the end of streaming (``streaming/host_release.py``): part by part, as their pinned chunks are freed ----------
    def buffers(self) -> dict[str, Optional[Tensor]]:
        """The host buffers this block holds, by part (None once released)."""
        return {"copy": self.copy, "grads": self.grad_flat, "weights": self.flat}

    def kept_bytes(self, part: str) -> int:
        """Bytes releasing ``part`` copies into ordinary memory: the weights, and the gradients in ``p.grad``."""
        if part == "weights":
            return sum(p.nbytes for p in self.params if _within(p, self.flat))
        if part == "grads":
            return sum(p.grad.nbytes for p in self.params if p.grad is not None and _within(p.grad, self.grad_flat))
        return 0  # the compute-dtype copy is dropped

    def release_part(self, part: str) -> None:
        """Give the parameters (``"weights"``) or their gradients (``"grads"``) that live in that buffer their own
        ordinary storage, or drop the compute-dtype ``"copy"``, and let go of the buffer."""
        with torch.no_grad():
            if part == "copy":
                self.copy, self._copy_views = None, None
            elif part == "grads" and self.grad_flat is not None:
                self._release_grads()
                self.grad_flat, self.grad_views = None, []
            elif part == "weights" and self.flat is not None:
                for p in self.params:
                    if _within(p, self.flat):
                        p.data = p.data.clone()
                self.flat, self.views = None, []

    def _release_grads(self) -> None:
        for p in self.params:
            if p.grad is not None and self.grad_flat.numel() and _within(p.grad, self.grad_flat):
                p.grad = p.grad.clone()

    def release(self) -> None:
        """Every part at once: ordinary CPU parameters (and gradients) again, the host buffers let go."""
        for part in self.buffers():
            self.release_part(part)


def _within(t: Tensor, buffer: Optional[Tensor]) -> bool:
    """Whether ``t`` is a view of ``buffer``'s storage (an arena's chunk, shared with other blocks' buffers)."""
    return buffer is not None and t.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def add_copies(blocks: Iterable[HostBlock], dtype: torch.dtype, pin: bool) -> PinnedArena:
    """Give each block without one a host copy of its weights in ``dtype`` (the slots'), from one arena, returned:
    its chunks stay page-locked until it frees them (``streaming/host_release.py``)."""
    blocks = [b for b in blocks if b.copy is None]
    arena = PinnedArena(pin, total=sum(b.numel * dtype.itemsize for b in blocks))
    for block in blocks:
        block.copy = arena.empty(block.numel, dtype)
    return arena


def accumulate_from(block: HostBlock, host: Tensor, done: Any) -> None:
    wait_for(done)
    with torch.no_grad():
        block.accumulate(host)


def adopt_grads(block: HostBlock, done: Any) -> None:
    """The device copied the block's gradients straight into ``grad_flat``: make them the block's."""
    wait_for(done)
    block.adopt()


def check_sharing(root: nn.Module, container: nn.Module, path: str) -> None:
    owner: dict[int, int] = {}
    for i, block in enumerate(container):
        params = list(block.named_parameters())
        if not params:
            raise ValueError(f"Block {i} at layers={path!r} ({type(block).__name__}) has no parameters to stream; "
                             "point layers at the repeated blocks that hold the weights.")
        for name, p in params:
            if owner.setdefault(id(p), i) != i:
                raise ValueError(
                    f"Blocks {owner[id(p)]} and {i} at layers={path!r} share a parameter (block {i}'s {name}: the "
                    "model reuses one module in several blocks); layer streaming keeps each block's weights in its "
                    "own host buffer. Train this model with activation offload alone (strategy='vdnn_all', or "
                    "layer_streaming=False), or stream a list of blocks that share nothing.")
    inside = {id(m) for b in container for m in b.modules()}
    for m in root.modules():
        if id(m) in inside:
            continue
        for name, p in m._parameters.items():
            if p is not None and id(p) in owner:
                raise ValueError(f"{type(m).__name__}.{name} outside layers={path!r} is a parameter of block "
                                 f"{owner[id(p)]}; untie it or stream a container that holds both.")


def move_except(root: nn.Module, device: torch.device, keep: set[int]) -> None:
    """``root.to(device)`` for every parameter not in ``keep`` and every buffer (tied weights move once)."""
    with torch.no_grad():
        for m in root.modules():
            for p in m._parameters.values():
                if p is not None and id(p) not in keep and p.device != device:
                    p.data = p.data.to(device)
                    if p.grad is not None:
                        p.grad = p.grad.to(device)
            for name, b in m._buffers.items():
                if b is not None and b.device != device:
                    m._buffers[name] = b.to(device)


def state_to_host(optimizer: Optimizer, params: Iterable[Tensor]) -> None:
    """The optimizer state of ``params`` in host memory: Lightning moves all state to the device on set-up and
    when loading a checkpoint. ``step`` comes too: torch's fused and capturable kernels keep it beside the
    parameter, and the host's fused kernel wants it on the host."""
    state_to_device(optimizer, params, torch.device("cpu"))


def state_to_device(optimizer: Optimizer, params: Iterable[Tensor], device: torch.device) -> None:
    """The optimizer state of ``params`` on ``device``, where torch keeps it for a parameter there: per-element
    tensors always; ``step`` only on the host or for a fused or capturable group (torch's other kernels read it
    on the host, and a fused CUDA kernel refuses it there)."""
    device = torch.device(device)
    beside = {id(p) for g in optimizer.param_groups if g.get("fused") or g.get("capturable") for p in g["params"]}
    for p in params:
        state = optimizer.state.get(p, {})
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.device == device:
                continue
            if key != "step" or device.type == "cpu" or id(p) in beside:
                state[key] = value.to(device)


def optimizer_state_bytes(optimizers: Iterable[Optimizer], params: Optional[Iterable[Tensor]] = None,
                          device: Optional[torch.device] = None) -> int:
    """Bytes of per-element optimizer state (not ``step`` counts) of ``params`` (default: every parameter with
    state), on ``device`` only if given."""
    total = 0
    for opt in optimizers:
        states = opt.state.values() if params is None else (opt.state.get(p, {}) for p in params)
        for state in states:
            if not isinstance(state, dict):
                continue
            total += sum(v.nbytes for k, v in state.items()
                         if isinstance(v, Tensor) and k != "step" and (device is None or v.device == device))
    return total
