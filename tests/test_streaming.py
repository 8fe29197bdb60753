"""L2L layer streaming against plain Lightning training: same losses, same parameters, weights on the host."""

from __future__ import annotations

import copy
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import lightning_vdnn
from conftest import Classifier, ResidualCNN, assert_same_params, fit, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.streaming.calls import Joined
from lightning_vdnn.streaming.streamer import LayerStreamer
from lightning_vdnn.examples.tasks import LanguageModel

STEPS = dict(gradient_clip_val=1.0, accumulate_grad_batches=2)


pytestmark = pytest.mark.usefixtures("one_thread")


class LM(LanguageModel):
    """LanguageModel (AdamW with weight-decay groups, warm-up + cosine) that records its training losses."""

    def __init__(self, model: str = "gpt_tiny", warmup_steps: int = 3, max_steps: int = 5, **overrides) -> None:
        super().__init__(model, warmup_steps=warmup_steps, max_steps=max_steps, **overrides)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def lm(name: str = "gpt_tiny", dropout: float = 0.0, chunks: int = 1):
    """A fresh LM; ``chunks`` > 1 makes it the plain reference for ``microbatches=chunks``: each block runs its
    input in that many dim-0 chunks under ordinary autograd (the same arithmetic and the same dropout draws)."""
    def make() -> LM:
        module = LM(name, dropout=dropout)
        for block in module.model.blocks if chunks > 1 else ():
            block.forward = lambda x, f=block.forward: torch.cat([f(c) for c in x.tensor_split(min(chunks, len(x)))])
        return module
    return make


def loader(n: int = 40):
    return token_loader(n=n, batch=4, seq=32)


def l2l(**kw) -> VDNNStrategy:
    return VDNNStrategy(kw.pop("activation_offload", "none"), layer_streaming=True, **kw)


def assert_same_run(got: LM, ref: LM) -> None:
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)
    if got.config.tie_embeddings:
        assert got.model.lm_head.weight is got.model.wte.weight


@pytest.mark.parametrize("name, dropout, microbatches", [
    ("gpt_tiny", 0.0, 1), ("gpt_tiny", 0.1, 1), ("llama_tiny", 0.0, 1),
    ("gpt_tiny", 0.0, 4), ("llama_tiny", 0.0, 4), ("gpt_tiny", 0.0, 3),  # 3: uneven chunks of a batch of 4
    ("llama_tiny", 0.1, 4),  # dropout: each chunk's recompute replays that chunk's RNG state
])
def test_matches_plain_with_clipping_accumulation_and_schedule(name, dropout, microbatches):
    """With microbatches, plain training whose blocks run the same chunks is the reference (same dropout draws,
    same gradient sums); ``test_microbatches_equal_unchunked_plain_training`` compares against the whole batch."""
    ref, _ = fit(lm(name, dropout, chunks=microbatches), loader(), max_steps=5, **STEPS)
    strategy = l2l(layers="model.blocks", microbatches=microbatches)
    got, trainer = fit(lm(name, dropout), loader(), strategy, max_steps=5, **STEPS)
    assert len(got.losses) == 10
    assert_same_run(got, ref)
    assert trainer.strategy._streamer is None  # torn down: ordinary module again
    assert "forward" not in got.model.blocks[0].__dict__


@pytest.mark.parametrize("name", ["gpt_tiny", "llama_tiny"])
def test_microbatches_equal_unchunked_plain_training(name):
    """``microbatches=4`` against plain training on the whole batch. The losses agree to rounding. Parameters
    agree to rtol 1e-5 except where AdamW divides a near-zero gradient by its own RMS (the key bias, which
    softmax ignores): there a rounding difference in a sum over 4 chunks instead of one batch moves the entry
    by up to ~1% of lr. Plain PyTorch running the blocks in chunks differs from the whole batch by exactly
    as much (``got`` equals that reference bit for bit in the test above)."""
    ref, _ = fit(lm(name), loader(), max_steps=5, **STEPS)
    got, _ = fit(lm(name), loader(), l2l(layers="model.blocks", microbatches=4), max_steps=5, **STEPS)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref, rtol=1e-5, atol=0.02 * got.hparams.lr)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert (flat(got) - flat(ref)).norm() <= 1e-5 * flat(ref).norm()


