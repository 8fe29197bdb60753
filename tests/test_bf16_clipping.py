"""Gradient clipping and the blocks' bf16 host gradients (``host_state_dtype="bf16"``, ``streaming/bf16_grads.py``).

The bf16 gradients are host buffers, not ``p.grad``, so torch's clipping (behind Fabric's and Accelerate's) would
leave the streamed blocks out of the norm without a word. Every entry point refuses it, naming the fix; with fp32
host state each still clips exactly as plain training does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lightning_vdnn
from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.integrations.fabric import VDNNFabricStrategy
from lightning_vdnn.streaming.bf16_grads import Bf16GradBlock

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 3
REFUSED = r"{} with host_state_dtype='bf16': .*not in p\.grad.*Use host_state_dtype='fp32' to clip, or drop"


def gpt_tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("gpt_tiny"))


def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        tokens = torch.randint(0, 256, (4, 33), generator=g)
        yield tokens[:, :-1], tokens[:, 1:]


def loss_of(model, x, y) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def assert_same(got: torch.nn.Module, ref: torch.nn.Module) -> None:
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), rtol=1e-5, atol=1e-7, msg=name)
    for (name, b), c in zip(got.named_buffers(), ref.buffers()):
        assert torch.equal(b.cpu(), c.cpu()), name


def plain(clip) -> tuple[GPT, list[float]]:
    """The loop without streaming: torch's clipping, ``clip`` = ("norm" | "value", amount)."""
    model = gpt_tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for x, y in batches():
        loss = loss_of(model, x, y)
        loss.backward()
        how, amount = clip
        if how == "norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), amount)
        else:
            torch.nn.utils.clip_grad_value_(model.parameters(), amount)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


# -- plain PyTorch: the streamer's clipping (torch's own cannot see host buffers) ----------------------------------
def torch_loop(state: str, clip) -> tuple[GPT, list[float]]:
    model = gpt_tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    streamer = lightning_vdnn.stream_layers(model, opt, device="cpu", host_state_dtype=state)
    losses = []
    try:
        for x, y in batches():
            loss = loss_of(model, x, y)
            loss.backward()
            clip_with(streamer, clip, model)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        streamer.close()
    return model, losses



def clip_with(clipper, clip, model) -> None:
    """``clipper.clip_grad_norm_`` or ``clip_grad_value_`` (``clip``: ``("norm" | "value", amount)``)."""
    how, amount = clip
    getattr(clipper, f"clip_grad_{how}_")(model.parameters(), amount)
@pytest.mark.parametrize("clip, name", [(("norm", 0.5), "clip_grad_norm_"), (("value", 1e-3), "clip_grad_value_")])
def test_the_plain_loop_refuses_to_clip_bf16_host_gradients(clip, name):
    with pytest.raises(ValueError, match=REFUSED.format(name)):
        torch_loop("bf16", clip)


def test_stream_layers_keeps_the_host_state_dtype_it_is_given():
    model = gpt_tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    streamer = lightning_vdnn.stream_layers(model, opt, device="cpu", host_state_dtype="bf16")
    assert all(isinstance(b, Bf16GradBlock) for b in streamer.blocks)
    streamer.close()


@pytest.mark.parametrize("clip", [("norm", 0.5), ("value", 1e-3)])
def test_the_plain_loop_clips_fp32_host_gradients_as_torch_does(clip):
    (got, losses), (ref, ref_losses) = torch_loop("fp32", clip), plain(clip)
    assert losses == ref_losses
    assert_same(got, ref)


# -- Lightning Fabric ------------------------------------------------------------------------------------------
def fabric_loop(strategy, clip) -> tuple[torch.nn.Module, list[float]]:
    from lightning.fabric import Fabric

    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=1)
    model = gpt_tiny()
    model, opt = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    losses = []
    try:
        for x, y in batches():
            loss = loss_of(model, x, y)
            fabric.backward(loss)
            how, amount = clip
            if how == "norm":
                fabric.clip_gradients(model, opt, max_norm=amount)
            else:
                fabric.clip_gradients(model, opt, clip_val=amount)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        fabric.strategy.teardown()
    return model, losses


@pytest.mark.parametrize("clip, name", [(("norm", 0.5), r"fabric\.clip_gradients\(max_norm=\.\.\.\)"),
                                        (("value", 1e-3), r"fabric\.clip_gradients\(clip_val=\.\.\.\)")])
def test_fabric_refuses_to_clip_bf16_host_gradients(clip, name):
    with pytest.raises(ValueError, match=REFUSED.format(name)):
        fabric_loop(VDNNFabricStrategy("none", layer_streaming=True, host_state_dtype="bf16"), clip)


@pytest.mark.parametrize("clip", [("norm", 0.5), ("value", 1e-3)])
def test_fabric_clips_fp32_host_gradients_as_plain_fabric_does(clip):
    got, losses = fabric_loop(VDNNFabricStrategy("none", layer_streaming=True), clip)
    ref, ref_losses = fabric_loop("auto", clip)
    assert losses == ref_losses
    assert_same(got, ref)


# -- Hugging Face Accelerate -----------------------------------------------------------------------------------
def accelerate_loop(clip, **streaming) -> tuple[torch.nn.Module, list[float]]:
    from accelerate import Accelerator

    import lightning_vdnn.integrations.accelerate as vdnn_accelerate

    accelerator = Accelerator(cpu=True)
    model = gpt_tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if streaming:
        model, opt = vdnn_accelerate.prepare(accelerator, model, opt, policy="none", layer_streaming=True,
                                             **streaming)
    else:
        model, opt = accelerator.prepare(model, opt)
    losses = []
    try:
        for x, y in batches():
            loss = loss_of(model, x, y)
            accelerator.backward(loss)
            clip_with(accelerator, clip, model)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        if streaming:
            vdnn_accelerate.release(model)
    return model, losses


@pytest.mark.parametrize("clip, name", [(("norm", 0.5), r"accelerator\.clip_grad_norm_"),
                                        (("value", 1e-3), r"accelerator\.clip_grad_value_")])
def test_accelerate_refuses_to_clip_bf16_host_gradients(clip, name):
    with pytest.raises(ValueError, match=REFUSED.format(name)):
        accelerate_loop(clip, host_state_dtype="bf16")


@pytest.mark.parametrize("clip", [("norm", 0.5), ("value", 1e-3)])
def test_accelerate_clips_fp32_host_gradients_as_plain_accelerate_does(clip):
    got, losses = accelerate_loop(clip, host_state_dtype="fp32")
    ref, ref_losses = accelerate_loop(clip)
    assert losses == ref_losses
    assert_same(got, ref)
