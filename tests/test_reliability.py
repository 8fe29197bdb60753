"""Every mistake gets a clear error before training, and nothing trained is lost to a skipped step.

Host memory too small for layer streaming, a failed pinned allocation, an fp16 step the loss scaler skips, an
unsupported precision, a block that takes two tensors, and typos in Hydra overrides of the strategy group.
"""

from __future__ import annotations

import threading
import types
from typing import Optional

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

from conftest import TokenLM, fit, token_loader
from test_streaming import LM
from lightning_vdnn import REGISTERED, VDNNConfig, VDNNStrategy
from lightning_vdnn.streaming import host_memory as hostmem
from lightning_vdnn.streaming.host_state import host_empty
from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.offload.host_pool import HostBufferPool


pytestmark = pytest.mark.usefixtures("one_thread")


def loader(n: int = 16):
    return token_loader(n=n, batch=4, seq=32)


# -- host memory ------------------------------------------------------------------------------------------
def _block_bytes() -> tuple[int, int]:
    blocks = GPT(GPTConfig.from_name("gpt_tiny")).blocks
    sizes = [4 * sum(p.numel() for p in b.parameters()) for b in blocks]
    return sum(sizes), max(sizes)


def test_required_host_bytes_counts_weights_grads_adam_state_and_staging():
    weights, largest = _block_bytes()
    need = hostmem.required_host_bytes(GPT(GPTConfig.from_name("gpt_tiny")).blocks)
    assert (need.weights, need.grads, need.optimizer, need.staging) == (weights, weights, 2 * weights, 2 * largest)
    assert need.total == 4 * weights + 2 * largest
    assert need.resident == weights and need.new == need.total - weights  # built on the CPU: weights already held
    assert hostmem.required_host_bytes(GPT(GPTConfig.from_name("gpt_tiny")).blocks, optimizer_states=1).optimizer == weights
    assert hostmem.check_host_memory(GPT(GPTConfig.from_name("gpt_tiny")).blocks, "gpt_tiny") == need  # fits here


def _fake_host(monkeypatch, available: int, cgroup_root) -> None:
    monkeypatch.setattr(hostmem.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available))
    monkeypatch.setattr(hostmem, "CGROUP_ROOT", cgroup_root)


def test_streaming_more_than_the_host_holds_fails_at_setup_with_the_numbers(monkeypatch, tmp_path):
    _fake_host(monkeypatch, 3 * 2**20, tmp_path)  # 3 MiB available, no cgroup files
    weights, largest = _block_bytes()
    module = TokenLM()
    with pytest.raises(MemoryError) as err:
        fit(lambda: module, loader(), "l2l", max_steps=2)
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    total = 4 * weights + 2 * largest
    assert str(err.value) == (
        f"layer streaming of the 4 blocks at 'model.blocks' needs {mib(total)} of host memory (weights {mib(weights)} "
        f"+ gradients {mib(weights)} + optimizer state {mib(2 * weights)}, estimated at 2x the weights, + staging "
        f"{mib(2 * largest)}), {mib(total - weights)} more than the weights already hold, but the host has 3.0 MiB "
        "available. Use a smaller model or fewer blocks, free host memory, or run on a host with more RAM.")
    assert module.losses == []  # refused before the first step
    assert all("forward" not in b.__dict__ for b in module.model.blocks)  # nothing was streamed


def test_every_local_rank_is_counted_against_the_host(monkeypatch, tmp_path):
    """Each rank of a node keeps its own weights and pins its buffers: what fits one may not fit eight."""
    blocks = GPT(GPTConfig.from_name("gpt_tiny")).blocks
    need = hostmem.required_host_bytes(blocks, shards=8)
    _fake_host(monkeypatch, 4 * need.new, tmp_path)
    assert hostmem.check_host_memory(blocks, "gpt_tiny", shards=8, processes=4) == need
    with pytest.raises(MemoryError, match=r"needs, for each of the 8 processes on this host, "):
        hostmem.check_host_memory(blocks, "gpt_tiny", shards=8, processes=8)


