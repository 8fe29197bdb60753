"""Page-locked arena chunks on a CUDA host (``streaming/pinned_arena.py``): as fast as torch's pinned memory, and
given back one by one when streaming ends (``streaming/host_release.py``). Skipped without CUDA."""

from __future__ import annotations

import weakref

import lightning as L
import pytest
import torch

from conftest import RecordingGPT, fit, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.streaming import pinned_arena
from lightning_vdnn.streaming.pinned_arena import PinnedArena

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _copy_gbps(src: torch.Tensor, dst: torch.Tensor, repeats: int = 10) -> float:
    dst.copy_(src, non_blocking=True)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return repeats * src.nbytes / start.elapsed_time(end) / 1e6


class Locks:
    """The ranges ``pinned_arena.lock`` page-locked and ``unlock`` has not released. (``Tensor.is_pinned()`` cannot
    say: on torch 2.11 it is False for memory locked by ``cudaHostRegister``; and asking CUDA by registering again
    leaves an "already registered" error that the next kernel launch raises.)"""

    def __init__(self, monkeypatch) -> None:
        self.ranges: dict[int, int] = {}
        lock, unlock = pinned_arena.lock, pinned_arena.unlock

        def locking(chunk):
            lock(chunk)
            self.ranges[chunk.data_ptr()] = chunk.nbytes

        def unlocking(chunk):
            unlock(chunk)
            self.ranges.pop(chunk.data_ptr())

        monkeypatch.setattr(pinned_arena, "lock", locking)
        monkeypatch.setattr(pinned_arena, "unlock", unlocking)

    def hold(self, t: torch.Tensor) -> bool:
        start = t.data_ptr()
        return any(a <= start and start + t.nbytes <= a + n for a, n in self.ranges.items())


def test_arena_chunks_are_page_locked_and_copy_as_fast_as_torch_pinned_memory(monkeypatch):
    locks = Locks(monkeypatch)
    numel = 2**26  # 256 MiB of fp32
    arena = PinnedArena(True, total=4 * numel)
    buf = arena.empty(numel, torch.float32).fill_(1.0)
    ref = torch.ones(numel, dtype=torch.float32, pin_memory=True)
    dev = torch.empty(numel, dtype=torch.float32, device="cuda")
    assert arena.pin and locks.hold(buf)
    ours, torchs = _copy_gbps(buf, dev), _copy_gbps(ref, dev)
    assert ours >= 0.85 * torchs, (ours, torchs)
    ours, torchs = _copy_gbps(dev, buf), _copy_gbps(dev, ref)  # the gradients' way
    assert ours >= 0.85 * torchs, (ours, torchs)
    arena.close()
    assert not locks.hold(buf) and bool((buf == dev.cpu()).all())  # unlocked, still valid until dropped


class Pinned(L.Callback):
    """During training every streamed block's weights, gradients and bf16 copy live in page-locked chunks."""

    def __init__(self, locks: Locks) -> None:
        self.locks = locks

    def on_before_optimizer_step(self, trainer, module, optimizer):
        streamer = trainer.strategy._streamer
        streamer.wait_grads()
        self.held = all(self.locks.hold(t) for b in streamer.blocks for t in (b.flat, b.grad_flat, b.copy))
        self.arenas = len(streamer._arenas)


def test_the_end_of_a_bf16_state_run_frees_and_unlocks_every_chunk(monkeypatch):
    live: dict[int, int] = {}
    locks = Locks(monkeypatch)
    new_chunk = PinnedArena._new_chunk

    def watched(self, nbytes):
        chunk = new_chunk(self, nbytes)
        storage = chunk.untyped_storage()
        live[storage.data_ptr()] = storage.nbytes()
        weakref.finalize(storage, live.pop, storage.data_ptr())
        return chunk

    monkeypatch.setattr(PinnedArena, "_new_chunk", watched)
    seen = Pinned(locks)
    got, _ = fit(RecordingGPT, token_loader(n=32), VDNNStrategy("none", layer_streaming=True, host_state_dtype="bf16"),
                 max_steps=4, precision="bf16-mixed", accelerator="gpu", devices=1, callbacks=[seen])
    assert seen.held and seen.arenas == 2  # the weights' and gradients' arena, the bf16 copies' arena
    assert not live and not locks.ranges
    for name, p in got.model.blocks.named_parameters():
        assert p.device.type == "cpu" and not p.is_pinned() and p.untyped_storage().nbytes() == p.nbytes, name
