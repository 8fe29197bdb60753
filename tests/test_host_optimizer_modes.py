"""The host update's modes (``streaming/host_update.py``): torch's or DeepSpeed's kernel, fp32 or bf16 moments,
the compute-dtype copy written in the update's pass, and the bytes it counts."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import RecordingGPT, assert_same_params, fit, token_loader
from lightning_vdnn import VDNNConfig, VDNNStrategy
from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.streaming import host_update
from lightning_vdnn.streaming.host_optimizer import HostStepper
from lightning_vdnn.streaming.host_state import add_copies
from lightning_vdnn.streaming.host_update import AdamPass
from lightning_vdnn.streaming.streamer import LayerStreamer

pytestmark = pytest.mark.usefixtures("one_thread")


class LM(RecordingGPT):
    def __init__(self, **overrides) -> None:
        super().__init__(max_steps=12, **overrides)


class Passes(L.Callback):
    """Records, mid-training, each host stepper's one-pass update (None: a same-class optimizer)."""

    def __init__(self) -> None:
        self.seen: list = []

    def on_train_batch_end(self, trainer, *_):
        self.seen = [s.update_pass for s in trainer.strategy._streamer.steppers]


LR = 3e-3  # LanguageModel's for gpt_tiny


def l2l(**host) -> VDNNStrategy:
    return VDNNStrategy(config=VDNNConfig(activation_offload="none", layer_streaming=True, **host))


def loader(n: int = 24):
    return token_loader(n=n, batch=4, seq=32)


def block_numel() -> int:
    return sum(p.numel() for p in LM().model.blocks.parameters())


@pytest.mark.parametrize("cls, decay", [(torch.optim.AdamW, 0.1), (torch.optim.Adam, 0.01)])
def test_one_pass_is_bit_for_bit_torchs_fused_optimizer_and_writes_the_copy(monkeypatch, cls, decay):
    monkeypatch.setattr(host_update, "PIECE", 1000)  # several pieces, one not a multiple of any SIMD width
    torch.manual_seed(0)
    start = torch.randn(4100)
    ref, mine = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ref_opt, opt = cls([ref], lr=1e-2, weight_decay=decay, fused=True), cls([mine], lr=1e-2, weight_decay=decay)
    update, copy = AdamPass("torch"), torch.empty(4100, dtype=torch.bfloat16)
    for _ in range(4):
        grad = torch.randn(4100)
        ref.grad = grad.clone()
        ref_opt.step()
        update.update(opt, opt.param_groups[0], mine, mine.detach(), grad, opt.state[mine], copy)
    assert torch.equal(ref, mine) and torch.equal(copy, mine.detach().bfloat16())  # the copy: round to nearest
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(ref_opt.state[ref][key], opt.state[mine][key])


def test_default_mode_on_a_cpu_device_keeps_the_exact_per_tensor_loop():
    passes = Passes()
    _, trainer = fit(LM, loader(), l2l(), max_steps=2, callbacks=[passes])
    assert passes.seen == [None]
    assert trainer.strategy.memory_report().host_update_bytes == 0


@pytest.mark.parametrize("host, per_param", [({"host_optimizer": "torch"}, 28), ({"host_state_dtype": "bf16"}, 18)])
def test_byte_count_is_the_analytic_one(host, per_param):
    """fp32: weights, gradient, two moments read (16 bytes) and three written (12); the lean state (bf16 moments
    and bf16 gradients): 8 + 2 fewer."""
    _, trainer = fit(LM, loader(), l2l(**host), max_steps=3)
    report = trainer.strategy.memory_report()
    assert report.host_update_bytes == per_param * block_numel()
    assert "GiB of host memory read and written" in str(report) and "vdnn/host_update_GiB" in report.metrics()
    assert report.host_update_kernel_ms is None and "native kernel" not in str(report)  # torch's: no own clock
    lean = host_update.STATE_DTYPES[host.get("host_state_dtype", "fp32")]
    w, g = torch.empty(10), torch.empty(10, dtype=lean)
    update = AdamPass("torch", lean)
    update.count(w, g, torch.empty(10, dtype=torch.bfloat16))  # the copy a bf16 slot loads: 2 bytes more
    assert update.take_bytes() == 10 * (per_param + 2) and update.take_bytes() == 0


def test_torch_backend_matches_plain_training():
    """torch's fused kernel on the host: the rounding of a multi-tensor kernel, not the per-tensor loop's (within
    1% of the learning rate)."""
    ref, _ = fit(LM, loader(), max_steps=6, gradient_clip_val=1.0)
    got, _ = fit(LM, loader(), l2l(host_optimizer="torch"), max_steps=6, gradient_clip_val=1.0)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref, rtol=1e-4, atol=LR / 100)