def test_cgroup_limit_counts_when_below_the_host(monkeypatch, tmp_path):
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text(str(3 * 2**30))
    (tmp_path / "memory.stat").write_text(f"anon 123\ninactive_file {2**30}\nactive_file 5\n")
    assert hostmem.cgroup_available_bytes(tmp_path) == 2 * 2**30  # limit - (usage - droppable cache)
    _fake_host(monkeypatch, 16 * 2**30, tmp_path)
    assert hostmem.available_host_bytes() == (2 * 2**30, "the container's cgroup memory limit")
    _fake_host(monkeypatch, 2**30, tmp_path)
    assert hostmem.available_host_bytes() == (2**30, "the host")
    (tmp_path / "memory.max").write_text("max\n")
    assert hostmem.cgroup_available_bytes(tmp_path) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # cgroup v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("100\n")
    (v1 / "memory.stat").write_text("total_inactive_file 0\n")
    assert hostmem.cgroup_available_bytes(tmp_path / "v1") is None
    (v1 / "memory.limit_in_bytes").write_text(str(2**30))
    assert hostmem.cgroup_available_bytes(tmp_path / "v1") == 2**30 - 100


# -- pinned allocation failure ------------------------------------------------------------------------------
def _unpinnable(monkeypatch) -> list[tuple]:
    real, pinned = torch.empty, []

    def empty(*args, pin_memory: bool = False, **kwargs):
        if pin_memory:
            pinned.append(args)
            raise RuntimeError("CUDA error: out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    return pinned


def test_streaming_buffer_falls_back_to_pageable_memory_with_a_warning(monkeypatch):
    pinned = _unpinnable(monkeypatch)
    with pytest.warns(UserWarning, match=r"pinning host memory for layer streaming failed \(CUDA error: out of "
                                         r"memory \(injected\)\); using pageable memory") as record:
        buf = host_empty(10, torch.float32, pin=True)
    assert len(record) == 1 and pinned == [(10,)]
    assert buf.shape == (10,) and buf.dtype == torch.float32 and not buf.is_pinned()


def test_activation_pool_falls_back_once_and_stops_trying(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pinned = _unpinnable(monkeypatch)
    pool = HostBufferPool(pin_memory=True)
    with pytest.warns(UserWarning, match=r"pinning 0 MiB of host memory failed \(CUDA error: out of memory "
                                         r"\(injected\)\); falling back to pageable memory") as record:
        a, _ = pool.acquire(5000)
        b, _ = pool.acquire(70000)
    assert len(record) == 1 and len(pinned) == 1 and not pool.pin_memory  # the second buffer did not retry
    assert (a.numel(), b.numel()) == (5120, 81920) and pool.allocations == 2 and pool.reserved_bytes == 5120 + 81920


# -- fp16 loss scaling: a skipped step changes nothing -------------------------------------------------------
INF_STEP = 1


class InfOnce(TokenLM):
    """Its loss is multiplied by inf at one step: every gradient is non-finite and the scaler skips the step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)  # records the finite loss
        return loss * float("inf") if batch_idx == INF_STEP else loss


class Snapshots(L.Callback):
    """Parameters, optimizer state and loss scale just before each step; for L2L the parameters are the host
    master weights, and every block's update of the step before has been written (forward waited for it)."""

    def __init__(self) -> None:
        self.taken: list[tuple[list[torch.Tensor], dict, float]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        params = [p.detach().clone() for p in module.parameters()]
        state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                 for i, s in optimizer.state_dict()["state"].items()}
        self.taken.append((params, state, trainer.precision_plugin.scaler.get_scale()))


def _fp16_run(strategy) -> tuple[TokenLM, Snapshots]:
    snaps = Snapshots()
    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))  # Lightning maps CPU 16-mixed to bf16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bf16 CPU kernels round by their thread split: the same split for plain and ours
    try:
        module, _ = fit(InfOnce, loader(), strategy, max_steps=4, plugins=[amp], callbacks=[snaps],
                        gradient_clip_val=1.0)
    finally:
        torch.set_num_threads(threads)
    return module, snaps


