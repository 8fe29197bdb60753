"""L2L layer streaming on a CUDA device: real streams, pinned buffers, bf16 slots. Skipped without CUDA."""

from __future__ import annotations

import gc

import lightning as L
import pytest
import torch

from conftest import RecordingGPT, fit, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.examples.tasks import param_groups

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU = dict(accelerator="gpu", devices=1)
LM = RecordingGPT


@pytest.mark.parametrize("clip, microbatches, policy, saved", [  # updates at the step / in backward
    (1.0, 1, "none", None), (None, 1, "none", None), (1.0, 4, "none", None),
    (1.0, 1, "all", None), (None, 4, "none", 2), (None, 1, "all", 2),  # blocks saving: offloaded, or kept
])
def test_bf16_matches_plain_within_tolerance(clip, microbatches, policy, saved):
    kw = dict(max_steps=6, precision="bf16-mixed", gradient_clip_val=clip, accumulate_grad_batches=2, **GPU)
    ref, _ = fit(LM, token_loader(n=96), **kw)
    strategy = VDNNStrategy(policy, layer_streaming=True, microbatches=microbatches, saved_blocks=saved,
                            min_offload_bytes=0)
    got, trainer = fit(LM, token_loader(n=96), strategy, **kw)
    if policy == "all":
        assert trainer.strategy.memory_report().offloaded_bytes > 0
    blocks = len(got.model.blocks)
    assert trainer.strategy._last_eager_updates == (0 if clip else trainer.global_step * blocks)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=2e-2, atol=2e-2)
    # bf16 gradients of tiny entries can differ in sign between two summation orders, and Adam turns any
    # sign into a step of about lr: elementwise, allow 2 * lr per optimizer step; as a whole, stay within 1%.
    lr, steps = got.hparams.lr, 3
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2 * lr * steps, msg=lambda m: f"{name}: {m}")
    flat = lambda m: torch.cat([p.detach().float().flatten().cpu() for p in m.parameters()])  # noqa: E731
    assert (flat(got) - flat(ref)).norm() <= 1e-2 * flat(ref).norm()
    assert got.model.lm_head.weight is got.model.wte.weight


class FusedLM(LM):
    """AdamW with torch's fused CUDA kernel, as the benchmark's: it wants ``step`` on the device."""

    def configure_optimizers(self):
        return torch.optim.AdamW(param_groups(self.model, self.hparams.weight_decay), lr=self.hparams.lr, fused=True)


class Probe(L.Callback):
    """Blocks stay in page-locked host memory during training; peak device memory is recorded at the end. The
    streamer's arena locks its chunks with ``cudaHostRegister``, which ``Tensor.is_pinned()`` does not report on
    every torch (2.11: False): a block is locked where it lies in one of the arena's live chunks."""

    def on_before_optimizer_step(self, trainer, module, optimizer):
        streamer = getattr(trainer.strategy, "_streamer", None)
        if streamer is not None:
            arena = streamer._arena
            assert arena.pin and all(p.device.type == "cpu" and arena.chunk_of(p) is not None
                                     for b in streamer.blocks for p in b.params)
            assert module.model.wte.weight.device.type == "cuda"


def peak(strategy) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    big = lambda: LM(n_embd=1024, n_head=16, n_layer=8, block_size=64)  # noqa: E731  (~100M params in blocks)
    fit(big, token_loader(n=8, batch=2, seq=64), strategy, max_steps=2, precision="bf16-mixed", callbacks=[Probe()],
        **GPU)
    return torch.cuda.max_memory_allocated()


def test_peak_memory_far_below_plain_for_8_blocks():
    plain, streamed = peak("auto"), peak(VDNNStrategy("none", layer_streaming=True))
    print(f"peak plain {plain / 2**20:.0f} MiB, l2l {streamed / 2**20:.0f} MiB")
    assert streamed < 0.3 * plain


@pytest.mark.parametrize("cls", [LM, FusedLM], ids=["foreach", "fused"])
def test_budget_picks_resident_blocks_and_the_measured_step_fits_it(cls):
    """``memory_budget`` with layer streaming: after one all-streamed step, some blocks move to the device and
    the steps measured after that stay within the budget (lowering the count if the first choice did not). A
    fused AdamW steps the resident blocks on the device with the ``step`` count the host kept."""
    streamed = peak(VDNNStrategy("none", layer_streaming=True))
    big = lambda: cls(n_embd=1024, n_head=16, n_layer=8, block_size=64)  # noqa: E731
    block = 16 * sum(p.numel() for p in big().model.blocks[0].parameters())  # AdamW: weights, grads, 2 moments
    budget = streamed + 4 * block
    strategy = VDNNStrategy("none", layer_streaming=True, memory_budget=budget)
    fit(big, token_loader(n=32, batch=2, seq=64), strategy, max_steps=8, precision="bf16-mixed", **GPU)
    report = strategy.memory_report()
    print(f"budget {budget / 2**20:.0f} MiB: {report.resident_blocks} resident, predicted "
          f"{report.resident_predicted_peak_bytes / 2**20:.0f} MiB, measured "
          f"{report.resident_measured_peak_bytes / 2**20:.0f} MiB")
    assert 0 < report.resident_blocks < 7 and report.resident_budget_bytes == budget
    assert report.resident_measured_peak_bytes <= budget


