"""Recompute as a plan's choice: what the profiling pass says each layer would keep if recomputed, which layers it
refuses, how the checkpoint meets the offload hooks, and training that keeps, offloads and recomputes layers at
once and ends exactly where plain training does."""

from __future__ import annotations

import copy
import dataclasses

import lightning as L
import pytest
import torch
from rich.console import Console
from torch import nn

from conftest import ResidualCNN, assert_same_params, fit, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.planning.activation_solver import predicted_peak
from lightning_vdnn.report.end_of_fit import layer_table

BLOCKS = "model.blocks"


def one_pass(net, x, keep=None, recompute=(), watch=True, offloader=None):
    off = offloader or ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    if offloader is None:
        off.attach(net, getattr(net, "blocks", None))
    off.set_plan(keep, recompute)
    off.watch = watch
    with off.capture():
        net(x).sum().backward()
    off.finish_pass()
    return off


class Doubles(nn.Module):
    """Modifies its input in place: a recompute would read the doubled input."""

    def forward(self, x):
        return x.mul_(2)


def test_probe_sizes_and_refusals():
    """BatchNorm (running statistics), in-place ReLU and the part before the first layer are refused; a layer whose
    input an earlier layer saved keeps nothing of it; a saved output that the next layer takes refuses its layer."""
    off = one_pass(ResidualCNN(), torch.randn(4, 3, 16, 16))
    rows, prof = off.report().layers, off.layer_profile()
    by_name = {r.name: p for r, p in zip(rows, prof)}
    assert prof[0].recompute_bytes is None
    for name in ("stem.1", "res.1", "res.4", "stem.2", "res.2"):  # BatchNorm; ReLU(inplace=True)
        assert by_name[name].recompute_bytes is None, name
    assert by_name["stem.0"].recompute_bytes == by_name["stem.0"].saved_bytes == 4 * 3 * 16 * 16 * 4  # its input
    assert by_name["pool"].recompute_bytes == 0 < by_name["pool"].saved_bytes  # the ReLU saved its input
    assert all(p.forward_ms >= 0 and p.transfer_ms > 0 for p in prof if p.saved_bytes)

    tanh = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), Doubles(), nn.Linear(8, 8))
    prof = one_pass(tanh, torch.randn(4, 8, requires_grad=True)).layer_profile()
    assert prof[2].recompute_bytes is None  # Tanh saves its output, the next Linear's input
    assert prof[3].recompute_bytes == 0 and prof[3].saved_bytes == 0  # that input is the Tanh's bytes
    assert prof[4].recompute_bytes is None  # modifies its input in place


