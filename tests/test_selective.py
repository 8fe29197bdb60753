"""Selective (op-level) recompute as a plan's choice: a recomputed layer keeps its matrix multiplies' and attention's
outputs and runs the cheap ops again in backward (``offload/selective.py``). What the profile measures, that
training under it ends exactly where plain training does (losses, parameters and buffers; dropout's masks replayed,
BatchNorm's statistics updated once), that the solver prefers it where it is cheaper, and that the predicted peak
matches the bytes counted on the CPU."""

from __future__ import annotations

import dataclasses
import functools

import lightning as L
import pytest
import torch
from rich.console import Console
from torch import nn

from conftest import TokenLM, assert_same_params, fit, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.offload.recompute_probe import SelectiveFacts
from lightning_vdnn.offload.trace import LayerProfile
from lightning_vdnn.planning.activation_solver import predicted_peak, solve_layers
from lightning_vdnn.report.end_of_fit import layer_table
from test_storage_bytes import hf_gpt2, hf_llama, measured, project_gpt, run
from torch.utils.checkpoint import checkpoint

MiB = 2**20


class ConvBlock(nn.Module):
    """Conv, BatchNorm, GELU, dropout and a residual add: whole recompute refuses it (running statistics), the
    selective one replays the statistics' buffers."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(nn.functional.gelu(self.bn(self.conv(x))))


class ConvNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList([ConvBlock(width) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def conv_net(n_layer: int = 3):
    torch.manual_seed(0)
    net = ConvNet()
    return net, net.blocks, torch.randn(8, 3, 16, 16), lambda out: out.pow(2).mean()


def dropout_gpt(n_layer: int = 3):
    net, layers, x, _ = project_gpt(n_layer)
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.1
    return net, layers, x, lambda out: out.float().pow(2).mean()


def hf_gpt2_dropout(n_layer: int = 3):
    net, layers, x, loss = hf_gpt2(n_layer)
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.1
    return net, layers, x, loss


MODELS = [dropout_gpt, hf_llama, hf_gpt2_dropout, conv_net]


def train(model, steps: int = 3, plan=None):
    """``steps`` SGD steps of ``model()`` (a fresh copy), plain or with ``plan(profile)``'s selective layers
    recomputed selectively from the second step on; returns the losses, the module and the offloader."""
    net, layers, x, loss = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    off, losses = None, []
    if plan is not None:
        off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0, watch_ops=True)
        off.attach(net, layers)
    for step in range(steps):
        torch.manual_seed(step)
        if off is not None:
            off.watch = True
            with off.capture():
                out = loss(net(x))
            out.backward()
            off.finish_pass()
            if step == 0:
                off.set_plan(frozenset(), selective=plan(off.layer_profile()))
        else:
            out = loss(net(x))
            out.backward()
        losses.append(out.detach())
        opt.step()
        opt.zero_grad()
    return torch.stack(losses), net, off


def every_selective(profile: list[LayerProfile]) -> frozenset[int]:
    return frozenset(g for g, p in enumerate(profile) if p.selective is not None)


@pytest.mark.parametrize("model", MODELS)
def test_selective_recompute_trains_like_plain(model):
    """Every layer that may be recomputed selectively is, the others offloaded: losses, parameters and buffers
    (BatchNorm's running statistics and count: updated once per step) equal plain training's bit for bit."""
    ref_losses, ref, _ = train(model)
    got_losses, got, off = train(model, plan=every_selective)
    torch.testing.assert_close(got_losses, ref_losses, rtol=0, atol=0)
    assert_same_params(got, ref, rtol=0, atol=0)
    for (name, a), b in zip(got.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    report = off.report()
    rows = [r for r in report.layers if r.selective]
    # every block (Llama's first: a tensor it saves is saved again after it, refused as for whole recompute)
    assert len(rows) == len(off._recomputer.modules) == (2 if model is hf_llama else 3)
    assert all(r.decision == "recompute" and r.described == "recompute (selective)" for r in rows)
    assert report.recomputed_forwards == len(rows) and all(r.recompute_ms is not None for r in rows)
    off.close()
    assert all("forward" not in vars(m) for m in got.modules())


@pytest.mark.parametrize("model", [project_gpt, hf_gpt2, hf_llama, conv_net])
def test_the_profile_measures_what_selective_holds(model):
    """The held bytes (inputs and the kept op outputs) are what a selective pass keeps on the device, counted by the
    offloader's ledger (SAC's outputs never reach the saved-tensor hooks: it counts them from SAC's policy), and
    lie between what whole recompute holds and what keeping holds; the cheap ops' share of the time is in (0, 1)."""
    net, layers, x, loss = model()
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0, watch_ops=True)
    off.attach(net, layers)
    run(off, net, x, loss)
    profile = off.layer_profile()
    assert profile[0].selective is None
    if model is hf_llama:  # its first layer is refused: a tensor it saves is saved again after it
        assert profile[1].selective is None and profile[1].recompute_bytes is None
    blocks = [p for p in profile[1:] if p.selective is not None]
    assert len(blocks) == (2 if model is hf_llama else 3)
    for p in blocks:
        s = p.selective
        assert isinstance(s, SelectiveFacts) and 0 < s.share < 1
        assert (p.recompute_bytes or 0) < s.held_bytes < p.saved_bytes + s.held_bytes
        assert p.selective_rebuilt_bytes < p.saved_bytes
    if model is conv_net:
        assert all(p.recompute_bytes is None for p in profile[1:])  # BatchNorm: no whole recompute
    else:  # a transformer block keeps well under what it saves
        assert all(p.selective.held_bytes < 0.8 * p.saved_bytes for p in blocks)
    off.set_plan(frozenset(), selective=every_selective(profile))
    run(off, net, x, loss)
    rows = off.report().layers
    for g in every_selective(profile):
        assert rows[g].selective and rows[g].offloaded_bytes == 0
        held = profile[g].selective.held_bytes  # the inputs count by span in the profile, by storage here
        assert abs(rows[g].saved_bytes - held) <= 0.01 * held, g
    off.close()


