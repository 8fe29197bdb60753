"""The host update's modes on a CUDA device: bf16 slots load the bf16 copy the update writes. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from conftest import RecordingGPT, fit, token_loader
from lightning_vdnn import VDNNConfig, VDNNStrategy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU = dict(accelerator="gpu", devices=1, precision="bf16-mixed")
LM = RecordingGPT


@pytest.mark.parametrize("backend, moments, per_param", [("torch", "fp32", 30), ("deepspeed", "fp32", 30),
                                                         ("torch", "bf16", 20), ("native", "fp32", 30),
                                                         ("native", "bf16", 20)])
def test_bf16_slots_load_the_copy_the_update_writes(backend, moments, per_param):
    """Loads copy 2 bytes a parameter (the bf16 copy), the update counts 28 (+2 for the copy; the lean state's
    bf16 moments and gradients 18 + 2) bytes a parameter, gradients cross PCIe in fp32 (4 bytes) or, in the lean
    state, bf16 (2), and the run stays within bf16 rounding of plain training."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    ref, _ = fit(LM, token_loader(n=48), max_steps=6, **GPU)
    config = VDNNConfig(activation_offload="none", layer_streaming=True, host_optimizer=backend,
                        host_state_dtype=moments)
    got, trainer = fit(LM, token_loader(n=48), VDNNStrategy(config=config), max_steps=6, **GPU)
    report = trainer.strategy.memory_report()
    numel = sum(p.numel() for p in got.model.blocks.parameters())
    assert report.host_update_bytes == per_param * numel
    assert report.streamed_h2d_bytes % (2 * numel // len(got.model.blocks)) == 0  # whole bf16 blocks
    assert report.streamed_d2h_bytes == (2 if moments == "bf16" else 4) * numel
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=2e-2, atol=0)
