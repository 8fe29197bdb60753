"""Buffers a forward writes (BatchNorm's running statistics and count), kept exact when that forward runs again.

A recompute in backward (layer streaming, activation checkpointing of a resident block or a planned layer)
runs a module's forward a second time. BatchNorm in training mode would update its running statistics and
``num_batches_tracked`` again: twice per step instead of once, and the eval-mode model would differ from plain
training's. :class:`BufferWatch` snapshots, before the forward, the buffers that forward writes and, for the
replay, puts copies of those snapshots in their place: the replay reads what the forward read and writes into
copies that are dropped, so the module's own buffers change once per step, as without the recompute.

Which buffers a forward writes is learnt from the module: norm layers that track running statistics, and any
other buffer whose value, version or identity the first watched forward changed (the first forward snapshots all
of them, later ones only those).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from lightning_vdnn.integrations.adapters.torch import outside_dispatch_modes


def running_stats(module: nn.Module) -> list[Tensor]:
    """Buffers that forward updates in place: BatchNorm/InstanceNorm running mean, variance and count."""
    out = []
    for m in module.modules():
        if getattr(m, "track_running_stats", False):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                t = getattr(m, name, None)
                if isinstance(t, Tensor):
                    out.append(t)
    return out


class BufferSnapshot:
    """The values of a module's written buffers before one forward (empty where it writes none)."""

    __slots__ = ("values", "versions", "tensors")

    def __init__(self, values: dict[int, Tensor], versions: dict[int, int], tensors: dict[int, Tensor]) -> None:
        self.values, self.versions, self.tensors = values, versions, tensors


class BufferWatch:
    """The buffers of ``module`` (and its submodules) that its forward writes, and their replay."""

    def __init__(self, module: nn.Module) -> None:
        found = [(path, m, name) for path, m in module.named_modules() for name, b in m._buffers.items()
                 if b is not None]
        self.slots = [(m, name) for _, m, name in found]
        self.names = [f"{path}.{name}".lstrip(".") for path, _, name in found]  # for messages, by slot
        norms = {id(t) for t in running_stats(module)}
        self.written: set[int] = {i for i, (m, name) in enumerate(self.slots) if id(m._buffers[name]) in norms}
        self.learnt = not self.slots  # until a forward was watched, every buffer is snapshot

    def _get(self, i: int) -> Tensor:
        m, name = self.slots[i]
        return m._buffers[name]

    def snapshot(self) -> Optional[BufferSnapshot]:
        """Before a forward that will be replayed; None when the module writes no buffer."""
        watched = self.written if self.learnt else range(len(self.slots))
        if not watched:
            return None
        tensors = {i: self._get(i) for i in watched}
        with torch.no_grad():
            return BufferSnapshot({i: t.clone() for i, t in tensors.items()}, {i: t._version for i, t in tensors.items()},
                                  tensors)

    def learn(self, snap: Optional[BufferSnapshot]) -> None:
        """After that forward: the buffers it changed join :attr:`written`; the snapshot keeps only those."""
        if snap is None or self.learnt:
            return
        for i, before in snap.values.items():
            now = self._get(i)
            if (now is not snap.tensors[i] or now._version != snap.versions[i] or now.shape != before.shape
                    or not torch.equal(now, before)):
                self.written.add(i)
        self.learnt = True
        for i in [i for i in snap.values if i not in self.written]:
            del snap.values[i]
        snap.tensors.clear()

    def restore(self, snap: Optional[BufferSnapshot]) -> None:
        """Put the snapshot's values back into the buffers the forward wrote (undo that forward's writes)."""
        if snap is None:
            return
        with torch.no_grad():
            for i, value in snap.values.items():
                m, name = self.slots[i]
                now = m._buffers[name]
                if now.shape == value.shape and now.dtype == value.dtype:
                    now.copy_(value)  # in place: whoever holds the buffer sees it restored
                else:
                    m._buffers[name] = value.clone()

    @contextlib.contextmanager
    def replayed(self, snap: Optional[BufferSnapshot]) -> Iterator[None]:
        """Run the forward again with copies of the snapshot in place of the buffers it writes."""
        if not self.written:
            yield
            return
        values = snap.values if snap is not None else {}
        own = {i: self._get(i) for i in self.written}
        with torch.no_grad(), outside_dispatch_modes():  # not the forward's ops: a selective recompute replays those
            stand_in = {i: (values[i] if i in values else t).clone() for i, t in own.items()}
        for i, t in stand_in.items():
            m, name = self.slots[i]
            m._buffers[name] = t
        try:
            yield
        finally:
            for i, t in own.items():
                m, name = self.slots[i]
                m._buffers[name] = t