def test_deepspeed_backend_matches_torch_within_rounding():
    """DeepSpeed's AVX kernel orders the arithmetic differently (bias correction, FMAs): same losses to 1e-5,
    parameters within 1% of the learning rate after 6 AdamW steps (Adam magnifies rounding on entries whose
    gradient is near zero)."""
    pytest.importorskip("deepspeed")
    ref, _ = fit(LM, loader(), l2l(host_optimizer="torch"), max_steps=6)
    passes = Passes()
    got, _ = fit(LM, loader(), l2l(host_optimizer="deepspeed"), max_steps=6, callbacks=[passes])
    assert [p.backend for p in passes.seen] == ["deepspeed"]
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref, rtol=1e-4, atol=LR / 100)


def test_bf16_moments_keep_the_loss_curve_within_a_stated_tolerance():
    """bf16 moments (fp32 master weights) against fp32 states over 12 AdamW steps with warm-up and cosine decay:
    every loss within 0.1% (measured: 3e-6 relative), the states bf16 in the user's optimizer."""
    ref, _ = fit(LM, loader(48), l2l(host_optimizer="torch"), max_steps=12)
    got, trainer = fit(LM, loader(48), l2l(host_state_dtype="bf16"), max_steps=12)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-3, atol=0)
    opt = trainer.optimizers[0]
    block = got.model.blocks[0].mlp.fc.weight
    assert opt.state[block]["exp_avg"].dtype == torch.bfloat16 and block.dtype == torch.float32


def test_checkpoints_with_bf16_moments_load_in_plain_lightning_and_old_ones_resume_in_bf16(tmp_path):
    _, trainer = fit(LM, loader(), l2l(host_state_dtype="bf16"), max_steps=2)
    path = tmp_path / "bf16.ckpt"
    trainer.save_checkpoint(path)
    torch.load(path, weights_only=False)  # a plain torch file: the moments are bf16 tensors in it
    for strategy in ("auto", l2l(host_state_dtype="bf16")):
        L.seed_everything(1, verbose=False)
        module = LM()
        resumed = L.Trainer(strategy=strategy, accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False)
        resumed.fit(module, loader(), ckpt_path=path)
        assert len(module.losses) == 2
    _, old = fit(LM, loader(), l2l(), max_steps=2)  # fp32 moments, written by the default mode
    old.save_checkpoint(tmp_path / "fp32.ckpt")
    L.seed_everything(1, verbose=False)
    module = LM()
    resumed = L.Trainer(strategy=l2l(host_state_dtype="bf16"), accelerator="cpu", max_steps=4, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    resumed.fit(module, loader(), ckpt_path=tmp_path / "fp32.ckpt")
    state = resumed.optimizers[0].state[module.model.blocks[0].mlp.fc.weight]
    assert state["exp_avg"].dtype == torch.bfloat16 and int(state["step"]) == 4


def test_the_update_writes_the_compute_dtype_copy_and_a_load_state_dict_recasts_it():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    streamer = LayerStreamer(model, "blocks", torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stepper = HostStepper(opt, streamer.blocks, fused=True, backend="torch")
    streamer.steppers.append(stepper)
    add_copies(streamer.blocks, torch.bfloat16, pin=False)
    block = streamer.blocks[0]
    assert not block.copy_current()
    assert torch.equal(block.fresh_copy(), block.flat.bfloat16()) and block.copy_current()
    model(torch.randint(0, 256, (2, 16))).square().mean().backward()
    opt.step()
    streamer.synchronize()
    assert block.copy_current() and torch.equal(block.copy, block.flat.bfloat16())  # written by the update
    weights = {k: torch.zeros_like(v) for k, v in block.module.state_dict().items()}
    block.module.load_state_dict(weights)
    assert not block.copy_current() and torch.equal(block.fresh_copy(), torch.zeros_like(block.copy))
    streamer.close()


@pytest.mark.parametrize("kwargs, pattern", [
    ({"host_optimizer": "cuda"}, "host_optimizer='cuda' is not a host update backend"),
    ({"host_state_dtype": "fp8"}, "host_state_dtype='fp8' is not understood"),
    ({"host_state_dtype": "bf16", "layer_streaming": False}, "layer_streaming is off"),
])
def test_bad_host_options_are_refused_with_the_fix(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        VDNNConfig(**{"layer_streaming": True, **kwargs})


class SGDModel(LM):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_bf16_moments_with_an_optimizer_that_has_none_are_refused():
    with pytest.raises(ValueError, match="runs Adam/AdamW only, and the optimizer is SGD"):
        fit(SGDModel, loader(), l2l(host_state_dtype="bf16"), max_steps=1)