class Twice(nn.Module):
    """One block called twice (two layers of a plan), dropout inside: only the second call is recomputed."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.3),
                                                   nn.Linear(256, 64))])

    def forward(self, x):
        return self.blocks[0](self.blocks[0](x))


def test_recompute_is_per_call_exact_and_leaves_internals_to_the_checkpoint():
    torch.manual_seed(0)
    net, x = Twice(), torch.randn(32, 64)
    inner = net.blocks[0][0]
    calls = []
    inner.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))

    def grads(plan_off=None, **kw):
        net.zero_grad()
        torch.manual_seed(1)
        off = one_pass(net, x, **kw) if plan_off is None else one_pass(net, x, offloader=plan_off, **kw)
        return off, [p.grad.clone() for p in net.parameters()]

    profiled, ref = grads()
    prof = profiled.layer_profile()
    assert len(prof) == 3 and prof[2].recompute_bytes == 32 * 64 * 4 < prof[2].saved_bytes  # its input alone
    calls.clear()
    off, got = grads(profiled, keep=frozenset({1}), recompute={2})
    assert calls == [True, True, True]  # two forwards, and the second call once more in backward
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # dropout's mask replayed, bit for bit
    report = off.report()
    row = report.layers[2]
    assert row.decision == "recompute" and row.saved_bytes == prof[2].recompute_bytes and row.recompute_ms >= 0
    assert report.recomputed_forwards == 1 and report.layers[1].decision == "keep"
    assert report.offloaded_bytes == 0  # the first call kept, the second's input kept, its internals not saved
    assert report.kept_bytes == prof[1].saved_bytes + prof[2].recompute_bytes
    with torch.no_grad():  # evaluation: no checkpoint, no pass
        net(x)
    assert "forward" in vars(net.blocks[0])
    off.set_plan(None)  # a new plan without recompute: the module's own forward is back
    assert "forward" not in vars(net.blocks[0])
    off.set_plan(frozenset(), {1})
    off.close()
    assert "forward" not in vars(net.blocks[0])


def test_wrapped_forward_keeps_signature_and_survives_deepcopy():
    """A deepcopy of a wrapped module (EMA, SWA) computes with its own weights; ``inspect`` sees the real
    signature; closing restores the class's forward."""
    import inspect

    from lightning_vdnn.offload.recompute import Recomputer

    layer, x = nn.Linear(4, 4), torch.randn(2, 4)
    wrapper = Recomputer(lambda: None)
    wrapper.install([layer])
    assert "forward" in vars(layer) and list(inspect.signature(layer.forward).parameters) == ["input"]
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.zero_()
        twin.bias.zero_()
        assert twin(x).abs().sum() == 0 and torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    wrapper.close()
    assert "forward" not in vars(layer)


class ScaledBlock(nn.Module):
    """Takes a tensor by keyword: the checkpoint must save it and take its RNG devices from it."""

    def __init__(self):
        super().__init__()
        self.inp, self.drop, self.out = nn.Linear(16, 64), nn.Dropout(0.5), nn.Linear(64, 16)

    def forward(self, x, *, scale, shift=None):
        return self.out(self.drop(torch.tanh(self.inp(x))) * scale) + shift


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ScaledBlock(), ScaledBlock()])
        self.shift = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        for block in self.blocks:
            x = block(x, scale=2.0, shift=self.shift * 1.0)
        return x


def test_keyword_tensors_reach_the_checkpoint():
    torch.manual_seed(0)
    net, x = KeywordNet(), torch.randn(8, 16, requires_grad=True)

    def grads(**kw):
        net.zero_grad()
        x.grad = None
        torch.manual_seed(3)
        off = one_pass(net, x, **kw)
        return off, [p.grad.clone() for p in net.parameters()] + [x.grad.clone()]

    profiled, ref = grads()
    prof = profiled.layer_profile()
    assert prof[1].inputs == ((8, 16), (16,)) and prof[1].recompute_bytes == 8 * 16 * 4 + 16 * 4  # x and shift
    off, got = grads(offloader=profiled, keep=frozenset(), recompute={1, 2})
    assert off.report().recomputed_forwards == 2
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class Profiled(L.Callback):
    """The profile the first step measured (before the test's times are injected)."""

    def on_train_batch_end(self, trainer, *args):
        if not hasattr(self, "layers"):
            self.layers = trainer.strategy._offloader.layer_profile()


class CountCalls(L.Callback):
    """Forward calls of each block's first norm, with the plan the last step ran."""

    def on_fit_start(self, trainer, module):
        self.calls = [0] * len(module.model.blocks)
        for i, block in enumerate(module.model.blocks):
            block.ln_1.register_forward_hook(lambda *a, i=i: self.calls.__setitem__(i, self.calls[i] + 1))

    def on_train_end(self, trainer, module):
        self.plan = trainer.strategy._planner.plan
        self.blocks = list(module.model.blocks)


#: Injected times, per layer of the GPT below (before the blocks, 4 blocks): blocks 1 and 2 recompute cheaply, 0
#: and 3 dearly; every copy costs 1 ms each way (on a CPU device nothing hides it).
FORWARD_MS = [0.0, 50.0, 0.1, 0.1, 50.0]
#: The plan that is then the fastest to fit ``mixed_budget``: the last block (and what runs before the first) kept,
#: blocks 1 and 2 recomputed under it (keeping either as well would not fit), block 0 offloaded.
DECISIONS = ["keep", "offload", "recompute", "recompute", "keep"]


