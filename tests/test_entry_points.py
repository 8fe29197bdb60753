"""Every way in — plain PyTorch, Fabric, Accelerate, LightningCLI, Hydra — against its plain counterpart."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import Classifier, ResidualCNN, assert_same_params, image_loader, token_loader
import lightning_vdnn
from lightning_vdnn import VDNNFabricStrategy, VDNNStrategy, offload_activations
from lightning_vdnn.examples.models import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn() -> nn.Module:
    return ResidualCNN(width=8)


def gpt_tiny() -> nn.Module:
    return GPT(GPTConfig.from_name("gpt_tiny"))


CASES = {"cnn": (small_cnn, image_loader), "gpt": (gpt_tiny, token_loader)}


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return F.cross_entropy(out.flatten(0, 1), y.flatten()) if out.dim() == 3 else F.cross_entropy(out, y)


def train(make, loader, step_fn, steps: int = STEPS) -> nn.Module:
    """AdamW steps of a fresh model built under seed 0; ``step_fn(model, x, y, opt)`` does forward+backward."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _, (x, y) in zip(range(steps), loader()):
        step_fn(model, x, y, opt)
        opt.step()
        opt.zero_grad()
    return model


def plain_step(model, x, y, opt) -> None:
    loss_of(model, x, y).backward()


# -- plain PyTorch --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_plain_loop_matches_and_offloads(case):
    make, loader = CASES[case]
    handles = []

    def offloaded_step(model, x, y, opt):
        with offload_activations(model, policy="all", min_offload_bytes=0) as off:
            loss = loss_of(model, x, y)
        loss.backward()
        handles.append(off)

    ref = train(make, loader, plain_step)
    got = train(make, loader, offloaded_step)
    assert_same_params(got, ref)
    assert all(h is handles[0] for h in handles)  # one handle per model: its host buffers are reused
    off = handles[0]
    off.step_done()
    report = off.report()
    assert report.step == STEPS and report.offloaded_bytes > 0 and report.prefetched_bytes > 0
    off.close()
    assert all(not m._forward_pre_hooks for m in got.modules())


def test_plain_handle_lifecycle():
    model = small_cnn()
    x, y = next(iter(image_loader()))
    off = offload_activations(model, "all", min_offload_bytes=0)
    assert offload_activations(model, "all", min_offload_bytes=0) is off
    with torch.no_grad(), off:  # no backward: nothing captured
        model(x)
    with off:
        with pytest.raises(RuntimeError, match="already active"), off:
            pass
        loss = loss_of(model, x, y)
    loss.backward()
    off.step_done()
    assert off.report().step == 1 and off.report().offloaded_bytes > 0
    other = offload_activations(model, "conv", min_offload_bytes=0)  # new arguments replace the old handle
    assert other is not off and off.offloader is None and other.config.activation_offload == "conv"
    other.close()
    with pytest.raises(RuntimeError, match="closed"), other:
        pass


@pytest.mark.parametrize("budget", [None, 2_000_000])
def test_plain_auto_plans_to_the_budget(budget):
    """Profile (offload all), then keep what fits: everything without a budget on a CPU, part within 2 MB."""
    def step(model, x, y, opt):
        with offload_activations(model, "auto", min_offload_bytes=0, memory_budget=budget) as off:
            loss = loss_of(model, x, y)
        loss.backward()
        off.step_done()
        reports.append(off.report())

    reports = []
    assert_same_params(train(gpt_tiny, token_loader, step), train(gpt_tiny, token_loader, plain_step))
    first, last = reports[0], reports[-1]
    assert first.offloaded_bytes > 0 and first.kept_bytes == 0 and last.policy == "auto"
    if budget is None:
        assert last.offloaded_bytes == 0 and last.layers_offloaded == 0
    else:
        assert 0 < last.kept_bytes <= budget and last.offloaded_bytes > 0 and last.layers_offloaded > 0


# -- bad arguments, every entry point ---------------------------------------------------------------------
def _accelerate_prepare(**kw):
    from accelerate import Accelerator

    import lightning_vdnn.integrations.accelerate

    return lightning_vdnn.integrations.accelerate.prepare(Accelerator(cpu=True), small_cnn(), **kw)


