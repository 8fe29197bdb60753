"""Nothing trained is lost: atomic checkpoints survive SIGKILL, and resume continues bit for bit."""

from __future__ import annotations

import functools
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import kill_worker
from conftest import ROOT, Classifier, ResidualCNN, TokenLM, checkout_env, fit, image_loader, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.integrations.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from test_streaming import LM, l2l, lm


class Server:
    """``kill_worker.py`` as a fork server: Lightning imported once for the 20 training processes it forks."""

    def __init__(self, path: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_worker.py"), str(path)],
                                     cwd=ROOT, env=checkout_env(OMP_NUM_THREADS="1"), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        self.lines: queue.Queue = queue.Queue()
        self.child: Optional[int] = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), *line.split()))

    def start(self, strategy: str) -> int:
        """Fork a training process under ``strategy``; returns its pid."""
        self.proc.stdin.write(strategy + "\n")
        self.proc.stdin.flush()
        _, word, self.child = self.next()
        assert word == "started", (word, self.child)
        return self.child

    def next(self) -> tuple[float, str, int]:
        """The next line from a child or the server: (arrival time, word, number)."""
        try:
            arrived, word, number = self.lines.get(timeout=120)
        except queue.Empty:
            pytest.fail(f"no word from the training process in 120 s; its log:\n{self.log.read_text()[-4000:]}")
        return arrived, word, int(number)

    def kill(self) -> list[tuple[float, str, int]]:
        """SIGKILL the child; returns what it said before the kill landed, and checks the kill ended it."""
        os.kill(self.child, signal.SIGKILL)
        said = []
        while (line := self.next())[1] != "reaped":
            said.append(line)
        assert line[2] == signal.SIGKILL, f"the child ended by itself ({line}); its log:\n{self.log.read_text()}"
        self.child = None
        return said

    def close(self) -> None:
        if self.child is not None:  # a failed check left it training
            os.kill(self.child, signal.SIGKILL)
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _kill_inside_a_save(server: Server, rng: random.Random, durations: list[float]) -> tuple[int, int, int]:
    """Let the child complete 1-3 saves, then kill it a random moment into the next one (uniform over the
    median save time so far). Returns (first step it saved, last step fully saved, step it was saving)."""
    # at least its first save completes: that one also imports what saving needs (ten times a later save)
    let_finish, started, complete = rng.randint(1 if durations else 2, 3), {}, None
    while True:
        arrived, word, step = server.next()
        if word == "saving":
            started[step] = arrived
            if let_finish == 0:
                break
        else:
            assert word == "saved", (word, step)
            if len(started) > 1:
                durations.append(arrived - started[step])
            complete, let_finish = step, let_finish - 1
    time.sleep(rng.uniform(0.0, statistics.median(durations)))
    for _, word, step in server.kill():  # said before the kill landed
        complete = step if word == "saved" else complete
    return min(started), complete, step


@pytest.mark.slow
def test_sigkill_during_save_leaves_old_or_new_checkpoint(tmp_path):
    """20 training processes (vdnn_all and l2l in turn), each resuming from the checkpoint the one before left,
    are killed with SIGKILL at a random moment of a save of ``last.ckpt`` (seeded). After each kill the file is
    the last complete checkpoint or the one being written, never a mix; it loads into a plain model, and the
    next process resumes from it (its first save is the step after)."""
    path = tmp_path / "last.ckpt"
    server = Server(path, tmp_path / "server.log")
    rng, durations = random.Random(1234), []
    holds, torn = 0, 0  # the global step of the file; kills that left a temporary (landed inside the write)
    try:
        for trial in range(20):
            server.start("l2l" if trial % 2 else "vdnn_all")
            first, complete, saving = _kill_inside_a_save(server, rng, durations)
            assert first == holds + 1, f"trial {trial} started at step {first}, not from the checkpoint ({holds})"
            leftovers = list(tmp_path.glob(".last.ckpt.*.tmp"))
            torn += len(leftovers)
            for tmp in leftovers:
                tmp.unlink()
            ckpt = torch.load(path, weights_only=False)
            assert ckpt["global_step"] in (complete, saving), (trial, ckpt["global_step"], complete, saving)
            assert kill_worker.fingerprint(ckpt["state_dict"]) == ckpt["fingerprint"]  # the weights saved with it
            TokenLM().load_state_dict(ckpt["state_dict"])  # strict: every weight is there
            holds = ckpt["global_step"]
    finally:
        server.close()
    assert torn >= 5, f"only {torn} of 20 kills landed inside the write of the file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "server.log"]


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "model.ckpt"
    atomic_torch_save({"ok": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"bad": Unpicklable()}, path)
    assert torch.load(path)["ok"] == 1
    assert os.listdir(tmp_path) == ["model.ckpt"]


def test_strategy_uses_atomic_io_unless_told_otherwise():
    assert isinstance(VDNNStrategy("all").checkpoint_io, AtomicCheckpointIO)
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    mine = TorchCheckpointIO()
    trainer = L.Trainer(strategy="vdnn_all", plugins=[mine], accelerator="cpu", logger=False)
    assert trainer.strategy.checkpoint_io is mine


class NoDropout(Classifier):
    def __init__(self) -> None:
        net = ResidualCNN()
        net.drop = nn.Identity()
        super().__init__(net)