def _same(a: tuple, b: tuple) -> bool:
    same_params = all(torch.equal(p, q) for p, q in zip(a[0], b[0]))
    same_state = a[1].keys() == b[1].keys() and all(
        s.keys() == b[1][i].keys() and all(torch.equal(torch.as_tensor(v), torch.as_tensor(b[1][i][k])) for k, v in s.items())
        for i, s in a[1].items())
    return same_params and same_state


@pytest.fixture(scope="module")
def plain_fp16():
    return _fp16_run("auto")


@pytest.mark.parametrize("strategy", [lambda: VDNNStrategy("all", min_offload_bytes=0),
                                      lambda: VDNNStrategy("none", layer_streaming=True)], ids=["vdnn_all", "l2l"])
def test_skipped_fp16_step_leaves_weights_and_optimizer_state_untouched(strategy, plain_fp16):
    module, snaps = _fp16_run(strategy())
    scales = [s[2] for s in snaps.taken]
    assert scales == [2.0**16, 2.0**16, 2.0**15, 2.0**15]  # halved once, by the inf step only
    before_inf, after_inf, later = snaps.taken[INF_STEP], snaps.taken[INF_STEP + 1], snaps.taken[INF_STEP + 2]
    assert _same(before_inf, after_inf)  # the skipped step wrote nothing: weights, moments, step counts
    assert not _same(snaps.taken[0], before_inf) and not _same(after_inf, later)  # the steps around it did
    assert all(torch.isfinite(p).all() for p in later[0])
    ref, ref_snaps = plain_fp16
    torch.testing.assert_close(torch.tensor(module.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    for p, q in zip(module.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# -- unsupported precision, block signature ------------------------------------------------------------------
def test_layer_streaming_refuses_64_true_before_training():
    module = TokenLM()
    with pytest.raises(ValueError) as err:
        fit(lambda: module, loader(), "l2l", max_steps=1, precision="64-true")
    assert str(err.value) == (
        "layer streaming does not support precision='64-true'; it supports ['32-true', '16-mixed', 'bf16-mixed', "
        "'bf16-true', '16-true']. Set Trainer(precision=...) to one of them, or drop layer_streaming.")
    assert module.losses == []


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * gate


class TwoInputBlocks(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Gated() for _ in range(3))
        self.steps = 0

    def training_step(self, batch, batch_idx):
        x = batch[0]
        for block in self.blocks:
            x = block(x, torch.sigmoid(x))
        self.steps += 1
        return x.square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_block_called_with_two_tensors_streams_like_plain():
    """A block with a second tensor argument (a gate computed from the hidden states) streams: both arguments
    get plain autograd's gradients."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 8)), batch_size=4)
    ref, _ = fit(TwoInputBlocks, data, max_steps=2)
    got, _ = fit(TwoInputBlocks, data, "l2l", max_steps=2)
    assert got.steps == 2
    assert all("forward" not in b.__dict__ for b in got.blocks)  # torn down: an ordinary module again
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


# -- an exception in the user's code leaves the strategy clean ------------------------------------------------
BOOM = {"training_step": "boom in training_step", "callback": "boom in a callback"}


class FailingLM(LM):
    fail_at: Optional[int] = None  # the batch whose training_step raises

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError(BOOM["training_step"])
        return super().training_step(batch, batch_idx)


class FailAfterStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:  # the step's optimizer update is done (for l2l: queued on the host)
            raise RuntimeError(BOOM["callback"])


def _trainer(strategy, max_steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=max_steps, callbacks=list(callbacks),
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0)


def _fail_validate_fit_again(strategy, where: str) -> tuple[FailingLM, dict, float, L.Trainer, list[str]]:
    """A fit that raises after 2 steps, then on the same Trainer (and strategy object) ``validate`` and a new fit
    for the 2 steps left. Returns the module, its state after the failure, the validation loss, the Trainer and
    what the failure left behind (`_leftovers`)."""
    L.seed_everything(0, verbose=False)
    module = FailingLM()
    module.fail_at = 2 if where == "training_step" else None
    trainer = _trainer(strategy, 4, [FailAfterStep(2)] if where == "callback" else [])
    with pytest.raises(RuntimeError, match=f"^{BOOM[where]}$"):
        trainer.fit(module, loader())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    leftovers = _leftovers(module)
    val = trainer.validate(module, loader(8), verbose=False)[0]["val/loss"]
    module.fail_at = None
    trainer.fit(module, loader())  # from global step 2 to max_steps=4, with a new optimizer and schedule
    return module, state, val, trainer, leftovers


def _leftovers(module: nn.Module) -> list[str]:
    """What a strategy could leave behind: module hooks, patched forwards, autograd's saved-tensor hooks, threads."""
    found = [f"{name or 'root'}.{kind}" for name, m in module.named_modules()
             for kind in ("_forward_pre_hooks", "_forward_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks")
             if getattr(m, kind)]
    found += [f"{name}.forward" for name, m in module.named_modules() if "forward" in m.__dict__]
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        found.append("saved_tensors_hooks")
    return found + [t.name for t in threading.enumerate() if t.name.startswith("l2l-")]


@pytest.fixture(scope="module")
def plain_failures() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as ``one_thread`` does for the tests (created before it): the same kernels' rounding
    try:
        return {where: _fail_validate_fit_again("auto", where) for where in ("training_step", "callback")}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("where", ["training_step", "callback"])
@pytest.mark.parametrize("make", [lambda: VDNNStrategy("all", min_offload_bytes=0),
                                  lambda: VDNNStrategy("none", layer_streaming=True)], ids=["vdnn_all", "l2l"])
def test_exception_in_user_code_leaves_the_strategy_clean(make, where, plain_failures):
    """An exception in ``training_step`` (the third batch's) or in ``on_train_batch_end`` (after the second
    step, with l2l's host updates of that step possibly still queued) reaches the caller unchanged; hooks,
    patched forwards, saved-tensor hooks and worker threads are gone; the weights are plain training's after
    the same exception, bit for bit; ``validate`` and a new fit on the same Trainer equal plain Lightning's
    from that state."""
    strategy = make()
    module, state, val, trainer, leftovers = _fail_validate_fit_again(strategy, where)
    ref, ref_state, ref_val, _, _ = plain_failures[where]
    assert leftovers == []
    assert strategy._offloader is None and strategy._streamer is None
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], v) for k, v in ref_state.items())
    assert val == ref_val
    assert len(module.losses) == len(ref.losses) == 4 and module.losses == ref.losses
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert strategy.memory_report().step > 0  # the second fit ran under the strategy: it reported