@pytest.mark.parametrize("budget", [None, "auto"], ids=["fixed", "auto-resident"])
def test_offload_optimizer_keeps_the_outside_modules_state_on_the_host(budget):
    """Also across a switch of ``resident_blocks="auto"``, which moves only the newly resident blocks' state."""
    kw = dict(max_steps=4, precision="bf16-mixed", **GPU)
    extra = {} if budget is None else {"memory_budget": "90%"}
    ref, _ = fit(LM, token_loader(n=64), **kw)

    class State(L.Callback):
        def on_train_batch_end(self, trainer, module, *_):
            state = trainer.optimizers[0].state[module.model.wte.weight]
            self.devices = {v.device.type for k, v in state.items() if k != "step"}
            self.weight = module.model.wte.weight.device.type

    state = State()
    got, _ = fit(LM, token_loader(n=64), VDNNStrategy("none", layer_streaming=True, offload_optimizer=True, **extra),
                 callbacks=[state], **kw)
    assert state.devices == {"cpu"} and state.weight == "cuda"
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=2e-2, atol=2e-2)


def test_vdnn_streams_a_model_whose_state_fills_the_budget_and_fits_it():
    """``strategy="vdnn"`` given a budget the weights, gradients and AdamW state alone would fill: it streams the
    blocks (``planning/when_to_stream.py``), brings back as many as fit, and the steps measured after that stay within it."""
    from lightning_vdnn.planning.when_to_stream import training_state_bytes

    big = lambda: LM(n_embd=1024, n_head=16, n_layer=8, block_size=64)  # noqa: E731
    budget = int(0.6 * training_state_bytes(big(), "bf16-mixed"))
    kw = dict(max_steps=8, precision="bf16-mixed", **GPU)
    ref, _ = fit(big, token_loader(n=32, batch=2, seq=64), **kw)
    strategy = VDNNStrategy(memory_budget=budget)  # what Trainer(strategy="vdnn") builds, with a budget
    got, _ = fit(big, token_loader(n=32, batch=2, seq=64), strategy, **kw)
    report = strategy.memory_report()
    print(f"budget {budget / 2**20:.0f} MiB: {report.resident_blocks} resident, measured "
          f"{report.resident_measured_peak_bytes / 2**20:.0f} MiB")
    assert strategy.config.layer_streaming is True and 0 < report.resident_blocks < 8
    assert report.resident_measured_peak_bytes <= budget
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("strategy, where", [("auto", "cuda"), ("l2l", "cpu"), ("vdnn", "cpu"), ("vdnn_all", "cuda")])
def test_init_module_builds_in_host_memory_where_the_blocks_may_stream(strategy, where):
    """``trainer.init_module()`` (and ``configure_model``) build on the device under Lightning's strategies; under
    ours that may stream, in host memory: nothing allocated on the device while the model is built."""
    trainer = L.Trainer(strategy=strategy, logger=False, **GPU)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with trainer.init_module():
        model = LM(n_embd=512, n_head=8, n_layer=4, block_size=64)
    assert {p.device.type for p in model.parameters()} == {where}
    if where == "cpu":
        assert torch.cuda.memory_allocated() == before


def test_auto_saving_keeps_what_fits_the_budget_and_the_step_fits_it():
    """``saved_blocks="auto"`` between a run that recomputes every block and one that saves all 8: it chooses
    some, and the steps measured after the choice stay within the budget."""
    big = lambda: LM(n_embd=1024, n_head=16, n_layer=8, block_size=64)  # noqa: E731

    def run(**kw):
        gc.collect()  # the runs before must not leave device memory behind: the budget is absolute
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _, trainer = fit(big, token_loader(n=24, batch=8, seq=64), VDNNStrategy("none", layer_streaming=True, **kw),
                         max_steps=6, precision="bf16-mixed", **GPU)
        return trainer.strategy.memory_report(), torch.cuda.max_memory_allocated()

    _, none = run(saved_blocks=0)
    _, every = run(saved_blocks=8)
    budget = none + 3 * (every - none) // 4
    report, _ = run(saved_blocks="auto", memory_budget=budget)
    print(f"recompute all {none / 2**20:.0f} MiB, save all {every / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB:"
          f" {report.saved_blocks} saving, predicted {report.saved_predicted_peak_bytes / 2**20:.0f} MiB, "
          f"measured {report.saved_measured_peak_bytes / 2**20:.0f} MiB")
    assert 0 < report.saved_blocks < 8
    assert report.saved_measured_peak_bytes <= budget and report.saved_predicted_peak_bytes <= budget