@pytest.mark.parametrize("entry", [
    lambda **kw: offload_activations(small_cnn(), **kw),
    lambda **kw: VDNNFabricStrategy(kw.pop("policy", "auto"), **kw),
    _accelerate_prepare,
], ids=["plain", "fabric", "accelerate"])
@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="bogus"), r"(policy|activation_offload)='bogus' is not a policy; choose one of"),
    (dict(policy="all", prefetch_layers=0), r"prefetch_layers=0 must be a positive integer"),
    (dict(policy="all", layers="no such path"), r"layers='no such path' is not a dotted attribute path"),
])
def test_bad_arguments_raise_naming_the_value(entry, kwargs, message):
    with pytest.raises(ValueError, match=message):
        entry(**kwargs)


@pytest.mark.parametrize("clip, eager", [(1.0, False), (None, True)])
def test_plain_loop_streams_layers_and_matches(clip, eager):
    """``stream_layers`` in a hand-written loop (clipping between backward and step, or ``step(closure)`` with
    eager host updates) trains exactly like the same loop without it; ``close()`` gives an ordinary module
    back."""
    def run(stream: bool):
        torch.manual_seed(0)
        model = gpt_tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        streamer = lightning_vdnn.stream_layers(model, opt, device="cpu", eager_updates=eager) if stream else None
        if stream:
            assert all(p.grad is None for p in model.blocks[0].parameters())
        losses = []
        for _, (x, y) in zip(range(STEPS), token_loader()):
            def closure():
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            if clip:  # the classic loop
                loss = closure()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
            else:  # backward inside step(closure): its gradients are the step's, so blocks update as they land
                loss = opt.step(closure)
            opt.zero_grad()
            losses.append(loss.item())
        if stream:
            assert streamer.stats()["streamed_h2d_bytes"] > 0
            assert sum(s.eager_updates for s in streamer.steppers) == (STEPS * len(model.blocks) if eager else 0)
            streamer.close()
            assert "forward" not in model.blocks[0].__dict__
        return model, losses

    (ref, ref_losses), (got, losses) = run(False), run(True)
    assert losses == ref_losses
    assert_same_params(got, ref)


def test_stream_layers_refuses_a_wrong_path_and_an_unsupported_optimizer():
    model = gpt_tiny()
    with pytest.raises(ValueError, match=r"layers='model.blocks' does not exist in GPT. Candidates: 'blocks'"):
        lightning_vdnn.stream_layers(model, layers="model.blocks", device="cpu")
    with pytest.raises(TypeError, match=r"cannot step LBFGS .* Supported: SGD"):
        lightning_vdnn.stream_layers(model, torch.optim.LBFGS(model.parameters()), device="cpu")
    assert "forward" not in model.blocks[0].__dict__  # the refused streamer left the model as it was


# -- Lightning Fabric -----------------------------------------------------------------------------------------
def fabric_train(strategy, make=small_cnn, loader=image_loader):
    from lightning.fabric import Fabric

    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model, opt = fabric.setup(*(lambda m: (m, torch.optim.AdamW(m.parameters(), lr=1e-2)))(make()))
    for _, (x, y) in zip(range(STEPS), loader()):
        fabric.backward(loss_of(model, x, y))
        opt.step()
        opt.zero_grad()
    return model, fabric


def test_fabric_matches_plain_fabric():
    ref, _ = fabric_train("auto")
    got, fabric = fabric_train("vdnn_all")
    assert isinstance(fabric.strategy, VDNNFabricStrategy) and fabric.strategy.config.activation_offload == "all"
    assert_same_params(got, ref)
    got, fabric = fabric_train(VDNNFabricStrategy("all", min_offload_bytes=0), gpt_tiny, token_loader)
    ref, _ = fabric_train("auto", gpt_tiny, token_loader)
    assert_same_params(got, ref)
    report = fabric.strategy.memory_report()
    assert report.step == STEPS and report.offloaded_bytes > 0
    with torch.no_grad():  # evaluation passes through, untouched
        got(next(iter(token_loader()))[0])
    assert fabric.strategy.memory_report().step == STEPS
    got, fabric = fabric_train(VDNNFabricStrategy("auto", min_offload_bytes=0, memory_budget=2_000_000), gpt_tiny,
                               token_loader)
    assert_same_params(got, ref)
    report = fabric.strategy.memory_report()
    assert report.policy == "auto" and report.layers_kept > 0 and report.layers_offloaded > 0