def test_registered_name_and_activation_offload_on_top():
    assert "l2l" in StrategyRegistry
    trainer = L.Trainer(strategy="l2l", accelerator="cpu", devices=1, logger=False)
    assert trainer.strategy.config.layer_streaming and trainer.strategy.config.activation_offload == "none"
    ref, _ = fit(lm(dropout=0.1), loader(24), max_steps=3, **STEPS)
    got, _ = fit(lm(dropout=0.1), loader(24), "l2l", max_steps=3, **STEPS)
    assert_same_run(got, ref)
    got, trainer = fit(lm(dropout=0.1), loader(24), l2l(activation_offload="all", min_offload_bytes=0),
                       max_steps=3, **STEPS)
    assert_same_run(got, ref)
    assert trainer.strategy.memory_report().offloaded_bytes > 0  # the saved block inputs went to the host
    ref, _ = fit(lm(dropout=0.1, chunks=2), loader(24), max_steps=3, **STEPS)
    got, trainer = fit(lm(dropout=0.1), loader(24), l2l(activation_offload="all", min_offload_bytes=0,
                                                        microbatches=2), max_steps=3, **STEPS)
    assert_same_run(got, ref)
    assert trainer.strategy.memory_report().offloaded_bytes > 0


@pytest.mark.parametrize("microbatches", [1, 4])
def test_memory_report_counts_streamed_bytes(microbatches):
    """Weights stream as often, and gradients once per block, however many microbatches run."""
    _, trainer = fit(lm(), loader(24), l2l(microbatches=microbatches), max_steps=3)
    report = trainer.strategy.memory_report()
    block = 4 * sum(p.numel() for p in LM().model.blocks[0].parameters())  # fp32 bytes of one block
    # forward loads all 4 blocks; backward finds the last two still in the slots and loads the first two again
    assert report.streamed_h2d_bytes == 6 * block and report.streamed_d2h_bytes == 4 * block
    assert report.host_optimizer_ms > 0 and "layer streaming" in str(report)
    assert "vdnn/streamed_h2d_GiB" in report.metrics()
    assert report.microbatches == microbatches and ("4 microbatches" in str(report)) == (microbatches == 4)


class RowsSeen(L.Callback):
    """Records how many rows the first block's MLP and the LM head compute at a time (pre-hooks: the forward hooks
    of modules inside a streamed block run once per call, on the whole batch, ``streaming/inner_hooks.py``)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {"block": [], "head": []}

    def setup(self, trainer, module, stage):
        for key, layer in (("block", module.model.blocks[0].mlp.fc), ("head", module.model.lm_head)):
            if not layer._forward_pre_hooks:  # once, though validate sets up again
                layer.register_forward_pre_hook(lambda m, args, key=key: self.seen[key].append(len(args[0])))


def test_blocks_compute_one_chunk_at_a_time_and_the_head_the_whole_batch():
    """Block internals (forward, backward's recompute, and validation) see a quarter of the batch at a time:
    the activation memory of a block is that of one chunk. Modules outside the blocks see the whole batch."""
    rows = RowsSeen()
    got, trainer = fit(lm(), loader(8), l2l(microbatches=4), max_steps=1, callbacks=[rows])
    assert rows.seen == {"block": [1] * 8, "head": [4]}  # 4 chunks forward, 4 recomputed
    ref, plain = fit(lm(chunks=4), loader(8), max_steps=1)
    ours, theirs = trainer.validate(got, loader(8), verbose=False), plain.validate(ref, loader(8), verbose=False)
    assert ours[0]["val/loss"] == pytest.approx(theirs[0]["val/loss"], rel=1e-6)
    assert rows.seen["block"][8:] == [1] * 8 and rows.seen["head"][1:] == [4, 4]  # 2 batches, forward only


def test_batch_smaller_than_microbatches_runs_one_row_per_chunk():
    """An epoch's last batch (2 rows here) with microbatches=4 runs as 2 chunks, not as empty ones."""
    data = token_loader(n=10, batch=4, seq=32)  # batches of 4, 4, 2
    ref, _ = fit(lm(chunks=4), data, max_steps=3)
    rows = RowsSeen()
    got, _ = fit(lm(), data, l2l(microbatches=4), max_steps=3, callbacks=[rows])
    assert_same_run(got, ref)
    assert rows.seen["head"] == [4, 4, 2] and rows.seen["block"] == [1] * 20


class Norm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x)


class Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x).mean(0, keepdim=True)  # mixes the samples of a batch: wrong for a streamed block


