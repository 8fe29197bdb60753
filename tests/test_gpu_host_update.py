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
    if backend == "native":  # the kernel's own clock: a share of the worker's time
        assert 0 < report.host_update_kernel_ms and "ms in the native kernel" in str(report)
    else:
        assert report.host_update_kernel_ms is None
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=2e-2, atol=0)


def test_the_host_threads_sleep_while_they_wait_for_copies():
    """Layer streaming's worker threads wait for its copies (gradients landing in host memory, a load still reading
    the weights an update is about to write) on events recorded with ``host_waits``: they sleep there
    (``cudaEventBlockingSync``) instead of spinning, which CUDA does by default with one context, on a core the host
    update's threads need. The same wait on a long kernel with CUDA's default event, for contrast."""
    import time

    from lightning_vdnn.offload.host_pool import CopyEngine

    engine = CopyEngine(torch.device("cuda", torch.cuda.current_device()))

    def waiting(host_waits: bool) -> tuple[float, float]:
        """(CPU seconds, wall seconds) of this thread in ``synchronize()`` on a kernel of about 0.2 s."""
        torch.cuda.synchronize()
        torch.cuda._sleep(int(4e8))  # clock cycles: about 0.2 s at an H200's 1.98 GHz
        event = engine.record(host_waits=host_waits)
        wall, cpu = time.perf_counter(), time.thread_time()
        event.synchronize()
        return time.thread_time() - cpu, time.perf_counter() - wall

    spin_cpu, spin_wall = waiting(False)
    sleep_cpu, sleep_wall = waiting(True)
    assert min(spin_wall, sleep_wall) > 0.05, "the kernel ran too briefly to tell a wait from a spin"
    assert spin_cpu > 0.5 * spin_wall, f"CUDA's default wait did not spin ({spin_cpu:.3f} of {spin_wall:.3f} s)"
    assert sleep_cpu < 0.2 * sleep_wall, f"host_waits kept the thread busy ({sleep_cpu:.3f} of {sleep_wall:.3f} s)"