class InPlace(nn.Module):
    """A Linear whose output a ReLU changes in place: SAC could not hand the kept output back."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.lin(x))


def test_without_watch_ops_the_profile_offers_no_selective_recompute():
    """``watch_ops=False`` (the default, ``selective_recompute`` off): no dispatch mode watches the profiling pass,
    no layer may be recomputed selectively, and whole recompute is profiled as with it."""
    net, layers, x, loss = project_gpt()
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    off.attach(net, layers)
    run(off, net, x, loss)
    profile = off.layer_profile()
    assert all(p.selective is None for p in profile)
    assert all(p.recompute_bytes is not None for p in profile[1:])


def test_a_kept_output_changed_in_place_refuses_selective():
    net = nn.Sequential(nn.Linear(16, 16), InPlace(), nn.Linear(16, 16))
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0, watch_ops=True)
    off.attach(net, net)
    run(off, net, torch.randn(4, 16, requires_grad=True), lambda out: out.sum())
    profile = off.layer_profile()
    assert profile[1].selective is not None and profile[2].selective is None and profile[3].selective is not None


@pytest.mark.parametrize("model", [project_gpt, hf_gpt2])
def test_a_plan_with_selective_layers_peaks_where_predicted(model):
    """Copies made dear and whole recompute dearer than selective (as on a GPU), a budget between all selective
    and all kept: the plan recomputes selectively, and the peak counted by a dispatch mode on every op is within
    10% of the predicted one and within the budget."""
    net, layers, x, loss = model(12)
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0, watch_ops=True)
    off.attach(net, layers)
    run(off, net, x, loss)
    floor = measured(off, net, x, loss)
    profile = [dataclasses.replace(p, forward_ms=1.0, transfer_ms=50.0 if p.saved_bytes else 0.0,
                                   selective=p.selective and dataclasses.replace(p.selective, share=0.05))
               for p in off.layer_profile()]
    off.set_plan(frozenset(range(len(profile))))
    plain = measured(off, net, x, loss).peak
    every = every_selective(profile)
    low = predicted_peak(profile, frozenset({0}), every, floor.peak, floor.forward_peak, selective=every)
    budget = (low + plain) // 2
    plan = solve_layers(profile, floor.peak, budget, granule=4096, forward_peak=floor.forward_peak)
    assert plan.selective and plan.kept and plan.recomputed == plan.selective
    off.set_plan(plan.kept, plan.recomputed, plan.segments, plan.selective)
    peak = measured(off, net, x, loss).peak
    print(f"\nfloor {floor.peak}, plain {plain}, budget {budget}: predicted {plan.predicted_peak}, measured {peak}; "
          f"{len(plan.selective)} selective, {len(plan.kept)} kept")
    assert abs(plan.predicted_peak - peak) <= 0.1 * peak
    assert peak <= budget
    off.close()


def layer(share: float, selective: bool = True) -> LayerProfile:
    """A block of 100 MiB saved: whole recompute holds 10 MiB for 1 ms, selective 50 MiB for ``share`` ms."""
    facts = SelectiveFacts(held_bytes=50 * MiB, unrebuilt_bytes=60 * MiB, share=share) if selective else None
    return LayerProfile(100 * MiB, 10 * MiB, forward_ms=1.0, transfer_ms=20.0, selective=facts)


def test_the_solver_picks_selective_where_it_is_cheaper():
    """Budget between all selective (4 x 50 MiB held, plus one 40 MiB rebuild) and all kept (400 MiB): the
    solver recomputes selectively, never whole, where selective costs less; where it costs more (a share above
    one, as a layer of pointwise ops alone might measure), it recomputes whole; without the choice it pays for
    whole recomputes."""
    budget = 300 * MiB
    plan = solve_layers([layer(0.05)] * 4, 0, budget)
    assert plan.selective and plan.recomputed == plan.selective and plan.kept
    assert plan.predicted_peak <= budget and [plan.described(g) for g in range(4)].count("recompute (selective)") \
        == len(plan.selective)
    assert plan.added_ms == pytest.approx(0.05 * len(plan.selective))
    whole = solve_layers([layer(0.05, selective=False)] * 4, 0, budget)
    assert not whole.selective and whole.recomputed and whole.added_ms > plan.added_ms
    dear = solve_layers([layer(1.5)] * 4, 0, budget)
    assert not dear.selective and dear.recomputed
    tight = solve_layers([layer(0.05)] * 4, 0, 4 * 50 * MiB + 40 * MiB)
    assert tight.selective == frozenset(range(4)) and tight.predicted_peak == 240 * MiB


class Injected(L.Callback):
    """The first profile, before its times are replaced."""

    def on_train_batch_end(self, trainer, *args):
        if not hasattr(self, "layers"):
            self.layers = trainer.strategy._offloader.layer_profile()


class LastPlan(L.Callback):
    def on_train_end(self, trainer, module):  # before teardown lets the planner go
        self.plan = trainer.strategy._planner.plan


def dear_copies(layers: list[LayerProfile]) -> list[LayerProfile]:
    """Copies cost 100 ms, a block's forward 50 ms, selective 5% of it: a GPU's proportions, made certain."""
    return [dataclasses.replace(p, forward_ms=50.0 if g else 0.0, transfer_ms=100.0,
                                selective=p.selective and dataclasses.replace(p.selective, share=0.05))
            for g, p in enumerate(layers)]


def test_auto_plans_selective_recompute_and_trains_like_plain(monkeypatch):
    """``Trainer(strategy="vdnn", activation_offload="auto")`` at a budget that fits the last block kept (its
    backward comes first: a recompute there would rebuild on top of everything held) and the others recomputed
    selectively, but not one more kept: that is the plan; losses, parameters and buffers equal plain's; the report
    and the table say so, and the CPU-counted peak is within 10% of the prediction and within the budget."""
    measured_profile = ActivationOffloader.layer_profile
    monkeypatch.setattr(ActivationOffloader, "layer_profile", lambda self: dear_copies(measured_profile(self)))
    lm = functools.partial(TokenLM, dropout=0.1)
    strategy = functools.partial(VDNNStrategy, "auto", min_offload_bytes=0, layers="model.blocks",
                                 selective_recompute=True)
    profiled = Injected()
    fit(lm, token_loader(), strategy(), max_steps=1, callbacks=[profiled])
    layers = profiled.layers
    last = len(layers) - 1
    blocks, kept = frozenset(range(1, last)), frozenset({0, last})
    budget = predicted_peak(layers, kept, blocks, 0, 0, selective=blocks) + 2**16
    assert budget + min(p.saved_bytes - p.selective.held_bytes for p in layers[1:]) > budget + 2**17

    ref, _ = fit(lm, token_loader(), max_steps=4)
    last_plan = LastPlan()
    got, trainer = fit(lm, token_loader(), strategy(memory_budget=budget), max_steps=4, callbacks=[last_plan])
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)
    for a, b in zip(got.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b)
    plan, report = last_plan.plan, trainer.strategy.memory_report()
    assert plan.selective == plan.recomputed == blocks and plan.kept == kept
    assert report.layers_selective == len(blocks) and report.recomputed_forwards == len(blocks)
    assert [r.described for r in report.layers] == ["keep"] + ["recompute (selective)"] * len(blocks) + ["keep"]
    assert report.measured_peak_bytes <= report.predicted_peak_bytes <= budget
    assert report.predicted_peak_bytes <= 1.1 * report.measured_peak_bytes
    assert f"{len(blocks)} selectively" in str(report)
    console = Console(width=160, record=True)
    console.print(layer_table(report))
    text = console.export_text()
    assert "recompute (selective)" in text and f"2 keep, 0 offload, {len(blocks)} recompute ({len(blocks)} selective)" \
        in text

    # off by default (``VDNNConfig.selective_recompute``): the same budget recomputes whole layers only
    whole_plan = LastPlan()
    fit(lm, token_loader(), VDNNStrategy("auto", min_offload_bytes=0, layers="model.blocks", memory_budget=budget),
        max_steps=4, callbacks=[whole_plan])
    assert whole_plan.plan.recomputed and not whole_plan.plan.selective


def test_sac_outputs_never_reach_outer_saved_tensor_hooks():
    """Why the offloader counts SAC's kept outputs itself: torch's selective checkpoint keeps them in its own
    cache, outside autograd's saves, so an outer ``saved_tensors_hooks`` pack hook sees the checkpoint's input
    alone."""
    from lightning_vdnn.offload.selective import contexts

    lin1, lin2 = nn.Linear(16, 64), nn.Linear(64, 16)
    seen, held = [], []
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.shape) or t, lambda t: t):
        y = checkpoint(lambda v: lin2(nn.functional.gelu(lin1(v))), x, use_reentrant=False,
                       context_fn=functools.partial(contexts, held.append))
    assert seen == [x.shape]
    assert [t.shape for t in held] == [(4, 64), (4, 16)]  # the two addmm outputs
    y.sum().backward()
