"""The end of layer streaming gives the pinned chunks back one at a time (``streaming/host_release.py``).

No CUDA here: the arena is made to page-lock as on a GPU host, with ``cudaHostRegister``/``cudaHostUnregister``
replaced by a record of the chunks locked, and every chunk's storage watched until it is freed, so the host bytes
held (live chunks plus the ordinary tensors the release made) are counted at each point of the teardown.
"""

from __future__ import annotations

import copy
import json
import io
import weakref

import pytest
import torch

from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.streaming import pinned_arena
from lightning_vdnn.streaming.host_state import HostBlock, add_copies
from lightning_vdnn.streaming.pinned_arena import PinnedArena
from lightning_vdnn.streaming.streamer import LayerStreamer

pytestmark = pytest.mark.usefixtures("one_thread")
CHUNK = 2**18  # the largest chunk here: gpt_tiny's blocks then take several


class Ledger:
    """Host bytes of the live chunks, page-locked chunks, and the peak of what the model holds as it is released."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}  # storage address -> bytes, until torch frees the storage
        self.locked: set[int] = set()
        self.samples: list[int] = []
        self.model: torch.nn.Module = None

    def made(self, chunk: torch.Tensor) -> None:
        storage = chunk.untyped_storage()
        self.live[storage.data_ptr()] = storage.nbytes()
        weakref.finalize(storage, self.live.pop, storage.data_ptr())

    def held(self) -> int:
        """Live chunks, plus every other storage the model's parameters and gradients hold (each once)."""
        tensors = [t for p in self.model.parameters() for t in (p, p.grad) if t is not None]
        other = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                 if t.untyped_storage().data_ptr() not in self.live}
        return sum(self.live.values()) + sum(other.values())

    def sample(self) -> None:
        self.samples.append(self.held())


@pytest.fixture
def ledger(monkeypatch):
    """Arenas page-lock (recorded, not real) in chunks of at most ``CHUNK``; held bytes sampled at each release."""
    book = Ledger()
    monkeypatch.setattr(pinned_arena, "lock", lambda chunk: book.locked.add(chunk.data_ptr()))
    monkeypatch.setattr(pinned_arena, "unlock", lambda chunk: book.locked.remove(chunk.data_ptr()))
    init, new_chunk, free = PinnedArena.__init__, PinnedArena._new_chunk, PinnedArena.free
    release_part = HostBlock.release_part
    monkeypatch.setattr(PinnedArena, "__init__", lambda self, pin, total=None: init(self, True, total))
    monkeypatch.setattr(PinnedArena, "MAX_CHUNK", CHUNK)
    monkeypatch.setattr(PinnedArena, "CHUNK", 2**16)
    monkeypatch.setattr(PinnedArena, "_new_chunk", lambda self, n: (lambda c: book.made(c) or c)(new_chunk(self, n)))
    monkeypatch.setattr(PinnedArena, "free", lambda self, k: (free(self, k), book.sample()))
    monkeypatch.setattr(HostBlock, "release_part", lambda self, part: (release_part(self, part), book.sample()))
    return book


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, zero: bool = True) -> None:
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randint(0, 256, (2, 16), generator=g)
        model(x).square().mean().backward()
        if step < steps - 1 or zero:
            opt.step()
            opt.zero_grad()


def _saved_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