def _resumed(strategy_fn, tmp_path):
    """2 steps, save, resume in a new Trainer, 2 more; returns (losses, model)."""
    loader = lambda: image_loader(n=32, batch=16)  # noqa: E731  two steps per epoch
    first, trainer = fit(NoDropout, loader(), strategy_fn(), max_steps=2)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    L.seed_everything(0, verbose=False)
    resumed = NoDropout()
    L.Trainer(strategy=strategy_fn(), accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(resumed, loader(),
                                                                         ckpt_path=tmp_path / "mid.ckpt")
    return first.losses + resumed.losses, resumed


@pytest.mark.parametrize("policy", ["all", "auto"])
def test_resume_is_bit_for_bit_where_plain_is(tmp_path, policy):
    """Save + resume under vDNN reproduces exactly what the same save + resume does under plain Lightning."""
    ref_losses, ref = _resumed(lambda: "auto", tmp_path / "plain")
    losses, got = _resumed(lambda: VDNNStrategy(policy, min_offload_bytes=0), tmp_path / "vdnn")
    assert losses == ref_losses
    for p, q in zip(got.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    # the checkpoint itself holds plain tensors: it loads into a model with no lightning_vdnn around
    state = torch.load(tmp_path / "vdnn" / "mid.ckpt", weights_only=False)["state_dict"]
    plain = NoDropout()
    plain.load_state_dict(state)


# -- resume equals the uninterrupted run ------------------------------------------------------------------
RESUMABLE = {  # name: (strategy, the chunks plain training runs each block's input in to match it)
    "plain": (lambda: "auto", 1),
    "vdnn_all": (lambda: VDNNStrategy("all", min_offload_bytes=0), 1),
    "l2l": (lambda: "l2l", 1),
    "l2l_microbatches2": (lambda: l2l(microbatches=2), 2),
    "l2l_resident1": (lambda: l2l(resident_blocks=1), 1),
}


def two_epochs_of_two_steps():
    return token_loader(n=8, batch=4, seq=32)


@functools.cache
def _plain_four_steps(chunks: int) -> LM:
    return fit(lm(chunks=chunks), two_epochs_of_two_steps(), max_steps=-1, max_epochs=2)[0]


def assert_equal_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_equals_the_uninterrupted_run_and_plain_training_bit_for_bit(tmp_path, name):
    """4 steps straight (AdamW with weight-decay groups, warm-up + cosine schedule; on CPU in fp32), during
    which ``ModelCheckpoint`` saves after step 2 through the strategy's ``CheckpointIO`` (for l2l with block
    updates possibly still queued); then a fresh Trainer resumes that file into a differently seeded model and
    trains steps 3 and 4. Weights, AdamW moments and the schedule's position must all come from the file for
    the resumed losses and parameters to equal the straight run's exactly, and the straight run equals plain
    Lightning's exactly (for microbatches: plain training whose blocks run the same chunks).

    The save falls on an epoch's end: Lightning's resume from the middle of an epoch restarts the epoch unless
    the dataloader is stateful, and one stopped by ``max_steps`` at an epoch's end resumes a batch into the
    next, so not even plain Lightning reproduces the straight run there (``test_resume_is_bit_for_bit_where_
    plain_is`` compares those with plain's own resume). No dropout: Lightning's checkpoint holds no RNG state.
    """
    strategy, chunks = RESUMABLE[name]
    straight, _ = fit(lm(), two_epochs_of_two_steps(), strategy(), max_steps=-1, max_epochs=2,
                      enable_checkpointing=True, callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1)])
    L.seed_everything(1, verbose=False)
    resumed = LM()
    L.Trainer(strategy=strategy(), accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        resumed, two_epochs_of_two_steps(), ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert len(straight.losses) == 4 and resumed.losses == straight.losses[2:]
    assert_equal_params(resumed, straight)
    plain = _plain_four_steps(chunks)
    assert straight.losses == plain.losses
    assert_equal_params(straight, plain)


# -- directory checkpoints (DeepSpeed's shards), published atomically -----------------------------------------
def _write(directory: Path, value: int) -> Path:
    directory.mkdir(parents=True)
    torch.save({"value": value}, directory / "shard.pt")
    return directory


def _read(path: Path) -> int:
    return torch.load(path / "shard.pt", weights_only=True)["value"]


def test_directory_checkpoint_is_published_by_one_atomic_rename(tmp_path, monkeypatch):
    from lightning_vdnn.integrations.checkpoint_io import publish_dir, remove_published, version_dir

    path = tmp_path / "last.ckpt"
    first = _write(version_dir(path, "a"), 1)
    publish_dir(first, path, "a")
    assert path.is_symlink() and _read(path) == 1
    publish_dir(_write(version_dir(path, "b"), 2), path, "b")
    assert _read(path) == 2 and not first.exists()  # the old version is gone once the new one is published

    # a save killed between writing and publishing: the previous checkpoint stays whole, and the next save
    # clears what the killed one left
    killed = _write(version_dir(path, "c"), 3)
    real_replace = os.replace

    def crash(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt("killed at the rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        publish_dir(killed, path, "c")
    monkeypatch.setattr(os, "replace", real_replace)
    assert _read(path) == 2
    publish_dir(_write(version_dir(path, "d"), 4), path, "d")
    assert _read(path) == 4 and not killed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.d", "last.ckpt"]

    assert remove_published(path) and not path.exists() and list(tmp_path.iterdir()) == []
    assert not remove_published(tmp_path / "plain.ckpt")  # not ours: the caller removes it


def test_directory_checkpoint_replaces_an_in_place_one(tmp_path):
    from lightning_vdnn.integrations.checkpoint_io import publish_dir, version_dir

    path = _write(tmp_path / "epoch=0.ckpt", 1)  # an older DeepSpeed save, written in place
    publish_dir(_write(version_dir(path, "a"), 2), path, "a")
    assert path.is_symlink() and _read(path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".epoch=0.ckpt.a", "epoch=0.ckpt"]
