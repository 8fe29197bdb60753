"""The lean host state (``host_state_dtype="bf16"``, ``streaming/bf16_grads.py``): bf16 Adam moments and bf16 block
gradients in host memory, the gradient summed in fp32 on the device and rounded once."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import RecordingGPT, fit, token_loader
from lightning_vdnn import VDNNConfig, VDNNStrategy
from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.streaming import host_memory
from lightning_vdnn.streaming.bf16_grads import Bf16GradBlock, GradientAccumulationError
from lightning_vdnn.streaming.host_optimizer import HostStepper
from lightning_vdnn.streaming.host_state import PinnedArena
from lightning_vdnn.streaming.streamer import LayerStreamer

pytestmark = pytest.mark.usefixtures("one_thread")
#: every loss of the lean state within this relative distance of exact fp32 states' (measured: 5e-6)
TOLERANCE = 1e-3


class LM(RecordingGPT):
    def __init__(self, **overrides) -> None:
        super().__init__(max_steps=12, **overrides)


def l2l(**kw) -> VDNNStrategy:
    return VDNNStrategy(config=VDNNConfig(activation_offload="none", layer_streaming=True, **kw))


def loader(n: int = 48):
    return token_loader(n=n, batch=4, seq=32)


class Seen(L.Callback):
    """Records, mid-training, the streamer's host gradient buffers and the block parameters' ``p.grad``."""

    def on_before_optimizer_step(self, trainer, module, optimizer):
        streamer = trainer.strategy._streamer
        streamer.wait_grads()
        self.blocks = streamer.blocks
        self.staging = [t.dtype for t in streamer.grad_host]
        self.grads = [p.grad for b in streamer.blocks for p in b.params]
        self.buffers = [(b.numel, b.flat.dtype, b.grad_flat.dtype, b.grad_flat.nbytes,
                         {b.grad_of(k).dtype for k in range(len(b.params))}) for b in streamer.blocks]
        self.report = trainer.strategy.memory_report()


@pytest.mark.parametrize("microbatches", [1, 2])
def test_lean_state_loss_curve_stays_within_the_stated_tolerance_of_fp32_states(microbatches):
    """12 AdamW steps with warm-up and cosine decay: bf16 gradients and moments against exact fp32 states (the
    same one-pass kernel, torch's), with and without microbatches (their sum is fp32 on the device)."""
    ref, _ = fit(LM, loader(), l2l(host_optimizer="torch", microbatches=microbatches), max_steps=12)
    seen = Seen()
    got, _ = fit(LM, loader(), l2l(host_state_dtype="bf16", microbatches=microbatches), max_steps=12,
                 callbacks=[seen])
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=TOLERANCE, atol=0)
    assert all(isinstance(b, Bf16GradBlock) for b in seen.blocks)
    assert seen.report.streamed_d2h_bytes == sum(2 * b.numel for b in seen.blocks)  # bf16 over PCIe


def test_host_gradient_buffers_are_bf16_and_the_report_counts_their_bytes():
    seen = Seen()
    _, trainer = fit(LM, loader(24), l2l(host_state_dtype="bf16"), max_steps=2, callbacks=[seen])
    numel = sum(b.numel for b in seen.blocks)
    largest = max(b.numel for b in seen.blocks)
    for n, weights, grads, grad_bytes, grad_views in seen.buffers:
        assert grads == torch.bfloat16 and grad_bytes == 2 * n
        assert weights == torch.float32 and grad_views == {torch.bfloat16}
    assert seen.staging == [torch.bfloat16] * 2
    assert all(g is None for g in seen.grads)  # a bf16 gradient cannot be an fp32 parameter's p.grad
    # fp32 weights 4 + bf16 gradients 2 + two bf16 moments 4 bytes per parameter, + two bf16 staging buffers
    assert seen.report.host_state_bytes == 10 * numel + 2 * 2 * largest
    assert "host state" in str(seen.report) and "vdnn/host_state_GiB" in seen.report.metrics()
    fit(LM, loader(24), l2l(host_optimizer="torch"), max_steps=2, callbacks=[seen])
    assert seen.report.host_state_bytes == 16 * numel + 2 * 4 * largest


def test_accumulate_grad_batches_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2 with host_state_dtype='bf16'.*microbatches=2"):
        fit(LM, loader(24), l2l(host_state_dtype="bf16"), max_steps=2, accumulate_grad_batches=2)