def fabric_gpt(strategy, clip: Optional[float] = 1.0, steps: int = STEPS):
    from lightning.fabric import Fabric

    fabric = Fabric(strategy=strategy, accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = gpt_tiny()
    model, opt = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    losses = []
    for _, (x, y) in zip(range(steps), token_loader()):
        loss = loss_of(model, x, y)
        fabric.backward(loss)
        if clip:
            fabric.clip_gradients(model, opt, max_norm=clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, opt, fabric, losses


def test_fabric_streamed_blocks_that_save_their_activations_match_plain_fabric():
    """``saved_blocks`` through Fabric: two of the four blocks send their activations to the host ("all")
    instead of recomputing them; the run is plain Fabric's."""
    _, _, _, ref_losses = fabric_gpt("auto")
    strategy = VDNNFabricStrategy("all", layer_streaming=True, saved_blocks=2, min_offload_bytes=0)
    got, _, fabric, losses = fabric_gpt(strategy)
    assert losses == ref_losses
    assert fabric.strategy._streamers[0].saving == {1, 3}
    assert fabric.strategy.memory_report().offloaded_bytes > 0
    fabric.strategy.teardown()


def test_fabric_streams_layers_and_matches_plain_fabric(tmp_path):
    """``Fabric(strategy="l2l")``: blocks stream from host memory, clipping in the loop still sees every
    gradient, and a checkpoint saved by ``fabric.save`` (host memory, after queued updates) equals plain's."""
    ref, ref_opt, ref_fabric, ref_losses = fabric_gpt("auto")
    got, opt, fabric, losses = fabric_gpt("l2l")
    assert isinstance(fabric.strategy, VDNNFabricStrategy) and fabric.strategy.config.layer_streaming
    assert losses == ref_losses
    fabric.strategy.synchronize()  # the last step's block updates may still run on the host worker
    assert_same_params(got, ref)
    assert got.module.blocks[0].attn.qkv.weight.device.type == "cpu"
    assert fabric.strategy.memory_report().streamed_h2d_bytes > 0
    fabric.save(tmp_path / "l2l.ckpt", {"model": got, "optimizer": opt})
    ref_fabric.save(tmp_path / "plain.ckpt", {"model": ref, "optimizer": ref_opt})
    ours, theirs = (torch.load(tmp_path / f"{n}.ckpt", weights_only=False) for n in ("l2l", "plain"))
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for i, state in theirs["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(ours["optimizer"]["state"][i][name], value), (i, name)
    fabric.strategy.teardown()
    assert "forward" not in got.module.blocks[0].__dict__


def test_fabric_registers_what_it_supports(monkeypatch):
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    from lightning_vdnn.integrations import registry

    monkeypatch.setitem(registry.REGISTERED, "vdnn_test_zero", ("ZeRO", {"zero_stage": 2}))
    names = registry.register_fabric()
    assert {"vdnn", "vdnn_all", "vdnn_conv", "vdnn_none", "l2l"} <= set(names)
    assert "vdnn_test_zero" not in names and "vdnn_test_zero" not in STRATEGY_REGISTRY
    for name in names:
        assert STRATEGY_REGISTRY[name]["strategy"] is VDNNFabricStrategy


# -- Where a model built under the strategy is created -----------------------------------------------------
@pytest.mark.parametrize("entry, options, where", [
    ("lightning", {"layer_streaming": True}, "cpu"),
    ("lightning", {}, "cpu"),  # "auto": it streams when the state would fill the budget, known once built
    ("lightning", {"activation_offload": "all"}, "cuda:0"),
    ("lightning", {"layer_streaming": False}, "cuda:0"),
    ("l2l_zero", {}, "cpu"),
    ("fabric", {"layer_streaming": True}, "cpu"),
    ("fabric", {"activation_offload": "all"}, "cuda:0"),
])
def test_a_model_built_under_a_strategy_that_may_stream_is_built_in_host_memory(entry, options, where):
    """``configure_model``, ``trainer.init_module()`` and ``fabric.init_module()`` create tensors on the device
    (Lightning skips a copy so): a model streamed because its state does not fit there would run out of device
    memory before the strategy saw it. Where the blocks may stream they are built in host memory, in the
    precision's dtype; elsewhere on the device, as Lightning does. (No GPU needed: the default device is read.)"""
    from lightning.fabric.plugins.precision import HalfPrecision as FabricHalf
    from lightning.pytorch.plugins.precision import HalfPrecision

    if entry == "lightning":
        strategy = VDNNStrategy(device="cuda:0", precision_plugin=HalfPrecision("bf16-true"), **options)
        context = strategy.tensor_init_context(empty_init=True)
    elif entry == "l2l_zero":
        strategy = lightning_vdnn.L2LZeroStrategy(parallel_devices=[torch.device("cuda:0")],
                                                  precision_plugin=HalfPrecision("bf16-true"))
        context = strategy.tensor_init_context()
    else:
        strategy = VDNNFabricStrategy(device="cuda:0", precision=FabricHalf("bf16-true"), **options)
        context = strategy.module_init_context(empty_init=True)
    with context:
        assert str(torch.get_default_device()) == where
        assert torch.get_default_dtype() == torch.bfloat16
    assert torch.get_default_device().type == "cpu" and torch.get_default_dtype() == torch.float32


# -- Hugging Face Accelerate ----------------------------------------------------------------------------------
def test_accelerate_matches_plain_accelerate():
    from accelerate import Accelerator

    import lightning_vdnn.integrations.accelerate

    def run(offload: bool):
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = gpt_tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if offload:
            model, opt = lightning_vdnn.integrations.accelerate.prepare(accelerator, model, opt, policy="all", min_offload_bytes=0)
        else:
            model, opt = accelerator.prepare(model, opt)
        for _, (x, y) in zip(range(STEPS), token_loader()):
            accelerator.backward(loss_of(model, x, y))
            opt.step()
            opt.zero_grad()
        return model, accelerator

    ref, _ = run(False)
    got, accelerator = run(True)
    assert_same_params(got, ref)
    report = lightning_vdnn.integrations.accelerate.memory_report(got)
    assert report.step == STEPS and report.offloaded_bytes > 0
    bare = accelerator.unwrap_model(got, keep_fp32_wrapper=False)
    assert bare.forward.__func__ is GPT.forward  # the forward wrapper comes off with Accelerate's
    with pytest.raises(ValueError, match="was not prepared by lightning_vdnn.integrations.accelerate.prepare"):
        lightning_vdnn.integrations.accelerate.memory_report(ref)


# -- LightningCLI ---------------------------------------------------------------------------------------------
class CLIClassifier(Classifier):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(small_cnn(), lr)

    def train_dataloader(self):
        return image_loader()


def cli_fit(*strategy_args: str):
    from lightning.pytorch.cli import LightningCLI

    args = ["--seed_everything=0", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=2",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *strategy_args]
    cli = LightningCLI(CLIClassifier, args=args, run=False, save_config_callback=None)
    cli.trainer.fit(cli.model)
    return cli.model, cli.trainer


@pytest.mark.parametrize("policy", ["none", "all"])
def test_accelerate_streams_layers_and_matches_plain_accelerate(policy):
    """``prepare(..., layer_streaming=True)``: Accelerate leaves the model where it is, the blocks stream from
    host memory, ``accelerator.clip_grad_norm_`` between backward and step sees every gradient; same run. Under
    ``"all"`` the streamed blocks save their activations to the host instead of recomputing them."""
    from accelerate import Accelerator

    import lightning_vdnn.integrations.accelerate as vdnn_accelerate

    def run(stream: bool):
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = gpt_tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        if stream:
            model, opt = vdnn_accelerate.prepare(accelerator, model, opt, policy=policy, layer_streaming=True,
                                                 min_offload_bytes=0)
            every = frozenset(range(len(model.blocks)))
            assert vdnn_accelerate._STREAMERS[model].saving == (every if policy == "all" else frozenset())
        else:
            model, opt = accelerator.prepare(model, opt)
        losses = []
        for _, (x, y) in zip(range(STEPS), token_loader()):
            loss = loss_of(model, x, y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        if stream:
            vdnn_accelerate.synchronize(model)
            assert vdnn_accelerate.memory_report(model).streamed_h2d_bytes > 0
        return model, losses

    (ref, ref_losses), (got, losses) = run(False), run(True)
    assert losses == ref_losses
    assert_same_params(got, ref)
    vdnn_accelerate.release(got)
    assert "forward" not in got.blocks[0].__dict__


def test_lightning_cli_strategy_by_name_and_by_class():
    ref, _ = cli_fit("--trainer.strategy=auto")
    got, trainer = cli_fit("--trainer.strategy=vdnn_all")
    assert isinstance(trainer.strategy, VDNNStrategy) and trainer.strategy.config.activation_offload == "all"
    assert_same_params(got, ref)
    got, trainer = cli_fit("--trainer.strategy=lightning_vdnn.VDNNStrategy",
                           "--trainer.strategy.activation_offload=conv", "--trainer.strategy.min_offload_bytes=0")
    assert trainer.strategy.config.activation_offload == "conv"
    assert trainer.strategy.memory_report().offloaded_bytes > 0
    assert_same_params(got, ref)


# -- Hydra ----------------------------------------------------------------------------------------------------
def compose_user_app(tmp_path: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    (tmp_path / "app.yaml").write_text("defaults:\n  - strategy: vdnn_all\n  - _self_\n\nlr: 0.1\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        return compose(config_name="app", overrides=overrides)


def test_hydra_user_config_finds_package_groups(tmp_path, monkeypatch):
    from hydra.core.plugins import Plugins
    from hydra.errors import MissingConfigException
    from hydra.plugins.search_path_plugin import SearchPathPlugin
    from hydra.utils import instantiate

    found = [p for p in Plugins.instance().discover(SearchPathPlugin) if p.__name__ == "LightningVDNNSearchPathPlugin"]
    assert len(found) == 1  # installed with the package, discovered in the hydra_plugins namespace
    cfg = compose_user_app(tmp_path, [])  # found through the plugin alone
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, VDNNStrategy) and strategy.config.activation_offload == "all" and cfg.lr == 0.1
    monkeypatch.setattr(found[0], "manipulate_search_path", lambda self, sp: None)
    with pytest.raises(MissingConfigException):
        compose_user_app(tmp_path, [])
    cfg = compose_user_app(tmp_path, ["hydra.searchpath=[pkg://lightning_vdnn.conf]", "strategy=vdnn_conv"])
    assert instantiate(cfg.strategy).config.activation_offload == "conv"


def test_compare_recipe_prints_one_table(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "recipes/compare.py"), "-m", "strategy=plain,vdnn_all", "+model.n_layer=2",
           "data.max_bytes=100000", "trainer.max_steps=2",
           "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "trainer.accelerator=cpu",
           f"hydra.sweep.dir={sweep}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (sweep / "results.jsonl").read_text().splitlines()]
    assert [r["strategy"] for r in rows] == ["plain", "vdnn_all"]
    assert rows[0]["offloaded_bytes"] == 0 and rows[1]["offloaded_bytes"] > 0
    assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], rel=1e-5)
    assert out.stdout.count("lightning_vdnn compare") == 1 and "vdnn_all" in out.stdout


def test_train_recipe_runs_the_cnn_with_a_chunked_trunk(tmp_path):
    """The README's CNN command with the trunk chunked: its defaults validate every 100 batches, which must not
    be refused for data with fewer batches per epoch (data=images has 64)."""
    cmd = [sys.executable, str(ROOT / "recipes/train.py"), "model=vgg", "data=images", "strategy=vdnn_all",
           "strategy.batch_chunks=2", "strategy.chunk_layers=model.features", "strategy.min_offload_bytes=0",
           "trainer.max_steps=2", "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    offloaded = re.search(r"activations offloaded\s+([0-9.]+) GiB in (\d+) tensors", out.stdout)
    assert offloaded and int(offloaded[2]) > 0
