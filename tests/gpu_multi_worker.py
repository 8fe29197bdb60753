"""One rank of ``test_gpu_multi.py``: ``torchrun --nproc_per_node 2 tests/gpu_multi_worker.py OUT PRECISION``.

L2L with ZeRO on two CUDA devices (NCCL; the blocks' host state partitioned across the ranks): 2 epochs of the
CPU test's small GPT with clipping, then a checkpoint. Each rank writes ``OUT/<precision>_rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch

import lightning_vdnn  # noqa: F401  (registers the strategy names)
from lightning_vdnn import L2LZeroStrategy
from zero_streaming_worker import EPOCHS, LM, rank_loader  # tests/ is sys.path[0] under torchrun

if __name__ == "__main__":
    out, precision = Path(sys.argv[1]), sys.argv[2]
    model = LM(seed=0)
    trainer = L.Trainer(strategy=L2LZeroStrategy("all", zero_stage=3, layers="model.blocks", min_offload_bytes=0),
                        accelerator="gpu", devices=2, precision=precision, max_epochs=EPOCHS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, use_distributed_sampler=False, gradient_clip_val=0.5)
    trainer.fit(model, rank_loader(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])))
    trainer.save_checkpoint(out / f"{precision}.ckpt")
    report = trainer.strategy.memory_report()
    (out / f"{precision}_rank{trainer.global_rank}.json").write_text(json.dumps(
        {"losses": model.losses, "h2d_bytes": report.streamed_h2d_bytes}))
    # before the interpreter finalizes: gloo's threads may still hold tensors whose release then needs the GIL
    # (a rank dies with "terminate called without an active exception"; torch does not destroy the group at exit)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
