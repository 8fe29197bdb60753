"""L2L across two CUDA devices (``l2l_zero``: NCCL collectives on the streaming side streams), against plain
training on one device with the global batch. Needs two GPUs; run with ``-m gpu``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import zero_streaming_worker as worker
from conftest import checkout_env

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]
ROOT = Path(__file__).resolve().parents[1]


def plain_on_one_gpu(precision: str) -> worker.LM:
    model = worker.LM(seed=0)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_epochs=worker.EPOCHS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=0.5)
    trainer.fit(model, torch.utils.data.DataLoader(worker.dataset(), batch_size=worker.GLOBAL_BATCH))
    return model


@pytest.mark.parametrize("precision, rtol", [("32-true", 1e-4), ("bf16-mixed", 3e-2)])
def test_l2l_zero_on_two_gpus_matches_one_gpu(tmp_path, precision, rtol):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "gpu_multi_worker.py"), str(tmp_path), precision]
    proc = subprocess.run(cmd, cwd=ROOT, env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    ranks = [json.loads((tmp_path / f"{precision}_rank{r}.json").read_text()) for r in range(2)]
    ref = plain_on_one_gpu(precision)
    mean = torch.tensor([ranks[0]["losses"], ranks[1]["losses"]]).mean(0)
    torch.testing.assert_close(mean, torch.tensor(ref.losses), rtol=rtol, atol=0)
    assert ranks[0]["h2d_bytes"] > 0 and ranks[0]["h2d_bytes"] == ranks[1]["h2d_bytes"]
    state = torch.load(tmp_path / f"{precision}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(state[name], p.cpu(), rtol=10 * rtol, atol=1e-4, msg=lambda m: f"{name}: {m}")