# -- Hydra: the strategy group is typed -----------------------------------------------------------------------
def compose_run(*overrides: str):
    with initialize_config_module(config_module="lightning_vdnn.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("override, cause", [
    ("strategy.activation_offlod=all", "Key 'activation_offlod' not in 'VDNNStrategyConf'"),
    ("strategy.prefetch_layers=two", "Value 'two' of type 'str' could not be converted to Integer"),
    ("strategy.pin_memory=maybe", "Value 'maybe' is not a valid bool"),
])
def test_typo_or_wrong_type_in_a_strategy_override_fails_at_compose(override, cause):
    with pytest.raises(ConfigCompositionException) as err:
        compose_run(override)
    assert override.split("=")[0] in str(err.value)
    assert cause in str(err.value.__cause__) and f"full_key: {override.split('=')[0]}" in str(err.value.__cause__)


@pytest.mark.parametrize("overrides, message", [
    (["strategy.activation_offload=bogus"], r"activation_offload='bogus' is not a policy; choose one of \['none', "
                                            r"'all', 'conv', 'auto'\]"),
    (["strategy.memory_budget=lots"], r"memory_budget='lots' is not understood"),
    (["strategy.memory_budget=-1GiB"], r"memory_budget='-1GiB' is not understood"),
    (["strategy.microbatches=0"], r"microbatches=0 must be a positive integer"),
    (["strategy.microbatches=2"], r"microbatches=2 .* needs layer streaming: use strategy='l2l'"),
    (["strategy=l2l", "strategy.saved_blocks=-2"], r"saved_blocks=-2 must be >= 0"),
    (["+strategy.activation_offlod=all"], r"unexpected keyword argument 'activation_offlod'"),
])
def test_bad_strategy_value_fails_when_the_strategy_is_built(overrides, message):
    cfg = compose_run(*overrides)
    with pytest.raises(InstantiationException, match=message):
        instantiate(cfg.strategy)