@pytest.mark.parametrize("name, microbatches, policy", [
    ("llama", 1, "none"), ("llama", 2, "none"), ("llama", 1, "all"), ("t5", 2, "none"), ("gpt2", 1, "none"),
    ("resnet", 1, "none"), ("mixtral", 1, "none"),
])
def test_library_models_stream_on_cuda_like_plain(name, microbatches, policy):
    """Unmodified library models (tiny configs) on real streams and pinned buffers: fp32, so the run is plain's to
    rounding, BatchNorm statistics included."""
    pytest.importorskip("transformers")
    import test_streaming_models as lib

    def train(strategy):
        loader = torch.utils.data.DataLoader(lib.batches(lib.MODELS[name][1], 4), batch_size=None)
        task, _ = fit(lambda: lib.Task(name, 0.0), loader, strategy, max_steps=4, **GPU)
        return task

    ref = train("auto")
    got = train(VDNNStrategy(policy, layer_streaming=True, microbatches=microbatches, min_offload_bytes=0))
    lib.assert_same_training(got, ref, tol=1e-4)


def test_pinned_block_weights_save_to_safetensors_whole(tmp_path, monkeypatch):
    """``state_dict()`` of blocks streamed from pinned host buffers: each weight its own storage slice of the
    page-locked chunk (``streaming/state_dict_storage.py``), which safetensors saves whole and a plain model loads."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    import test_streaming_models as lib
    from lightning_vdnn import stream_layers
    from test_gpu_host_release import Locks

    locks = Locks(monkeypatch)  # Tensor.is_pinned() is False for memory cudaHostRegister locked
    model = lib.llama()
    streamer = stream_layers(model, lib.sgd(model), device="cuda", pin_memory=True)
    assert locks.hold(model.model.layers[0].mlp.up_proj.weight)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    plain = lib.llama()
    plain.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key].cpu(), value.cpu()), key
    streamer.close()


@pytest.mark.parametrize("microbatches", [1, 2])
def test_moe_load_balancing_loss_streams_on_cuda_like_plain(microbatches):
    """Router logits recorded inside the streamed blocks (``streaming/inner_hooks.py``) on real streams: fp32, the
    run is plain's to rounding."""
    pytest.importorskip("transformers")
    import test_streaming_models as lib

    def train(strategy):
        loader = torch.utils.data.DataLoader(lib.batches("tokens", 4), batch_size=None)
        task, _ = fit(lambda: lib.RouterLoss("mixtral"), loader, strategy, max_steps=4, **GPU)
        return task

    ref = train("auto")
    lib.assert_same_training(train(VDNNStrategy("none", layer_streaming=True, microbatches=microbatches)), ref,
                             tol=1e-4)


@pytest.mark.parametrize("name, precision, microbatches", [
    ("t5", "bf16-mixed", 1), ("swin", "bf16-mixed", 1), ("llama", "bf16-true", 1), ("llama", "bf16-true", 2),
    ("bloom", "bf16-mixed", 2), ("gemma2", "bf16-mixed", 2),
])
def test_library_models_stream_on_cuda_in_half_precision_like_plain(name, precision, microbatches):
    """Under autocast (forward runs each block with autograd, as plain: attention with a mask takes plain's
    kernel) and in bf16-true (the host holds the bf16 weights; no copy), within bf16's tolerance of plain."""
    pytest.importorskip("transformers")
    import test_streaming_models as lib

    def train(strategy):
        loader = torch.utils.data.DataLoader(lib.batches(lib.MODELS[name][1], 4), batch_size=None)
        task, trainer = fit(lambda: lib.Task(name, 0.0), loader, strategy, max_steps=4, precision=precision, **GPU)
        return task, trainer

    ref, _ = train("auto")
    got, trainer = train(VDNNStrategy("none", layer_streaming=True, microbatches=microbatches))
    lib.assert_same_training(got, ref, tol=2e-2)
    if precision == "bf16-true":
        assert {p.dtype for p in got.parameters()} == {torch.bfloat16}


def test_lora_in_bf16_true_on_cuda_copies_back_only_the_adapters_gradients():
    """``peft`` LoRA, bf16-true, on real streams: the adapters' bf16 gradients are all that crosses back."""
    pytest.importorskip("peft")
    import test_frozen_parameters as frozen

    def train(strategy):
        task, trainer = fit(lambda: frozen.Task(frozen.lora), frozen.loader(), strategy, max_steps=frozen.STEPS,
                            precision="bf16-true", **GPU)
        return task, trainer

    ref, _ = train("auto")
    got, trainer = train(VDNNStrategy("none", layer_streaming=True))
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=2e-2, atol=0)
    assert trainer.strategy.memory_report().streamed_d2h_bytes == 2 * sum(frozen.trained_numel(got))