def with_times(layers):
    return [dataclasses.replace(p, forward_ms=FORWARD_MS[g], transfer_ms=1.0) for g, p in enumerate(layers)]


@pytest.fixture
def injected(monkeypatch):
    """The profiling step's measured times replaced by ``FORWARD_MS``: the plan no longer depends on the machine."""
    measured = ActivationOffloader.layer_profile
    monkeypatch.setattr(ActivationOffloader, "layer_profile", lambda self: with_times(measured(self)))


def mixed_budget(layers) -> int:
    """The peak of ``DECISIONS`` (plus a margin for the solver's rounding): no room to keep another block whole."""
    assert [p.recompute_bytes is not None for p in layers] == [False, True, True, True, True]
    peak = predicted_peak(layers, frozenset({0, 4}), frozenset({2, 3}), 0, 0)
    assert peak + 2**16 < peak + min(p.saved_bytes - p.recompute_bytes for p in layers[1:])
    return peak + 2**16


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_auto_keeps_offloads_and_recomputes_and_trains_like_plain(lm, injected, precision):
    profiled = Profiled()
    fit(lm, token_loader(), VDNNStrategy("auto", min_offload_bytes=0, layers=BLOCKS), max_steps=1,
        callbacks=[profiled], precision=precision)
    layers = profiled.layers
    budget = mixed_budget(layers)

    steps, counts = 4, CountCalls()
    ref, _ = fit(lm, token_loader(), max_steps=steps, precision=precision)
    got, trainer = fit(lm, token_loader(), VDNNStrategy("auto", min_offload_bytes=0, layers=BLOCKS,
                                                        memory_budget=budget), max_steps=steps,
                       callbacks=[counts], precision=precision)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)

    plan, report = counts.plan, trainer.strategy.memory_report()
    assert [plan.decision(g) for g in range(5)] == DECISIONS and plan.predicted_peak <= budget
    assert report.recomputed_forwards == 2 and report.layers_recomputed == 2 and report.offloaded_bytes > 0
    assert counts.calls == [steps, 2 * steps - 1, 2 * steps - 1, steps]  # recomputed from the 2nd step on
    rows = report.layers
    assert [r.decision for r in rows] == DECISIONS
    for g in (2, 3):  # a recomputed block saved its input alone: its internals never reached the hooks
        assert rows[g].saved_bytes == layers[g].recompute_bytes and rows[g].offloaded_bytes == 0
        assert rows[g].recompute_ms is not None
    assert rows[1].offloaded_bytes == layers[1].saved_bytes and rows[4].offloaded_bytes == 0
    assert report.measured_peak_bytes <= report.predicted_peak_bytes <= budget
    assert all("forward" not in vars(block) for block in counts.blocks)  # teardown unwrapped them
    console = Console(width=160, record=True)
    console.print(layer_table(report))
    text = console.export_text()
    assert "recompute ms" in text and "2 keep, 1 offload, 2 recompute" in text and "recomputed in backward" in text


def test_fixed_policies_and_unbounded_auto_never_recompute(lm):
    _, trainer = fit(lm, token_loader(), VDNNStrategy("all", min_offload_bytes=0, layers=BLOCKS), max_steps=2)
    report = trainer.strategy.memory_report()
    assert report.recomputed_forwards == 0 and report.layers_recomputed is None
    assert all(r.decision != "recompute" for r in report.layers)
    _, trainer = fit(lm, token_loader(), VDNNStrategy("auto", min_offload_bytes=0, layers=BLOCKS), max_steps=2)
    report = trainer.strategy.memory_report()  # a CPU run without a budget keeps everything: plain speed
    assert report.recomputed_forwards == 0 and report.layers_recomputed == 0 and report.offloaded_bytes == 0