@pytest.mark.parametrize("name", ["vdnn", "vdnn_all", "vdnn_conv", "vdnn_none", "l2l"])
def test_every_strategy_file_builds_what_its_registered_name_builds(name):
    assert name in REGISTERED
    cfg = compose_run(f"strategy={name}")
    assert instantiate(cfg.strategy).config == StrategyRegistry.get(name).config


def test_any_strategy_argument_can_be_overridden_in_any_strategy_file():
    strategy = instantiate(compose_run("strategy=l2l", "strategy.min_offload_bytes=0", "strategy.layers=model.blocks",
                                       "strategy.memory_budget=null", "strategy.microbatches=4",
                                       "strategy.saved_blocks=2").strategy)
    assert (strategy.config.layer_streaming, strategy.config.min_offload_bytes, strategy.config.layers,
            strategy.config.microbatches, strategy.config.saved_blocks) == (True, 0, "model.blocks", 4, 2)


def test_resident_blocks_takes_a_number_auto_or_a_budget_from_hydra():
    """``resident_blocks`` is an int, ``"auto"`` or null: the schema keeps it untyped, the config checks it."""
    def built(*overrides: str) -> VDNNConfig:
        return instantiate(compose_run("strategy=l2l", *overrides).strategy).config

    assert built("strategy.resident_blocks=2").resident_blocks == 2
    assert built("strategy.resident_blocks=auto").auto_resident
    assert built("strategy.memory_budget=20GiB").auto_resident  # null, with a budget: "auto"
    assert not built().auto_resident and built().fixed_resident == 0
    with pytest.raises(InstantiationException, match=r"resident_blocks='lots' is not understood"):
        built("strategy.resident_blocks=lots")


def test_saved_blocks_takes_a_number_or_auto_from_hydra():
    def built(*overrides: str) -> VDNNConfig:
        return instantiate(compose_run("strategy=l2l", *overrides).strategy).config

    assert built("strategy.saved_blocks=auto").saved_blocks == "auto"
    assert built("strategy.saved_blocks=3").saved_blocks == 3
    assert built().saved_blocks is None and built().streamed_saves == 0


def test_layers_takes_one_path_or_a_list_of_them_from_hydra():
    """Several stacks (an encoder's and a decoder's blocks) stream as one sequence: ``layers`` is a path or a list."""
    def built(*overrides: str) -> VDNNConfig:
        return instantiate(compose_run("strategy=l2l", *overrides).strategy).config

    assert built("strategy.layers=model.blocks").layers == "model.blocks"
    both = built("strategy.layers=[model.encoder.block,model.decoder.block]")
    assert both.layers == ("model.encoder.block", "model.decoder.block") == both.layer_paths
    with pytest.raises(InstantiationException, match=r"layers='bad-path' is not a dotted attribute path"):
        built("strategy.layers=[model.blocks,bad-path]")
    with pytest.raises(InstantiationException, match=r"layers=\[\] must be a dotted path string"):
        built("strategy.layers=[]")
