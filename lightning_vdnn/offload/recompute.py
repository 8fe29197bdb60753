"""Run the layers a plan marks "recompute" under activation checkpointing, without touching the user's code.

Each chosen layer module gets a ``forward`` on the instance that, when the offloader says the call starting now is
one to recompute, runs the module's own forward through ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``: nothing from inside the layer is saved for backward, and its first saved tensor needed in
backward runs it again, with the RNG state (dropout draws the same masks) and autocast state of the forward.

How it meets the offloader's hooks: the checkpoint saves the layer's tensor inputs through whatever
``saved_tensors_hooks`` are active, so they reach the offloader's pack hook in the layer's group and are kept or
offloaded like any other save; inside the layer the checkpoint's own hooks sit on top of the offloader's, so the
layer's internal tensors never reach it (neither in forward nor when recomputed in backward: they are not counted
as layer bytes, not offloaded). The recompute calls the module's own forward directly, not the module, so its
forward pre-hook does not fire again and cannot open a new layer group in backward. A module compiled by itself
(``block.compile()``) is wrapped the same way one level out: the checkpoint runs around its compiled call, inside
our call hooks (``compiled.py``), so the compiled graph is unchanged and its recompute runs that graph again.

A layer the plan recomputes selectively runs under the same checkpoint with ``context_fn`` set to torch's selective
checkpoint contexts (``offload/selective.py``): the outputs of its matrix multiplies and attention are kept (held
by the checkpoint, outside the offloader's hooks, which :class:`Recompute` ``held`` reports to it), the cheap ops
between them run again in backward.

The decision is per call, by the layer's position in forward (a module called twice is two layers): the wrapper
asks ``decide`` at each call. It is removed when the plan changes (:meth:`Recomputer.install`) and at
:meth:`Recomputer.close`; the module's own ``forward`` is then what it was.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable, ContextManager, Iterable, NamedTuple, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten
from torch.utils.checkpoint import _checkpoint_without_reentrant_generator as _checkpoint_generator
from torch.utils.checkpoint import checkpoint, noop_context_fn

from lightning_vdnn.buffers import BufferWatch
from lightning_vdnn.compiled import inner_call, is_compiled, set_inner_call
from lightning_vdnn.layers import wrap_forward
from lightning_vdnn.offload.selective import contexts

#: A context manager factory that times one recompute in backward.
Timer = Callable[[], ContextManager]


class Recompute(NamedTuple):
    """What ``decide`` returns for a call to recompute.

    Attributes:
        timer: times its recompute in backward.
        held: None: recompute the whole layer (nothing from inside it is saved); else recompute it selectively
            (``offload/selective.py``), ``held`` being called with each op output the checkpoint keeps.
    """

    timer: Timer
    held: Optional[Callable[[torch.Tensor], None]] = None


class Recomputer:
    """Wraps the forward of chosen modules so that calls ``decide`` picks run under a checkpoint.

    Args:
        decide: called as a wrapped module's forward starts; None runs it plainly, a :class:`Recompute` runs it
            under a checkpoint, whole or selective, and times its recompute in backward (a :data:`Timer` alone:
            whole, timed so).
    """

    def __init__(self, decide: Callable[[], "Optional[Recompute | Timer]"]) -> None:
        self._decide = decide
        self._restore: dict[nn.Module, Callable[[], None]] = {}  # wrapped module -> what unwraps it

    @property
    def modules(self) -> frozenset[nn.Module]:
        return frozenset(self._restore)

    def install(self, modules: Iterable[nn.Module]) -> None:
        """Wrap exactly ``modules``: unwrap the others, wrap the new ones."""
        wanted = {id(m): m for m in modules}
        for module in [m for m in self._restore if id(m) not in wanted]:
            self._unwrap(module)
        for module in wanted.values():
            if module not in self._restore:
                self._wrap(module)

    def close(self) -> None:
        self.install(())

    def _wrap(self, module: nn.Module) -> None:
        decide = self._decide
        watch = BufferWatch(module)  # BatchNorm's statistics: updated by the forward, not again by the recompute

        def forward(inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            how = decide()
            if how is None:
                return inner(*args, **kwargs)
            if not isinstance(how, Recompute):
                how = Recompute(how)
            # tensors given by keyword go in as positional arguments too: the checkpoint saves (and so offloads)
            # only those, and takes the devices whose RNG state it replays from them; none can collide with its
            # own keyword arguments
            names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
            rest = {k: v for k, v in kwargs.items() if k not in names}

            def call(*flat: Any) -> Any:
                return inner(*flat[: len(args)], **rest, **dict(zip(names, flat[len(args):])))

            context = noop_context_fn if how.held is None else functools.partial(contexts, how.held)
            return checkpoint(_replay(call, how.timer, watch), *args, *(kwargs[k] for k in names),
                              use_reentrant=False, preserve_rng_state=True, context_fn=context)

        if is_compiled(module):  # around the compiled call, under our boundaries: never inside compiled code
            compiled = inner_call(module._compiled_call_impl)
            set_inner_call(module, lambda *args, **kwargs: forward(compiled, *args, **kwargs))
            self._restore[module] = lambda: set_inner_call(module, compiled)
        else:
            self._restore[module] = wrap_forward(module, forward)

    def _unwrap(self, module: nn.Module) -> None:
        self._restore.pop(module)()


def _replay(run: Callable[..., Any], timer: Timer, watch: BufferWatch) -> Callable[..., Any]:
    """``run``, the first call plain (the forward), the later ones (recomputes in backward) under ``timer``, with
    the buffers that forward wrote as they were before it (``buffers.py``)."""
    calls, snap = 0, watch.snapshot()

    def call(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            out = run(*args)
            watch.learn(snap)
            return out
        with timer(), watch.replayed(snap):
            return run(*args)

    return call


class SegmentRunner:
    """Runs each planned segment, a run of consecutive layers ``[start, end)``, under one non-reentrant checkpoint:
    its first layer's tensor inputs are saved (through the offloader's hooks: kept or offloaded), nothing from inside
    the run is, and the first saved tensor backward needs runs the whole run again (Chen et al.'s sqrt(n)
    checkpointing, on boundaries a plan chooses).

    The run is not one function of the user's code: its layers are called one by one by the model's forward. The
    checkpoint opens as the first layer's forward starts (``torch.utils.checkpoint``'s own generator, entered and left
    around the run) and closes as the last one returns; the recompute calls the recorded layers again in order,
    each on the previous one's output (the profiling pass checked that the run is such a chain: each later layer
    takes the previous one's output, and the code between saves nothing, ``offload/recompute_probe.py``), with
    the RNG and autocast state of the forward and each layer's written buffers replayed (``buffers.py``). Other
    tensors a later layer takes (an attention mask, rotary tables) need no gradient and are held as given.
    """

    def __init__(self) -> None:
        self.segments: dict[int, int] = {}  # start -> end (exclusive)
        self._watches: dict[nn.Module, BufferWatch] = {}
        self._open: Optional[_OpenSegment] = None

    def install(self, segments: Iterable[tuple[int, int]]) -> None:
        """Run exactly these segments from the next pass on."""
        self.abort()
        self.segments = {start: end for start, end in segments}
        self._watches.clear()

    def enter(self, group: int, module: nn.Module, args: tuple, kwargs: dict, timer: Callable[[int], Timer]) -> None:
        """Layer ``group`` starts (a pass that records gradients): open its segment, or join the open one."""
        seg = self._open
        if seg is not None and group < seg.end:
            seg.add(module, args, kwargs, self._watch(module))
            return
        if seg is not None:
            self.abort()
            raise RuntimeError(f"Layer {group} started while the recomputed segment of layers [{seg.start}, "
                               f"{seg.end}) was still open: the model's forward no longer calls its layers as in the "
                               "pass the plan was made from. Run the plan again from a new profile "
                               "(activation_offload='auto' re-profiles when input shapes change).")
        end = self.segments.get(group)
        if end is not None:
            self._open = _OpenSegment(group, end, timer(group))
            self._open.add(module, args, kwargs, self._watch(module))

    def exit(self, group: int, output: Any) -> None:
        """Layer ``group`` returned ``output``: the next layer of the segment takes it; the last one closes it."""
        seg = self._open
        if seg is None:
            return
        seg.returned(output)
        if group == seg.end - 1:
            self._open = None
            seg.close()

    def finish(self) -> None:
        """Forward is over: a segment still open never reached its last layer."""
        seg = self._open
        if seg is not None:
            self.abort()
            raise RuntimeError(f"Forward ended inside the recomputed segment of layers [{seg.start}, {seg.end}): the "
                               "model's forward no longer calls its layers as in the pass the plan was made from.")

    def abort(self) -> None:
        """Leave an open segment's checkpoint (a failed forward): its hooks come off autograd's stack."""
        seg, self._open = self._open, None
        if seg is not None:
            seg.gen.close()

    def _watch(self, module: nn.Module) -> BufferWatch:
        if module not in self._watches:
            self._watches[module] = BufferWatch(module)
        return self._watches[module]


class _Call:
    """One layer call of a segment as the recompute makes it again: its arguments with the tensors it gets from the
    run (the segment's inputs, the previous layer's output) left out, and its buffers' snapshot."""

    __slots__ = ("module", "spec", "leaves", "links", "watch", "snap")

    def __init__(self, module: nn.Module, spec: Any, leaves: list, links: dict[int, int], watch: BufferWatch) -> None:
        self.module, self.spec, self.leaves, self.links, self.watch = module, spec, leaves, links, watch
        self.snap = watch.snapshot()


