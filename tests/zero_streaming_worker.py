"""One rank of ``test_zero_streaming.py``: ``torchrun --nproc_per_node 2 tests/zero_streaming_worker.py OUT RUN...``.

Runs (each with ``activation_offload="all"``, AdamW with weight-decay groups and a warm-up + cosine schedule):

``stage2``: L2L with ZeRO-2, gradient clipping (block updates queued at the step): 2 epochs and a checkpoint
(written after ``fit``, from the partitions the strategy keeps); a fresh Trainer resumes it (a differently
seeded model: only the checkpoint can make it right) for a third epoch and saves; then the 3 epochs
uninterrupted, saved too; and 2 epochs of Lightning's plain DDP on the same ranks. Last, a fit whose
``training_step`` raises on both ranks after a step, and a save attempted after it.
``stage3``: ZeRO-3, no clipping (block updates during backward), ``accumulate_grad_batches=2``,
``microbatches=2``: 2 epochs, a checkpoint by ``ModelCheckpoint`` at each epoch's end (while the blocks
stream) and one after ``fit``; mid-training, a block's ``state_dict()`` read without
``strategy.synchronize()`` and with it; then ``validate``, and ``predict``, which must be refused.

Each rank writes ``OUT/<run>_rank<R>.json``: its losses, and what its host holds for the blocks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_vdnn  # noqa: F401  (registers the strategy names)
from lightning_vdnn import L2LZeroStrategy
from lightning_vdnn.streaming.sharded_optimizer_state import state_numel
from lightning_vdnn.examples.tasks import LanguageModel

GLOBAL_BATCH, BATCHES_PER_EPOCH, EPOCHS, SEQ = 8, 4, 2, 16  # then one more epoch, resumed
RUNS = {"stage2": dict(stage=2, gradient_clip_val=0.5, accumulate_grad_batches=1, microbatches=1),
        "stage3": dict(stage=3, gradient_clip_val=None, accumulate_grad_batches=2, microbatches=2)}


class LM(LanguageModel):
    """A small GPT (3 blocks, no biases: AdamW would magnify the rounding noise of the key bias's zero
    gradient) that records each step's loss."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__("gpt_tiny", n_layer=3, n_embd=64, block_size=SEQ, bias=False, lr=1e-2, warmup_steps=2,
                         max_steps=12)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (GLOBAL_BATCH * BATCHES_PER_EPOCH, SEQ + 1), generator=g)
    return torch.utils.data.TensorDataset(data[:, :-1], data[:, 1:])


def rank_loader(rank: int, world: int) -> torch.utils.data.DataLoader:
    """Rank ``rank``'s share of each global batch, in order."""
    ds = dataset()
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
    return torch.utils.data.DataLoader(ds, batch_size=GLOBAL_BATCH // world, sampler=sampler)


class Failing(LM):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise ValueError("boom")
        return super().training_step(batch, batch_idx)


class HostState(L.Callback):
    """Mid-training, a block's ``state_dict()`` with and without gathering first; at the end of training,
    before teardown, what this rank's host holds for the streamed blocks."""

    def __init__(self) -> None:
        self.found: dict = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx != 1 or trainer.current_epoch:  # after the first optimizer step
            return
        try:
            module.model.blocks[0].state_dict()
            self.found["stale_read"] = "allowed"
        except RuntimeError as err:
            self.found["stale_read"] = str(err)
        trainer.strategy.synchronize()
        self.found["synchronized_read"] = sorted(module.model.blocks[0].state_dict())

    def on_train_end(self, trainer, module):
        streamer = trainer.strategy._streamer
        params = [p for b in streamer.blocks for p in b.params]
        self.found |= {"state_numel": state_numel(trainer.optimizers[0], params),
                      "grad_numel": sum(b.grad_flat.numel() for b in streamer.blocks),
                      "grads_none": all(p.grad is None for p in params),
                      "eager_updates": sum(s.eager_updates for s in streamer.steppers),
                      "h2d_bytes": trainer.strategy.memory_report().streamed_h2d_bytes}


def trainer(run: str, epochs: int, *callbacks: L.Callback) -> L.Trainer:
    cfg = RUNS[run]
    strategy = L2LZeroStrategy("all", zero_stage=cfg["stage"], layers="model.blocks", min_offload_bytes=0,
                               microbatches=cfg["microbatches"])
    saves = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=epochs, logger=False,
                     enable_checkpointing=saves, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=list(callbacks),
                     gradient_clip_val=cfg["gradient_clip_val"], accumulate_grad_batches=cfg["accumulate_grad_batches"])


def run(out: Path, name: str, loader: torch.utils.data.DataLoader) -> None:
    host = HostState()
    saves = ModelCheckpoint(out, filename=f"{name}_{{epoch}}", save_top_k=-1, enable_version_counter=False)
    first, model = trainer(name, EPOCHS, host, *([saves] if name == "stage3" else [])), LM(seed=0)
    first.fit(model, loader)
    first.save_checkpoint(out / f"{name}.ckpt")
    result = dict(losses=model.losses, world_size=first.world_size, **host.found)
    if name == "stage3":
        result["val_loss"] = first.validate(model, loader, verbose=False)[0]["val/loss"]
        try:
            first.predict(model, loader)
            result["predict"] = "allowed"
        except ValueError as err:
            result["predict"] = str(err)
    if name == "stage2":
        ddp, plain = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=EPOCHS, logger=False,
                               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                               use_distributed_sampler=False, gradient_clip_val=RUNS[name]["gradient_clip_val"]), LM()
        ddp.fit(plain, loader)
        ddp.save_checkpoint(out / f"{name}_ddp.ckpt")
        failing, broken = trainer(name, 1), Failing()
        try:
            failing.fit(broken, loader)
        except ValueError as err:
            result["failure"] = str(err)
        try:
            failing.save_checkpoint(out / "failed.ckpt")
        except RuntimeError as err:
            result["save_after_failure"] = str(err)
        result["released"] = "forward" not in broken.model.blocks[0].__dict__
        second, resumed = trainer(name, EPOCHS + 1), LM(seed=123)
        second.fit(resumed, loader, ckpt_path=out / f"{name}.ckpt")
        second.save_checkpoint(out / f"{name}_resumed.ckpt")
        straight, uninterrupted = trainer(name, EPOCHS + 1), LM(seed=0)
        straight.fit(uninterrupted, loader)
        straight.save_checkpoint(out / f"{name}_straight.ckpt")
        result.update(resumed_losses=resumed.losses, straight_losses=uninterrupted.losses)
    (out / f"{name}_rank{first.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    rank_data = rank_loader(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    for name in sys.argv[2:]:
        run(out_dir, name, rank_data)
    # before the interpreter finalizes: gloo's threads may still hold tensors whose release then needs the GIL
    # (a rank dies with "terminate called without an active exception"; torch does not destroy the group at exit)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
