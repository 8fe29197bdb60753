"""Training processes for ``test_checkpoint.py``'s SIGKILL test, forked from one server.

``python tests/kill_worker.py CKPT``: imports torch, Lightning and lightning_vdnn once (seconds), runs no torch
op (so no thread pool exists to break in a fork), then reads one strategy name per line from stdin and forks a
training process for each. The child says ``started PID``, resumes from ``CKPT`` if it exists, trains a GPT
under that strategy and saves ``CKPT`` after every step through the strategy's ``CheckpointIO``, announcing each
save on stdout (``saving N`` before, ``saved N`` after, N the global step; single ``os.write`` calls below
``PIPE_BUF``, so a kill cannot tear a line). The server waits for the child, which the test kills with SIGKILL,
and answers ``reaped STATUS``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import lightning as L
import torch

import lightning_vdnn  # noqa: F401  (registers the strategy names)
from conftest import TokenLM, token_loader  # tests/ is sys.path[0]: this file's directory

PROTOCOL = 1  # stdout; the child's own prints go to stderr


def say(*words: object) -> None:
    os.write(PROTOCOL, (" ".join(map(str, words)) + "\n").encode())


def fingerprint(state_dict: dict) -> float:
    """A sum over every weight: the test recomputes it from the loaded file to see the weights are the saved ones."""
    return float(sum(v.double().sum() for v in state_dict.values()))


class SaveEveryStep(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        say("saving", trainer.global_step)
        trainer.save_checkpoint(self.path)
        say("saved", trainer.global_step)

    def on_save_checkpoint(self, trainer, module, checkpoint):
        checkpoint["fingerprint"] = fingerprint(checkpoint["state_dict"])


def train(path: Path, strategy: str) -> None:
    torch.set_num_threads(1)
    sys.stdout = sys.stderr
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=-1, max_epochs=10**6,
                        callbacks=[SaveEveryStep(path)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TokenLM(), token_loader(n=8, batch=4, seq=32), ckpt_path=path if path.exists() else None)


def serve(path: Path) -> None:
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                say("started", os.getpid())
                train(path, line.strip())
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        say("reaped", status)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