def test_plain_loop_auto_recomputes_too(injected):
    """``offload_activations(model, "auto")`` plans the same three ways and trains exactly as without it."""
    from lightning_vdnn import offload_activations
    from lightning_vdnn.examples.models import GPT, GPTConfig

    def loss_of(model, x, y):
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def train(budget=None, steps=4):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_name("gpt_tiny", dropout=0.1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in list(token_loader())[:steps]:
            if budget is None:
                loss = loss_of(model, x, y)
            else:
                with offload_activations(model, "auto", min_offload_bytes=0, layers="blocks",
                                         memory_budget=budget) as off:
                    loss = loss_of(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if budget is not None:
                off.step_done()
        return model, (off if budget is not None else None)

    ref, _ = train()
    x, y = next(iter(token_loader()))
    probe = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    probe.attach(ref, ref.blocks)
    probe.watch = True
    with probe.capture():
        loss_of(ref, x, y).backward()
    probe.finish_pass()
    got, off = train(budget=mixed_budget(probe.layer_profile()))
    assert_same_params(got, ref)
    report = off.report()
    assert [off.planner.plan.decision(g) for g in range(5)] == DECISIONS and report.recomputed_forwards == 2
    assert report.layers_recomputed == 2 and report.offloaded_bytes > 0
    off.close()
    assert all("forward" not in vars(block) for block in got.blocks)


class Plans(L.Callback):
    """Per step: whether the next one profiles, and the layers the plan recomputes."""

    def on_fit_start(self, trainer, module):
        self.steps = []

    def on_train_batch_end(self, trainer, *args):
        planner = trainer.strategy._planner
        self.steps.append((planner.profiling, planner.recomputed))


def test_short_last_batch_profiles_again_and_still_trains_like_plain(lm, injected):
    profiled = Profiled()
    fit(lm, token_loader(), VDNNStrategy("auto", min_offload_bytes=0, layers=BLOCKS), max_steps=1,
        callbacks=[profiled])
    loader = lambda: token_loader(n=20, batch=8)  # noqa: E731  (batches of 8, 8, then 4 each epoch)
    ref, _ = fit(lm, loader(), max_steps=6)
    plans = Plans()
    got, _ = fit(lm, loader(), VDNNStrategy("auto", min_offload_bytes=0, layers=BLOCKS,
                                            memory_budget=mixed_budget(profiled.layers)), max_steps=6,
                 callbacks=[plans])
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)
    # planned after the 1st step, recomputing from the 2nd; the short 3rd batch sends the 4th step to profile again
    assert [profiling for profiling, _ in plans.steps] == [False, False, True, False, False, True]
    assert plans.steps[0][1] == {2, 3} and plans.steps[3][1] == {2, 3}


class TwinStacks(nn.Module):
    """Two lists of three same-class blocks, as an encoder's and a decoder's: both are the blocks."""

    def __init__(self):
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.b = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))


def test_auto_plans_by_the_detected_blocks(lm):
    """Without ``layers``, ``"auto"`` decides per repeated block (where recompute pays), every list of them when
    several tie, while the fixed policies keep one layer per leaf module."""
    from lightning_vdnn.layers import offload_units

    module, trainer = fit(lm, token_loader(), VDNNStrategy("auto", min_offload_bytes=0), max_steps=1)
    names = [r.name for r in trainer.strategy.memory_report().layers]
    assert names == ["(before the first layer)"] + [f"{BLOCKS}.{i}" for i in range(len(module.model.blocks))]
    _, trainer = fit(lm, token_loader(), VDNNStrategy("all", min_offload_bytes=0), max_steps=1)
    assert len(trainer.strategy.memory_report().layers) > len(names)  # leaf modules
    twins = TwinStacks()
    assert list(offload_units(twins, None, plans_recompute=True)) == [*twins.a, *twins.b]
    assert offload_units(twins, "b", plans_recompute=True) is twins.b