def test_microbatches_refuse_what_would_change_the_result():
    with pytest.raises(ValueError, match=r"microbatches=0 must be a positive integer"):
        LayerStreamer(GPT(GPTConfig.from_name("gpt_tiny")), "blocks", torch.device("cpu"), microbatches=0)
    batchnorm = nn.ModuleList(Norm(nn.BatchNorm1d(4)) for _ in range(2))
    with pytest.raises(ValueError, match=r"microbatches=2 .* layers\.0\.norm is a BatchNorm1d.* microbatches=1"):
        LayerStreamer(nn.ModuleDict({"layers": batchnorm}), "layers", torch.device("cpu"), microbatches=2)
    LayerStreamer(nn.ModuleDict({"layers": batchnorm}), "layers", torch.device("cpu")).close()  # fine unsplit
    root = nn.ModuleDict({"layers": nn.ModuleList(Pooled() for _ in range(2))})
    streamer = LayerStreamer(root, "layers", torch.device("cpu"), microbatches=2)
    with pytest.raises(ValueError, match=r"Pooled at 'layers' returned shape \(1, 4\) for a chunk of shape \(2, 4\)"):
        root["layers"][0](torch.randn(4, 4))
    streamer.close()


class HostCheck(L.Callback):
    """Looks, mid-training, at where every block parameter and gradient lives."""

    def __init__(self) -> None:
        self.checked = 0

    def on_before_optimizer_step(self, trainer, module, optimizer):
        streamer = trainer.strategy._streamer
        for block in streamer.blocks:
            flat, grads = block.flat.untyped_storage().data_ptr(), block.grad_flat.untyped_storage().data_ptr()
            for p in block.params:
                assert p.device.type == "cpu" and p.untyped_storage().data_ptr() == flat
                assert p.grad.untyped_storage().data_ptr() == grads
                assert all(t.device.type == "cpu" for t in optimizer.state.get(p, {}).values())
        assert streamer.stats()["streamed_h2d_bytes"] > 0 and streamer.stats()["streamed_d2h_bytes"] > 0
        self.checked += 1


def test_block_weights_grads_and_state_live_in_host_flat_buffers():
    check = HostCheck()
    got, _ = fit(lm(), loader(24), "l2l", max_steps=3, callbacks=[check])
    assert check.checked == 3
    blocks = got.model.blocks
    assert len({p.untyped_storage().data_ptr() for p in blocks.parameters()}) == len(list(blocks.parameters()))


def resume(strategy, path, steps: int = 4) -> LM:
    L.seed_everything(1, verbose=False)
    module = LM()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module, loader(8), ckpt_path=path)
    return module


def test_checkpoint_loads_into_plain_model_and_resume_continues(tmp_path):
    full, _ = fit(lm(), loader(8), "l2l", max_steps=4, gradient_clip_val=1.0)
    half, trainer = fit(lm(), loader(8), "l2l", max_steps=2, gradient_clip_val=1.0)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    plain = LM.load_from_checkpoint(path)
    assert_same_params(plain, half, rtol=0, atol=0)
    ours, theirs = resume("l2l", path), resume("auto", path)
    assert ours.losses[0] == pytest.approx(full.losses[2], rel=1e-6)  # the weights continue where they stopped
    # Lightning's own resume is not bit-identical to an uninterrupted run (plain training differs from step 3
    # on too), so the optimizer state and schedule are checked against plain Lightning resuming the same file.
    assert_same_run(ours, theirs)


def test_validate_test_predict_stream_and_match_plain():
    got, trainer = fit(lm(), loader(24), "l2l", max_steps=2)
    ref, plain = fit(lm(), loader(24), max_steps=2)
    for run in ("validate", "test"):
        ours = getattr(trainer, run)(got, loader(16), verbose=False)[0]
        theirs = getattr(plain, run)(ref, loader(16), verbose=False)[0]
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5)
    assert torch.equal(torch.cat(trainer.predict(got, loader(8))), torch.cat(plain.predict(ref, loader(8))))
    fresh = L.Trainer(strategy="l2l", accelerator="cpu", logger=False, enable_progress_bar=False)
    assert fresh.validate(LM(), loader(8), verbose=False)[0]["val/loss"] > 0


class Mixed(LM):
    def __init__(self) -> None:
        super().__init__()
        self.model.blocks.append(nn.Linear(128, 128))


@pytest.mark.parametrize("make, strategy, pattern", [
    (lm(), l2l(layers="model.layers"), r"layers='model\.layers' does not exist.*'model\.blocks'"),
    (lambda: Classifier(ResidualCNN()), "l2l", r"found no nn\.ModuleList.*pass layers="),
])
def test_bad_layers_fail_before_training_with_the_fix(make, strategy, pattern):
    with pytest.raises(ValueError, match=pattern):
        fit(make, loader(8), strategy, max_steps=1)


