"""Nothing trained is lost: atomic checkpoints survive SIGKILL, and resume continues bit for bit."""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from torch import nn

from conftest import Classifier, ResidualCNN, fit, image_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.checkpoint import AtomicCheckpointIO, atomic_torch_save

# A training process that saves version after version. It runs the library's own function, by source, with
# only torch imported (forking a process that holds torch's thread pools can deadlock; importing Lightning
# in every child costs seconds).
WRITER = "\n".join([
    "from __future__ import annotations",
    "import os, sys, tempfile, torch",
    "from pathlib import Path",
    inspect.getsource(atomic_torch_save),
    "path, start = sys.argv[1], int(sys.argv[2])",
    "for version in range(start, start + 1000):",
    "    atomic_torch_save({'version': version, 'data': torch.full((1_000_000,), float(version))}, path)",
    "    print(version, flush=True)",
])


def _check(path) -> int:
    ckpt = torch.load(path, weights_only=True)
    assert torch.equal(ckpt["data"], torch.full((1_000_000,), float(ckpt["version"])))  # complete, consistent
    return ckpt["version"]


def test_sigkill_during_save_leaves_old_or_new_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"version": 0, "data": torch.zeros(1_000_000)}, path)
    rng = random.Random(1234)
    last = 0
    for trial in range(20):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(last + 1)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline()  # the child is saving now: at least one version landed
        time.sleep(rng.uniform(0.0, 0.05))  # a random moment inside a following save (one takes ~10-40 ms)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        version = _check(path)
        assert version > last
        last = version
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert all(name.endswith(".tmp") for name in leftovers)  # only killed temporaries, never a torn target


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
