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


_ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered


def _locked(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory is registered with CUDA. ``Tensor.is_pinned()`` cannot say: on torch 2.11 it is
    False for memory page-locked by ``cudaHostRegister`` (it knows its own allocator's blocks). Registering again
    fails with "already registered" exactly when it is; a registration that succeeds here is undone."""
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.nbytes, 0))
    if err == 0:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    return err == _ALREADY_REGISTERED


def test_arena_chunks_are_page_locked_and_copy_as_fast_as_torch_pinned_memory():
    numel = 2**26  # 256 MiB of fp32
    arena = PinnedArena(True, total=4 * numel)
    buf = arena.empty(numel, torch.float32).fill_(1.0)
    ref = torch.ones(numel, dtype=torch.float32, pin_memory=True)
    dev = torch.empty(numel, dtype=torch.float32, device="cuda")
    assert arena.pin and _locked(buf)
    ours, torchs = _copy_gbps(buf, dev), _copy_gbps(ref, dev)
    assert ours >= 0.85 * torchs, (ours, torchs)
    ours, torchs = _copy_gbps(dev, buf), _copy_gbps(dev, ref)  # the gradients' way
    assert ours >= 0.85 * torchs, (ours, torchs)
    arena.close()
    assert not _locked(buf) and bool((buf == dev.cpu()).all())  # unlocked, still valid until dropped


class Pinned(L.Callback):
    """During training every streamed block's weights, gradients and bf16 copy live in page-locked chunks."""

    def on_before_optimizer_step(self, trainer, module, optimizer):
        streamer = trainer.strategy._streamer
        streamer.wait_grads()
        self.held = all(_locked(t) for b in streamer.blocks for t in (b.flat, b.grad_flat, b.copy))
        self.arenas = len(streamer._arenas)


def test_the_end_of_a_bf16_state_run_frees_and_unlocks_every_chunk(monkeypatch):
    live: dict[int, int] = {}
    locked: list[int] = []
    new_chunk, lock, unlock = PinnedArena._new_chunk, pinned_arena.lock, pinned_arena.unlock

    def watched(self, nbytes):
        chunk = new_chunk(self, nbytes)
        storage = chunk.untyped_storage()
        live[storage.data_ptr()] = storage.nbytes()
        weakref.finalize(storage, live.pop, storage.data_ptr())
        return chunk

    monkeypatch.setattr(PinnedArena, "_new_chunk", watched)
    monkeypatch.setattr(pinned_arena, "lock", lambda c: (lock(c), locked.append(c.data_ptr())))
    monkeypatch.setattr(pinned_arena, "unlock", lambda c: (unlock(c), locked.remove(c.data_ptr())))
    seen = Pinned()
    got, _ = fit(RecordingGPT, token_loader(n=32), VDNNStrategy("none", layer_streaming=True, host_state_dtype="bf16"),
                 max_steps=4, precision="bf16-mixed", accelerator="gpu", devices=1, callbacks=[seen])
    assert seen.held and seen.arenas == 2  # the weights' and gradients' arena, the bf16 copies' arena
    assert not live and not locked
    for name, p in got.model.blocks.named_parameters():
        assert p.device.type == "cpu" and not p.is_pinned() and p.untyped_storage().nbytes() == p.nbytes, name