def test_gradient_clipping_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="gradient clipping with host_state_dtype='bf16'.*host_state_dtype='fp32'"):
        fit(LM, loader(24), l2l(host_state_dtype="bf16"), max_steps=2, gradient_clip_val=1.0)


def test_fp16_loss_scaling_is_refused_with_the_fix():
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    with pytest.raises(ValueError, match="precision='16-mixed' has a loss scaler.*bf16-mixed"):
        LayerStreamer(model, "blocks", torch.device("cpu"), precision="16-mixed", host_state_dtype="bf16")


def _streamer_and_optimizer():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    streamer = LayerStreamer(model, "blocks", torch.device("cpu"), host_state_dtype="bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    streamer.steppers.append(HostStepper(opt, streamer.blocks, fused=True, state_dtype=torch.bfloat16))
    return model, streamer, opt


def test_a_second_backward_before_the_step_is_refused_in_plain_torch_too():
    model, streamer, opt = _streamer_and_optimizer()
    x = torch.randint(0, 256, (2, 16))
    model(x).square().mean().backward()
    with pytest.raises(GradientAccumulationError, match="second backward.*microbatches=k"):
        model(x).square().mean().backward()
    streamer.close()


def test_zero_grad_treats_the_bf16_gradients_as_plain_ones_and_the_end_of_streaming_lets_them_go():
    model, streamer, opt = _streamer_and_optimizer()
    block = streamer.blocks[0]
    x = torch.randint(0, 256, (2, 16))
    model(x).square().mean().backward()
    streamer.wait_grads()
    first = block.grad_flat.clone()
    opt.zero_grad(set_to_none=False)  # zeros, which the next backward replaces: the same as adding to them
    assert all(block.grad_of(k) is not None and not block.grad_of(k).any() for k in range(len(block.params)))
    model(x).square().mean().backward()
    streamer.wait_grads()
    assert torch.equal(block.grad_flat, first)
    opt.step()
    streamer.synchronize()
    opt.zero_grad()
    assert all(block.grad_of(k) is None for k in range(len(block.params)))
    model(x).square().mean().backward()
    streamer.wait_grads()
    weights = [p.detach().clone() for p in model.blocks[0].parameters()]
    streamer.close()
    params = list(model.blocks[0].parameters())
    assert all(p.grad is None for p in params)  # not widened at the end: the host is fullest then
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, weights))
    assert block.flat is None and block.grad_flat is None  # the host buffers are let go


def test_the_weights_copy_is_dropped_when_only_it_does_not_fit(monkeypatch):
    """Loads then copy fp32 weights and cast on the device; a host that cannot hold even that still fails."""
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    numel = sum(p.numel() for p in model.blocks.parameters())
    monkeypatch.setattr(LayerStreamer, "_copy_ratio", lambda self, precision, blocks: 0.5)
    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: (int(7.5 * numel), "the host"))  # 7 < 7.5 < 9
    with pytest.warns(UserWarning, match="cannot also hold a 0.5x copy"):
        streamer = LayerStreamer(model, "blocks", torch.device("cpu"), host_state_dtype="bf16")
    assert not streamer.host_copies
    streamer.close()
    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: (5 * numel, "the host"))
    with pytest.raises(MemoryError, match="gradients"):
        LayerStreamer(GPT(GPTConfig.from_name("gpt_tiny")), "blocks", torch.device("cpu"), host_state_dtype="bf16")


def test_a_pinned_arena_told_the_total_fills_large_chunks_with_little_left_over():
    """A 4096-wide block's fp32 weights and bf16 gradients, 50 blocks: without the total, every 805 MB buffer
    leaves a fifth of a 1 GiB chunk empty; with it, the chunks are powers of two up to ``MAX_CHUNK`` (8 GiB, so that
    releasing the blocks gives memory back as it goes), each losing less than one buffer."""
    numel = 12 * 4096**2
    requests = [n for _ in range(50) for n in (4 * numel, 2 * numel)] + [2 * numel] * 2
    data = sum(requests)
    assert PinnedArena.footprint(requests) > data + 18 * 2**30
    planned = PinnedArena.footprint(requests, total=data)
    assert data < planned < data + 2.5 * 2**30
