"""One rank of ``test_zero.py``, started by ``torchrun --nproc_per_node 2 tests/zero_worker.py OUT MODE ...``.

``resume STAGE...``: per ZeRO stage, train 2 epochs of 2 steps with ``activation_offload="all"`` and save a
checkpoint; resume it in a fresh Trainer (a differently seeded model, so only the checkpoint can make it
right) for a third epoch and save again; then train the 3 epochs uninterrupted and save that too. Epochs, not ``max_steps``: a fit stopped by ``max_steps`` at an
epoch's last batch resumes one batch into the next epoch (Lightning's loop bookkeeping, not our business).

``policies STAGE POLICY...``: one epoch per policy, the model built in ``configure_model``, so that ZeRO-3
creates it under ``deepspeed.zero.Init`` (partitioned at birth, ``F.linear`` swapped for DeepSpeed's own).

Each rank writes its losses and offload report to ``OUT/<run>_rank<R>.json``; the test compares them with
one process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

import lightning_vdnn  # noqa: F401  (registers the strategy names)
from lightning_vdnn import VDNNZeroStrategy

from conftest import Classifier  # tests/ is sys.path[0] under torchrun

GLOBAL_BATCH, STEPS_PER_EPOCH, EPOCHS = 8, 2, 2  # then one more epoch, resumed


def build_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))


class MLP(Classifier):
    """Three Linear layers, AdamW (its state must survive the checkpoint); records each step's loss."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(build_net(seed))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class LateMLP(MLP):
    """The same network, built in ``configure_model`` (inside the strategy's ``model_sharded_context``)."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.losses = []

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = build_net(0)


def dataset() -> torch.utils.data.TensorDataset:
    """``STEPS_PER_EPOCH`` global batches."""
    g = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH * STEPS_PER_EPOCH
    return torch.utils.data.TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))


def rank_loader(rank: int, world: int) -> torch.utils.data.DataLoader:
    """Rank ``rank``'s share of each global batch, in order (Lightning's own sampler would shuffle)."""
    ds = dataset()
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
    return torch.utils.data.DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def trainer(stage: int, policy: str, epochs: int) -> L.Trainer:
    # ZeRO-3 keeps parameters below this many elements whole on every rank; 0 makes it gather and free them all
    config = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else None
    strategy = VDNNZeroStrategy(policy, zero_stage=stage, min_offload_bytes=0, config=config)
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=epochs, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, use_distributed_sampler=False)


def run_resume(out: Path, stage: int, loader: torch.utils.data.DataLoader) -> None:
    first, model = trainer(stage, "all", EPOCHS), MLP(seed=0)
    first.fit(model, loader)
    first.save_checkpoint(out / f"stage{stage}.ckpt")
    second, resumed = trainer(stage, "all", EPOCHS + 1), MLP(seed=123)
    second.fit(resumed, loader, ckpt_path=out / f"stage{stage}.ckpt")
    second.save_checkpoint(out / f"stage{stage}_resumed.ckpt")
    straight, uninterrupted = trainer(stage, "all", EPOCHS + 1), MLP(seed=0)
    straight.fit(uninterrupted, loader)
    straight.save_checkpoint(out / f"stage{stage}_straight.ckpt")
    write(out / f"stage{stage}_rank{first.global_rank}.json", losses=model.losses, resumed_losses=resumed.losses,
          straight_losses=uninterrupted.losses, report=first.strategy.memory_report().as_dict(),
          world_size=first.world_size)


def run_policy(out: Path, stage: int, policy: str, loader: torch.utils.data.DataLoader) -> None:
    fit, model = trainer(stage, policy, 1), LateMLP()
    fit.fit(model, loader)
    write(out / f"{policy}_stage{stage}_rank{fit.global_rank}.json", losses=model.losses,
          report=fit.strategy.memory_report().as_dict())


def write(path: Path, **result: object) -> None:
    path.write_text(json.dumps(result))


if __name__ == "__main__":
    out_dir, mode, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    rank_data = rank_loader(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if mode == "resume":
        for s in args:
            run_resume(out_dir, int(s), rank_data)
    else:
        for p in args[1:]:
            run_policy(out_dir, int(args[0]), p, rank_data)
    # before the interpreter finalizes: gloo's threads may still hold tensors whose release then needs the GIL
    # (a rank dies with "terminate called without an active exception"; torch does not destroy the group at exit)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