@pytest.mark.parametrize("state", ["fp32", "bf16"])
def test_the_end_of_streaming_holds_at_most_one_chunk_twice(ledger, state):
    """2 AdamW steps and a third backward left in ``p.grad`` (fp32): the teardown's peak is at most one chunk
    above what streaming held, where releasing every block before freeing would hold the blocks' weights (and
    gradients) twice; the chunks are all freed and unlocked, and
    the model ends with its trained weights (and gradients), each in its own storage: as plain training's, down
    to the size of a checkpoint."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    ref = copy.deepcopy(model)
    streamer = LayerStreamer(model, "blocks", torch.device("cpu"), host_state_dtype=state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    streamer.attach_optimizers([opt])
    _train(model, opt, 3, zero=False)
    streamer.synchronize()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ledger.model = model
    before, chunks, largest = ledger.held(), len(ledger.live), max(ledger.live.values())
    blocks = sum(p.nbytes for p in model.blocks.parameters())
    assert chunks >= 5 and blocks > 3 * largest  # releasing everything before freeing would hold far more

    streamer.close()

    assert ledger.samples and max(ledger.samples) <= before + largest
    assert not ledger.live and not ledger.locked
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
        assert p.untyped_storage().nbytes() == p.nbytes, name  # its own storage, not a view of a chunk
        if name.startswith("blocks.") and state == "bf16":
            assert p.grad is None, name  # the bf16 gradients are let go, not widened
        elif name in grads:
            assert torch.equal(p.grad, grads[name]) and p.grad.untyped_storage().nbytes() == p.grad.nbytes, name
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    _train(ref, ref_opt, 3, zero=False)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        tol = dict(rtol=1e-5, atol=1e-6) if state == "fp32" else dict(rtol=0, atol=2e-2)  # bf16 moments
        torch.testing.assert_close(p.detach(), q.detach(), **tol, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(b, c), name
    assert _saved_bytes(model) == _saved_bytes(ref)


def test_the_copies_chunks_go_first_and_need_no_clone(ledger, monkeypatch):
    """Chunks whose buffers are dropped (the compute-dtype copies) are freed before any parameter is cloned."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    streamer = LayerStreamer(model, "blocks", torch.device("cpu"))
    copies = add_copies(streamer.blocks, torch.bfloat16, True)
    streamer._arenas.append(copies)
    events = []
    free, release_part = PinnedArena.free, HostBlock.release_part
    monkeypatch.setattr(PinnedArena, "free", lambda self, k: (events.append(self is copies and "copies"), free(self, k)))
    monkeypatch.setattr(HostBlock, "release_part", lambda self, part: (events.append(part), release_part(self, part)))
    ledger.model = model
    streamer.close()
    assert events.count("copies") == 4 and not copies.live()  # a chunk per block here (they exceed CHUNK)
    assert max(i for i, e in enumerate(events) if e == "copies") < events.index("weights")


def test_an_arena_dropped_without_freeing_unlocks_its_chunks(ledger):
    arena = PinnedArena(True)
    bufs = [arena.empty(50_000, torch.float32) for _ in range(3)]
    assert len(ledger.locked) == len(arena.live()) >= 2
    del arena
    assert not ledger.locked  # unlocked; the memory stays valid (pageable) while views of it are alive
    bufs[0].fill_(1.0)
    assert bool((bufs[0] == 1).all())


def test_a_chunk_that_cannot_be_page_locked_falls_back_to_pageable_memory_with_a_warning(monkeypatch):
    def refuse(chunk):
        raise RuntimeError("cudaHostRegister of 65536 bytes failed with cudaError 2")

    monkeypatch.setattr(pinned_arena, "lock", refuse)
    arena = PinnedArena(True)
    with pytest.warns(UserWarning, match="page-locking host memory for layer streaming failed.*pageable"):
        buf = arena.empty(1000, torch.float32)
    assert buf.numel() == 1000 and not arena.pin and not arena.live()
    assert arena.empty(10, torch.float32).numel() == 10


@pytest.mark.slow
def test_the_largest_model_script_records_its_numbers_before_teardown(tmp_path, monkeypatch):
    """A teardown that fails (the kernel's OOM killer, here a MemoryError raised by the streamer's close) leaves
    ``largest.json`` and the table row written: they are written as the last step ends."""
    from benchmarks import largest

    monkeypatch.setattr(LayerStreamer, "host_copies", LayerStreamer.host_copies)  # the script sets it
    close = LayerStreamer.close

    def fails(self):  # released (no worker threads left behind for later tests), then the "OOM"
        close(self)
        raise MemoryError("teardown")

    monkeypatch.setattr(LayerStreamer, "close", fails)
    with pytest.raises(MemoryError, match="teardown"):
        largest.main(["--tiny", "--steps", "3", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "largest.json").read_text())
    assert len(row["losses"]) == 3 and row["tokens_per_s"] > 0 and "teardown_s" not in row
