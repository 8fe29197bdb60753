"""``batch_chunks="auto"`` on a CUDA device: VGG-16 at half of plain's peak, below its all-offloaded floor, chunks
its conv trunk by itself, trains as plain and keeps the budget. Skipped without CUDA; run with ``-m gpu``."""

from __future__ import annotations

import pytest
import torch

from lightning_vdnn import VDNNStrategy
from test_gpu import BATCH, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("fraction", [0.5, 0.65])  # both below the floor (about 74% at batch 128)
def test_vgg16_below_its_floor_chunks_the_trunk_trains_as_plain_and_keeps_the_budget(fraction):
    ref, _, plain_peak = train("auto", 8)
    budget = int(fraction * plain_peak)
    got, trainer, _ = train(VDNNStrategy(memory_budget=budget), 8)
    report = trainer.strategy.memory_report()
    print(f"\nVGG-16 batch {BATCH} at {fraction:.0%} of plain's {plain_peak / 2**30:.2f} GiB:\n{report}")
    assert report.chunks_auto and report.chunk_layers == "net.features" and report.batch_chunks >= 2
    torch.testing.assert_close(torch.stack(got.losses), torch.stack(ref.losses), rtol=2e-2, atol=2e-2)
    assert report.measured_peak_bytes <= 1.02 * budget and report.budget_kept