def test_a_named_list_of_blocks_of_several_classes_streams_like_plain():
    """``layers=`` may name blocks of different classes (a hybrid model's): each keeps its own host layout, and
    the slots are as large as the largest."""
    class Sizes(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            self.numels = {b.numel for b in trainer.strategy._streamer.blocks}

    ref, _ = fit(Mixed, loader(16), max_steps=3)
    sizes = Sizes()
    got, _ = fit(Mixed, loader(16), l2l(layers="model.blocks"), max_steps=3, callbacks=[sizes])
    assert_same_run(got, ref)
    assert len(sizes.numels) == 2


class Stashing(nn.Module):
    """A block that keeps an intermediate on itself, which the loss then uses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inner = self.fc(x).relu()
        return x + self.inner


def test_a_tensor_kept_from_inside_a_streamed_block_fails_in_backward_naming_the_ways_out():
    model = nn.Sequential(*(Stashing() for _ in range(3)))
    streamer = lightning_vdnn.stream_layers(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu",
                                            pin_memory=False)
    loss = model(torch.randn(4, 8)).sum() + model[1].inner.square().sum()
    with pytest.raises(RuntimeError, match=r"reached backward by another way than the block's outputs.*forward hook"):
        loss.backward()
    streamer.close()


class LBFGSModel(LM):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters())


def test_unsupported_optimizer_is_named():
    with pytest.raises(TypeError, match=r"LBFGS.*Supported: SGD, Adam, AdamW"):
        fit(LBFGSModel, loader(8), "l2l", max_steps=1)


def test_weights_shared_with_outside_or_across_blocks_are_refused():
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    model.blocks[1].ln_1.weight = model.blocks[0].ln_1.weight
    with pytest.raises(ValueError, match="Blocks 0 and 1 .* share a parameter"):
        LayerStreamer(model, "blocks", torch.device("cpu"))
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    model.ln_f.weight = model.blocks[3].ln_2.weight
    with pytest.raises(ValueError, match=r"LayerNorm\.weight outside layers='blocks' is a parameter of block 3"):
        LayerStreamer(model, "blocks", torch.device("cpu"))


def test_frozen_block_parameters_and_repeated_backward_accumulate_like_autograd():
    torch.manual_seed(0)
    ref = GPT(GPTConfig.from_name("llama_tiny"))
    got = GPT(GPTConfig.from_name("llama_tiny"))
    got.load_state_dict(ref.state_dict())
    for model in (ref, got):
        model.blocks[1].attn.qkv.weight.requires_grad_(False)
    streamer = LayerStreamer(got, None, torch.device("cpu"))
    x = torch.randint(0, 256, (2, 16))
    for step in range(3):
        for model in (ref, got):
            model(x).square().mean().backward()
        if step == 1:  # set_to_none, as optimizer.zero_grad() does: the host grad views come back lazily
            for model in (ref, got):
                model.zero_grad()
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    streamer.close()


class Exploding(LM):
    explode_at = 1

    def training_step(self, batch, batch_idx):
        if batch_idx == self.explode_at:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_exception_leaves_an_ordinary_module_that_trains_again():
    module = Exploding()
    with pytest.raises(RuntimeError, match="boom"):
        fit(lambda: module, loader(24), "l2l", max_steps=3)
    blocks = module.model.blocks
    assert all("forward" not in b.__dict__ for b in blocks)
    assert len({p.untyped_storage().data_ptr() for p in blocks.parameters()}) == len(list(blocks.parameters()))
    module.explode_at = -1
    fit(lambda: module, loader(24), "l2l", max_steps=2)
    assert len(module.losses) == 3


class Snapshot(L.Callback):
    """Saves a checkpoint after step 2, while the blocks' host updates may still be queued."""

    def __init__(self, path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 2 and not self.path.exists():
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_blocks_update_during_backward_when_nothing_rewrites_grads(tmp_path, accumulate):
    """No clipping, no scaler: each block is updated on the host as its gradients land, and the run (and a
    checkpoint taken between steps, with updates in flight) equals plain training."""
    ref, _ = fit(lm(), loader(), max_steps=4, accumulate_grad_batches=accumulate,
                 callbacks=[Snapshot(tmp_path / "ref.ckpt")])
    got, trainer = fit(lm(), loader(), "l2l", max_steps=4, accumulate_grad_batches=accumulate,
                       callbacks=[Snapshot(tmp_path / "got.ckpt")])
    assert_same_run(got, ref)
    ours, theirs = (torch.load(tmp_path / f"{n}.ckpt", weights_only=False) for n in ("got", "ref"))
    for key, value in theirs["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    blocks = len(got.model.blocks)
    assert trainer.strategy.memory_report().host_optimizer_ms > 0
    assert trainer.strategy._last_eager_updates == 4 * blocks  # every block, every step, during backward


class StateDicts(L.Callback):
    """Copies ``module.state_dict()`` after every step, as a callback saving its own weights file would."""

    def __init__(self) -> None:
        self.taken: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.taken.append({k: v.clone() for k, v in module.state_dict().items()})


def slow_host_updates(monkeypatch) -> None:
    from lightning_vdnn.streaming.host_optimizer import HostStepper

    update = HostStepper._update
    monkeypatch.setattr(HostStepper, "_update", lambda *args: (time.sleep(0.02), update(*args)))


def taken_with_updates_in_flight(monkeypatch, make, **trainer_kwargs) -> list[tuple]:
    """``(ours, plain's)`` per step of what a callback ``make()`` took after each of 3 steps, plain and under
    ``l2l``, the host updates slowed so that they are still queued when it reads."""
    slow_host_updates(monkeypatch)
    ref, got = make(), make()
    fit(lm(), loader(16), max_steps=3, callbacks=[ref], **trainer_kwargs)
    fit(lm(), loader(16), "l2l", max_steps=3, callbacks=[got], **trainer_kwargs)
    assert len(got.taken) == 3
    return list(zip(got.taken, ref.taken))


@pytest.mark.parametrize("clip", [None, 1.0])
def test_state_dict_after_the_step_waits_for_queued_host_updates(monkeypatch, clip):
    """``optimizer.step()`` returns with block updates still queued on the worker (slowed here, so that they
    are): ``state_dict()`` taken right after must wait for them, not read half-updated host weights."""
    for ours, theirs in taken_with_updates_in_flight(monkeypatch, StateDicts, gradient_clip_val=clip):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), key


class OptimizerStates(L.Callback):
    """Copies ``optimizer.state_dict()`` after every step, as a callback saving its own checkpoint would."""

    def __init__(self) -> None:
        self.taken: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.taken.append(copy.deepcopy(trainer.optimizers[0].state_dict()))


def test_optimizer_state_dict_after_the_step_waits_for_queued_host_updates(monkeypatch):
    """The user's optimizer holds the blocks' moments, which queued host updates write after ``step()`` returns:
    its ``state_dict()`` waits for them (torch's public pre-hook) instead of copying them half written."""
    for ours, theirs in taken_with_updates_in_flight(monkeypatch, OptimizerStates):
        assert ours["state"].keys() == theirs["state"].keys()
        for index, state in theirs["state"].items():
            assert ours["state"][index].keys() == state.keys()
            for name, value in state.items():
                assert torch.equal(ours["state"][index][name], value), (index, name)


def test_optimizer_load_state_dict_after_the_step_is_not_overwritten_by_queued_host_updates(monkeypatch):
    """A plain loop that loads an optimizer state right after ``step()`` (rolling back, as after a loss spike)
    keeps what it loaded, the updates still queued landing first, and trains on from it as plain PyTorch does."""
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

    def run(stream: bool) -> tuple[nn.Module, dict, dict]:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_name("gpt_tiny"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        streamer = lightning_vdnn.stream_layers(model, opt, device="cpu", pin_memory=False) if stream else None

        def step() -> None:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        step()
        saved = copy.deepcopy(opt.state_dict())
        step()
        opt.load_state_dict(saved)
        loaded = copy.deepcopy(opt.state_dict())
        step()
        if streamer is not None:
            streamer.close()
        return model, loaded, opt.state_dict()

    ref, ref_loaded, ref_state = run(False)
    slow_host_updates(monkeypatch)
    got, loaded, state = run(True)
    for ours, theirs in ((loaded, ref_loaded), (state, ref_state)):
        for index, entry in theirs["state"].items():
            for name, value in entry.items():
                assert torch.equal(ours["state"][index][name], value), (index, name)
    assert_same_params(got, ref, rtol=0, atol=0)


def test_strategy_synchronize_lets_callbacks_read_parameters_directly(monkeypatch):
    """An EMA-like callback reading ``p.data`` right after the step sees final weights once it calls
    ``trainer.strategy.synchronize()`` (updates slowed so that they are still queued)."""
    class Clones(L.Callback):
        def __init__(self) -> None:
            self.taken: list[list[torch.Tensor]] = []

        def on_train_batch_end(self, trainer, module, *_):
            if hasattr(trainer.strategy, "synchronize"):
                trainer.strategy.synchronize()
            self.taken.append([p.detach().clone() for p in module.parameters()])

    for ours, theirs in taken_with_updates_in_flight(monkeypatch, Clones):
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


def test_clipping_queues_block_updates_at_the_step():
    _, trainer = fit(lm(), loader(24), "l2l", max_steps=3, gradient_clip_val=1.0)
    assert trainer.strategy._last_eager_updates == 0


def test_fused_host_update_rounds_like_a_multi_tensor_kernel():
    """GPU runs update the host blocks with torch's fused CPU kernel: close to the per-tensor loop, not equal."""
    from lightning_vdnn.streaming.host_optimizer import HostStepper

    torch.manual_seed(0)
    ref = GPT(GPTConfig.from_name("gpt_tiny"))
    got = GPT(GPTConfig.from_name("gpt_tiny"))
    got.load_state_dict(ref.state_dict())
    streamer = LayerStreamer(got, "blocks", torch.device("cpu"))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for m in (ref, got)]
    stepper = HostStepper(opts[1], streamer.blocks, fused=True)
    streamer.steppers.append(stepper)  # loads wait for its queued updates; close() closes it
    # "auto" times the fused same-class optimizer against the native one pass, which computes the same bits
    assert (stepper.update_pass is not None and stepper.update_pass.backend == "native") or all(
        type(s.optimizer) is torch.optim.AdamW and s.optimizer.defaults["fused"] for s in stepper._subs)
    x = torch.randint(0, 256, (2, 16))
    for _ in range(5):
        for model, opt in zip((ref, got), opts):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    streamer.close()
    assert_same_params(got, ref, rtol=1e-3, atol=1e-5)
    assert "exp_avg" in opts[1].state[got.blocks[0].mlp.fc.weight]  # the user's optimizer holds the state


class ZeroInPlace(LM):
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)  # rewrites the host gradient buffers the queued updates read


def test_zero_grad_in_place_waits_for_queued_host_updates():
    ref, _ = fit(ZeroInPlace, loader(24), max_steps=3)
    got, _ = fit(ZeroInPlace, loader(24), "l2l", max_steps=3)
    assert_same_run(got, ref)


def test_host_update_worker_runs_the_lowest_block_first():
    """Once backward is over, queued block updates run first block first: the next forward's order."""
    import threading

    from lightning_vdnn.streaming.host_optimizer import _LowestFirst

    worker, gate, ran = _LowestFirst("test"), threading.Event(), []
    worker.submit(-1, gate.wait)  # holds the worker while the queue fills, as a long update would
    futures = [worker.submit(i, ran.append, i) for i in (5, 3, 9, 0, 4)]
    gate.set()
    for f in futures:
        f.result()
    failing = worker.submit(1, lambda: 1 / 0)
    worker.shutdown()
    assert ran == [0, 3, 4, 5, 9]
    with pytest.raises(ZeroDivisionError):  # an update's error reaches whoever waits for that block
        failing.result()


@pytest.mark.parametrize("clip", [None, 1.0])
def test_resident_blocks_stay_on_device_and_training_equals_plain(clip):
    """The first blocks are ordinary device modules stepped by the ordinary optimizer; only the rest stream
    and are updated on the host (eagerly, or at the step under clipping). Same run as plain either way."""
    steps = dict(gradient_clip_val=clip, accumulate_grad_batches=2)
    ref, _ = fit(lm(), loader(), max_steps=4, **steps)

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            streamer = trainer.strategy._streamer
            self.streamed = [b.module for b in streamer.blocks]
            self.bytes = trainer.strategy.memory_report().streamed_h2d_bytes

    watch = Watch()
    got, trainer = fit(lm(), loader(), l2l(resident_blocks=1), max_steps=4, callbacks=[watch], **steps)
    assert_same_run(got, ref)
    blocks = list(got.model.blocks)
    assert watch.streamed == blocks[1:]
    assert trainer.strategy._last_eager_updates == (0 if clip else 4 * (len(blocks) - 1))
    one = sum(p.numel() * p.element_size() for p in blocks[1].parameters())  # blocks are alike
    loads, rest = divmod(watch.bytes, one)
    assert rest == 0 and 0 < loads <= 2 * 2 * (len(blocks) - 1)  # whole streamed blocks, at most fwd + bwd each


class Slots(L.Callback):
    """Each step's streamed bytes, and which streamed blocks sit in the slots, current, when the last resident
    block starts its forward (the host updates of the step before waited for as the batch starts, so that what
    the preload finds ready does not depend on the worker's timing)."""

    def __init__(self) -> None:
        self.loaded: list[int] = []
        self.ready: list[set[int]] = []
        self.streamer = None

    def on_train_batch_start(self, trainer, module, *_):
        if self.streamer is None:
            self.streamer = trainer.strategy._streamer
            self.slots = len(self.streamer.slots)
            module.model.blocks[self.streamer.resident - 1].register_forward_pre_hook(self._look)
        self.streamer.synchronize()

    def _look(self, *_):
        streamer = self.streamer
        self.ready.append({s.block for s in streamer.slots if s.block >= 0 and streamer._resident(s.block) is s})

    def on_train_batch_end(self, trainer, *_):
        self.loaded.append(trainer.strategy.memory_report().streamed_h2d_bytes)


def test_blocks_behind_resident_ones_load_while_those_compute_and_once_per_step():
    """Behind 3 resident blocks, the 3 streamed ones get 3 slots: forward loads them all before the resident
    blocks finish, and backward finds them still there. Same run as plain. (With more blocks streamed than
    resident, the host bounds the step: two slots.)"""
    assert [LayerStreamer.slot_count(s, r) for s, r in [(4, 0), (1, 3), (3, 3), (7, 17), (8, 16), (23, 1)]] == [
        2, 2, 3, 5, 6, 2]
    make = lambda: LM(n_layer=6)  # noqa: E731
    ref, _ = fit(make, loader(), max_steps=4)
    watch = Slots()
    got, _ = fit(make, loader(), l2l(resident_blocks=3), max_steps=4, callbacks=[watch])
    assert_same_run(got, ref)
    assert watch.slots == 3
    one = sum(p.numel() * p.element_size() for p in got.model.blocks[3].parameters())
    assert watch.loaded == [3 * one] * 4  # each streamed block once a step: none again in backward
    assert watch.ready == [{0, 1, 2}] * 4  # loaded before the last resident block computes


def test_preload_stops_at_a_block_whose_host_update_is_still_queued():
    """Loads run ahead only as far as host updates are written, in order: the training thread never waits for
    a block it does not need yet."""

    class Queued:
        def __init__(self, pending: set[int]) -> None:
            self.pending, self.waited = pending, []

        def ready(self, index: int) -> bool:
            return index not in self.pending

        def wait(self, index: int) -> None:
            self.waited.append(index)

    root = LM(n_layer=6)
    streamer = LayerStreamer(root, "model.blocks", torch.device("cpu"), resident=3)
    try:
        stepper = Queued({1})
        streamer.steppers = [stepper]
        streamer._preload()
        assert sorted(s.block for s in streamer.slots) == [-1, -1, 0] and stepper.waited == [0]
        stepper.pending.clear()
        streamer._preload()
        assert sorted(s.block for s in streamer.slots) == [0, 1, 2]
        slot = streamer._acquire(0)
        stepper.pending.add(2)
        stepper.waited.clear()
        streamer._prefetch(0, +1, slot)  # the next block is waited for; none past one still queued
        assert stepper.waited == [1]
    finally:
        streamer.steppers = []
        streamer.close()


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(resident_blocks=-1), ValueError, r"resident_blocks=-1 must be >= 0"),
    (dict(resident_blocks=1, layer_streaming=False), ValueError, r"resident_blocks=1 .* layer_streaming=True"),
    (dict(resident_blocks="2"), ValueError, r"resident_blocks='2' is not understood"),
])
def test_bad_resident_blocks_name_the_value(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        VDNNStrategy("none", **{"layer_streaming": True, **kwargs})


def test_resident_blocks_must_leave_one_to_stream():
    n = GPTConfig.from_name("gpt_tiny").n_layer
    with pytest.raises(ValueError, match=rf"resident_blocks={n}, but 'model.blocks' holds {n} blocks.*at most {n - 1}"):
        fit(lm(), loader(8), l2l(resident_blocks=n), max_steps=1)


# -- pinned host buffers: carved from power-of-two chunks, not each rounded up to one ------------------------------
def test_pinned_arena_carves_aligned_disjoint_buffers_from_few_chunks(monkeypatch):
    from lightning_vdnn.streaming import pinned_arena

    made = []  # a CPU machine cannot page-lock: count what would be
    monkeypatch.setattr(pinned_arena, "lock", lambda chunk: made.append(chunk.nbytes))

    class Arena(pinned_arena.PinnedArena):
        CHUNK = 2**16

    arena = Arena(pin=True)
    sizes = [3000, 5000, 1, 7000, 40000, 100000]  # fp32 elements; the last is larger than a chunk
    bufs = [arena.empty(n, torch.float32) for n in sizes]
    assert [b.numel() for b in bufs] == sizes and all(b.dtype == torch.float32 for b in bufs)
    assert all(b.data_ptr() % Arena.ALIGN == 0 for b in bufs)
    spans = sorted((b.data_ptr(), b.data_ptr() + 4 * b.numel()) for b in bufs)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # disjoint
    assert made == [2**16, 2**18, 2**19]  # one chunk for the small four, a power of two for each larger one
    assert sum(made) < 2 * 4 * sum(sizes)  # not each buffer rounded up to its own power of two
    for b in bufs:
        b.fill_(1.0)
    assert all(bool((b == 1).all()) for b in bufs)
    assert Arena(pin=False).empty(10, torch.float32).numel() == 10 and len(made) == 3  # pageable: no chunks


@pytest.mark.parametrize("name, dropout, microbatches, policy, saved", [
    ("gpt_tiny", 0.1, 1, "all", None), ("llama_tiny", 0.1, 4, "all", None), ("gpt_tiny", 0.0, 3, "all", 3),
    ("gpt_tiny", 0.1, 1, "none", 2), ("llama_tiny", 0.0, 1, "conv", 1),
])
def test_saving_blocks_skip_the_recompute_and_train_like_plain(monkeypatch, name, dropout, microbatches, policy,
                                                               saved):
    """Blocks that save their activations (offloaded by 'all'/'conv', kept by 'none') run forward once: the same
    dropout draws as plain, and no recompute. Their saved weight views are read back from whichever slot holds
    the block in backward; 'none' keeps those views as tensors, so a stale slot would change the gradients."""
    recomputed = []
    recompute = LayerStreamer._recompute
    monkeypatch.setattr(LayerStreamer, "_recompute", lambda self, i, *a: recomputed.append(i) or recompute(self, i, *a))
    ref, _ = fit(lm(name, dropout, chunks=microbatches), loader(), max_steps=5, **STEPS)
    strategy = l2l(activation_offload=policy, min_offload_bytes=0, saved_blocks=saved, microbatches=microbatches)
    got, _ = fit(lm(name, dropout), loader(), strategy, max_steps=5, **STEPS)
    assert_same_run(got, ref)
    saving = {None: {0, 1, 2, 3}, 3: {0, 2, 3}, 2: {1, 3}, 1: {2}}[saved]  # spread evenly
    assert set(recomputed) == {0, 1, 2, 3} - saving
    assert len(recomputed) == 10 * microbatches * (4 - len(saving))  # 10 backward passes, one per chunk


def test_all_moves_the_streamed_blocks_internals_to_the_host():
    """Under 'all' a streamed block's activations go to the host as a resident block's would; saved_blocks=0
    sends only the blocks' inputs and recomputes the rest, as 'auto' does."""
    offloaded = {}
    for saved in (0, None):
        _, trainer = fit(lm(), loader(24), l2l(activation_offload="all", min_offload_bytes=0, saved_blocks=saved),
                         max_steps=2)
        offloaded[saved] = trainer.strategy.memory_report().offloaded_bytes
    mlp_hidden = 4 * 4 * 32 * 512 * 4  # 4 blocks' MLP hidden activations (4 x 32 x 512 floats), among the rest
    assert offloaded[None] > offloaded[0] + 2 * mlp_hidden


@pytest.mark.parametrize("saved", [0, None])
def test_saving_blocks_without_hooks_keep_their_saves_and_refuse_a_second_backward(saved):
    """Plain PyTorch use (no offloader around forward): the saves stay where they are. A second backward
    through a saving block's graph is refused with the fix; recomputing blocks allow it, as autograd would not
    without retain_graph either (here it is given)."""
    torch.manual_seed(0)
    ref, got = GPT(GPTConfig.from_name("gpt_tiny")), GPT(GPTConfig.from_name("gpt_tiny"))
    got.load_state_dict(ref.state_dict())
    streamer = LayerStreamer(got, None, torch.device("cpu"), saved_blocks=saved)
    x = torch.randint(0, 256, (2, 16))
    for model in (ref, got):
        model(x).square().mean().backward()
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    loss = got(x).square().mean()
    loss.backward(retain_graph=True)
    if saved is None:
        with pytest.raises(RuntimeError, match=r"saved_blocks=0 every streamed block recomputes"):
            loss.backward()
    else:
        loss.backward()
    streamer.close()


def test_a_saving_blocks_graph_holds_neither_its_input_nor_its_output(monkeypatch):
    """What a saving block's graph keeps is what autograd saved (here cloned by the hooks, as an offloader
    copies it): not the block's output, which is the next block's input, so an offloaded one can be freed."""
    import gc
    import weakref

    outs = []
    put = Joined.put
    monkeypatch.setattr(Joined, "put", lambda self, k, out, given: outs.append(weakref.ref(out)) or put(self, k, out, given))
    torch.manual_seed(0)
    ref, got = GPT(GPTConfig.from_name("gpt_tiny")), GPT(GPTConfig.from_name("gpt_tiny"))
    got.load_state_dict(ref.state_dict())
    streamer = LayerStreamer(got, None, torch.device("cpu"), saved_blocks=None)
    x = torch.randint(0, 256, (2, 16))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        loss = got(x).square().mean()
    gc.collect()
    assert len(outs) == 4 and all(out() is None for out in outs)
    loss.backward()
    ref(x).square().mean().backward()
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    streamer.close()