class _OpenSegment:
    def __init__(self, start: int, end: int, timer: Timer) -> None:
        self.start, self.end, self.timer = start, end, timer
        self.calls: list[_Call] = []
        self._returned: list[weakref.ref] = []
        self.gen: Any = None

    def add(self, module: nn.Module, args: tuple, kwargs: dict, watch: BufferWatch) -> None:
        leaves, spec = tree_flatten((args, kwargs))
        links: dict[int, int] = {}  # argument leaf -> the run's tensor it is (first call: its inputs; else outputs)
        if not self.calls:
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            links = {i: n for n, i in enumerate(i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor))}
            self.gen = _open_checkpoint(self._replay, tensors)
        else:
            out = {id(r()): n for n, r in enumerate(self._returned) if r() is not None}
            for i, t in enumerate(leaves):
                if isinstance(t, torch.Tensor) and id(t) in out:
                    links[i] = out[id(t)]
                elif isinstance(t, torch.Tensor) and t.requires_grad:
                    raise RuntimeError(
                        f"A layer of the recomputed segment [{self.start}, {self.end}) takes a tensor that needs a "
                        "gradient and is not the previous layer's output: the model's forward no longer chains "
                        "these layers as in the pass the plan was made from.")
        self.calls.append(_Call(module, spec, [None if i in links else t for i, t in enumerate(leaves)], links,
                                watch))

    def returned(self, output: Any) -> None:
        call = self.calls[-1]
        call.watch.learn(call.snap)
        self._returned = [weakref.ref(t) if isinstance(t, torch.Tensor) else _dead for t in tree_leaves(output)]

    def close(self) -> None:
        try:
            next(self.gen)
        except StopIteration:
            pass

    def _replay(self, *inputs: torch.Tensor) -> None:
        """The recompute in backward: every layer again, each on what the one before returned."""
        given: list = list(inputs)
        with self.timer():
            for call in self.calls:
                leaves = list(call.leaves)
                for i, n in call.links.items():
                    leaves[i] = given[n]
                args, kwargs = tree_unflatten(leaves, call.spec)
                with call.watch.replayed(call.snap):
                    given = tree_leaves(call.module.forward(*args, **kwargs))


def _dead() -> None:
    return None


def _open_checkpoint(fn: Callable[..., Any], tensors: list[torch.Tensor]) -> Any:
    """``torch.utils.checkpoint``'s non-reentrant checkpoint of ``fn(*tensors)``, entered: the forward runs from now
    until the returned generator is advanced again."""
    early_stop = (True,) if "early_stop" in inspect.signature(_checkpoint_generator).parameters else ()
    gen = _checkpoint_generator(fn, True, noop_context_fn, "default", False, *early_stop, *tensors)
    next(gen)
    return gen
