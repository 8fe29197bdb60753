"""Lean kept layers (``offload/pointwise.py``): a pointwise activation's output (GELU, SiLU) whose input the layer
keeps is not held; backward makes it again from that input. Exact against plain autograd on the project's GPT (GELU
and SwiGLU MLPs), ``transformers`` Llama (SiLU) and BERT (GELU), fp32 and bf16 autocast; the bytes not held are the
activation outputs; the planner keeps layers lean where that is the cheapest way into the budget, and Lightning
training with such a plan ends where plain training does. GPT-2 and T5 (GELU as a composite, ``gelu_new``) and a
BatchNorm CNN (in-place ReLU) have nothing to make again, and stay exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TokenLM, assert_same_params, fit, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.offload.trace import LayerProfile
from lightning_vdnn.planning.activation_solver import predicted_peak, solve_layers
from lightning_vdnn.units import MiB


def gpt(mlp):
    from lightning_vdnn.examples.models import GPT, GPTConfig

    net = GPT(GPTConfig.from_name("gpt_tiny", dropout=0.0, mlp=mlp))
    x = torch.randint(0, 256, (4, 64))
    return net, net.blocks, lambda m: m(x).float().square().mean(), net.config.n_layer * 4 * 64 * net.config.mlp_hidden


def llama():
    from lightning_vdnn.examples.hf_tasks import build_causal_lm

    net = build_causal_lm("llama_tiny", num_hidden_layers=3, hidden_size=64, intermediate_size=128)
    x = torch.randint(0, 100, (2, 16))
    return net, net.model.layers, lambda m: m(x).logits.float().square().mean(), 3 * 2 * 16 * 128


def bert():
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    net = transformers.BertModel(config)
    x = torch.randint(0, 100, (2, 16))
    return net, net.encoder.layer, lambda m: m(x).last_hidden_state.square().mean(), 2 * 2 * 16 * 128


def gpt2():
    """GELU as ``gelu_new``, a composite of tanh and products (no ``GeluBackward0``): nothing to make again."""
    import transformers

    config = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    net = transformers.GPT2LMHeadModel(config)
    x = torch.randint(0, 100, (2, 16))
    return net, net.transformer.h, lambda m: m(x).logits.float().square().mean(), 0


def t5():
    """T5 v1.1's gated GELU (``gelu_new`` too): nothing to make again; encoder and decoder blocks as the layers."""
    import transformers

    config = transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0)
    net = transformers.T5ForConditionalGeneration(config)
    x, y = torch.randint(0, 100, (2, 16)), torch.randint(0, 100, (2, 8))
    layers = [*net.encoder.block, *net.decoder.block]
    return net, layers, lambda m: m(input_ids=x, labels=y).loss, 0


def cnn():
    """Conv, BatchNorm (its running statistics are buffers), in-place ReLU, dropout: nothing to make again."""
    from conftest import ResidualCNN

    net = ResidualCNN()
    x = torch.randn(4, 3, 16, 16)
    return net, [net.stem, net.res, net.head], lambda m: m(x).square().mean(), 0


MODELS = {"gpt gelu": lambda: gpt("gelu"), "gpt swiglu": lambda: gpt("swiglu"), "llama": llama, "bert": bert,
          "gpt2": gpt2, "t5": t5, "batchnorm cnn": cnn}


def _grads(net):
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]  # BERT's pooler: unused


def _same(got, ref):
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, ref))


def run(net, layers, loss, dtype, keep, lean, off=None):
    """One step of ``net`` under an offloader with this plan (None: plain autograd): its loss, gradients and report.
    Seeded: dropout draws the same masks in the same step of two runs."""
    torch.manual_seed(1)
    net.zero_grad()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
    if off is None:
        with context:
            value = loss(net)
        value.backward()
        return value.detach(), _grads(net), None
    off.set_plan(keep, lean=lean)
    with off.capture(), context:
        value = loss(net)
    value.backward()
    off.finish_pass()
    return value.detach(), _grads(net), off.report()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_lean_layers_are_exact_and_hold_less_by_their_activation_outputs(name, dtype):
    """Two steps' gradients (no optimizer): losses, gradients and buffers (BatchNorm's statistics) against plain."""
    torch.manual_seed(0)
    net, blocks, loss, outputs = MODELS[name]()
    plain = copy.deepcopy(net)
    for _ in range(2):
        ref_loss, ref, _ = run(plain, blocks, loss, dtype, None, ())
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    off.attach(net, blocks)
    every = frozenset(range(len(blocks) + 1))
    _, _, full = run(net, blocks, loss, dtype, every, (), off)  # the first pass names the layers
    got_loss, got, lean = run(net, blocks, loss, dtype, every, every, off)
    assert torch.equal(got_loss, ref_loss)
    _same(got, ref)
    _same(list(net.buffers()), list(plain.buffers()))
    size = 2 if dtype == "bf16" else 4
    assert full.kept_bytes - lean.kept_bytes == outputs * size
    assert [r.described for r in lean.layers][1:] == ["keep (lean)"] * len(blocks)
    off.close()


def test_outputs_of_layers_not_kept_are_saved_as_any_other():
    """Lean asked of layers the plan offloads: their activation inputs leave the device, so their outputs cannot be
    made again from them and go to the host too; training stays exact."""
    torch.manual_seed(0)
    net, blocks, loss, outputs = gpt("gelu")
    _, ref, _ = run(net, blocks, loss, "fp32", None, ())
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    off.attach(net, blocks)
    _, _, everything = run(net, blocks, loss, "fp32", None, (), off)
    _, got, report = run(net, blocks, loss, "fp32", None, frozenset(range(len(blocks) + 1)), off)
    _same(got, ref)
    assert report.offloaded_bytes == everything.offloaded_bytes
    off.close()


def test_an_activation_output_changed_in_place_after_its_save_is_made_as_forward_used_it():
    """A saved output changed in place later: plain autograd refuses the backward; under saved-tensor hooks (torch's
    ``save_on_cpu`` too) torch no longer checks, and a tensor kept as itself gives the changed values. A lean layer
    makes the output again from its input: the gradient is that of the values forward used."""
    torch.manual_seed(0)
    fc, proj = nn.Linear(8, 32), nn.Linear(32, 8)

    class MLP(nn.Module):
        def __init__(self, changed):
            super().__init__()
            self.changed = changed

        def forward(self, x):
            y = F.gelu(fc(x))
            out = proj(y)
            (y.mul_ if self.changed else y.clone().mul_)(2)
            return out

    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        MLP(True)(x).sum().backward()
    proj.zero_grad()
    MLP(False)(x).sum().backward()
    want = proj.weight.grad.clone()
    net = MLP(True)
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    off.attach(net, [net])
    off.set_plan(frozenset({0, 1}), lean=(0, 1))
    proj.zero_grad()
    with off.capture():
        out = net(x).sum()
    out.backward()
    off.finish_pass()
    assert torch.equal(proj.weight.grad, want)
    off.close()


def test_the_profile_counts_and_times_what_keeping_lean_leaves_out():
    """With ``watch_pointwise`` (set where plans may keep layers lean) a profiling pass counts and times each layer's
    activation outputs; without it, it looks for none."""
    torch.manual_seed(0)
    net, blocks, loss, outputs = gpt("gelu")
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    off.attach(net, blocks)
    off.watch = True
    run(net, blocks, loss, "fp32", None, (), off)
    assert all(p.pointwise_bytes == 0 and p.pointwise_ms == 0 for p in off.layer_profile())
    off.close()
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0, watch_pointwise=True)
    off.attach(net, blocks)
    off.watch = True
    run(net, blocks, loss, "fp32", None, (), off)
    profile = off.layer_profile()
    assert [p.pointwise_bytes for p in profile] == [0] + [outputs * 4 // len(blocks)] * len(blocks)
    assert all(p.pointwise_ms > 0 for p in profile[1:])
    assert all(p.pointwise_bytes < p.saved_bytes for p in profile)
    off.close()


# -- the solver -------------------------------------------------------------------------------------------------
def blocks(n=4, saved=10 * MiB, pointwise=3 * MiB, lean_ms=0.1, forward_ms=2.0):
    return [LayerProfile(0)] + [LayerProfile(saved, saved // 10, forward_ms=forward_ms, transfer_ms=50.0,
                                             pointwise_bytes=pointwise, pointwise_ms=lean_ms) for _ in range(n)]


def test_the_solver_keeps_lean_where_that_is_the_cheapest_way_into_the_budget():
    layers = blocks()
    budget = sum(p.saved_bytes for p in layers) - 2 * 3 * MiB
    plan = solve_layers(layers, 0, budget)
    assert len(plan.lean) == 2 and plan.lean <= plan.kept and not plan.recomputed and not plan.offloaded
    assert plan.added_ms == pytest.approx(0.2)
    assert plan.kept_bytes == sum(p.saved_bytes for p in layers) - 2 * 3 * MiB
    assert plan.predicted_peak == predicted_peak(layers, plan.kept, plan.recomputed, 0, 0, lean=plan.lean) <= budget
    assert [plan.described(g) for g in sorted(plan.lean)] == ["keep (lean)"] * 2
    dear = solve_layers(blocks(lean_ms=5.0), 0, budget)  # dearer than a recompute: not lean
    assert not dear.lean and dear.recomputed
    assert solve_layers(layers, 0, sum(p.saved_bytes for p in layers)).lean == frozenset()  # it all fits


def test_a_lean_layer_s_backward_holds_its_outputs_again():
    """In a lean layer's backward its outputs exist again on top of what the layers before it hold."""
    layers = blocks(n=2)
    held = [sum(p.saved_bytes for p in layers[: g + 1]) for g in range(len(layers))]
    lean = frozenset({1})
    assert predicted_peak(layers, frozenset({0, 1, 2}), frozenset(), 0, 0, lean=lean) == held[-1] - 3 * MiB
    layers[1] = LayerProfile(10 * MiB, MiB, pointwise_bytes=9 * MiB)  # its outputs nearly all it saves
    peak = predicted_peak(layers, frozenset({0, 1}), frozenset(), 0, 0, lean=lean)
    assert peak == 10 * MiB  # layer 1's backward: its 1 MiB held plus the 9 MiB made again


@pytest.mark.parametrize("field", ["pointwise_bytes", "pointwise_ms"])
def test_bad_pointwise_profiles_name_the_value(field):
    with pytest.raises(ValueError, match=field):
        LayerProfile(MiB, **{field: -1})


# -- training with lean plans ----------------------------------------------------------------------------------
@pytest.fixture
def cheap_lean(monkeypatch):
    """Copies dear, recomputes dearer than making activation outputs again: the plan no longer depends on the
    machine's timings."""
    import dataclasses

    measured = ActivationOffloader.layer_profile

    def profile(self):
        return [dataclasses.replace(p, forward_ms=1.0, transfer_ms=50.0 if p.saved_bytes else 0.0,
                                    pointwise_ms=0.01 if p.pointwise_bytes else 0.0) for p in measured(self)]

    monkeypatch.setattr(ActivationOffloader, "layer_profile", profile)


def test_a_budget_met_by_lean_layers_trains_like_plain(cheap_lean):
    """``strategy="vdnn"`` with ``lean_activations=True`` at a budget a little under keeping everything: the plan keeps
    layers lean, training ends where plain training does, and what the plan holds is within 10% of the bytes counted.
    Without it (the default) the same budget recomputes or offloads instead."""
    import lightning as L

    seen = {}

    class Planned(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            planner = trainer.strategy._planner
            seen.setdefault("layers", planner._layers)
            seen.setdefault("floor", planner._floor)
            seen["plan"] = planner.plan

    module = lambda: TokenLM(dropout=0.0)  # noqa: E731
    fit(module, token_loader(), VDNNStrategy("auto", min_offload_bytes=0, layers="model.blocks",
                                             lean_activations=True), max_steps=1, callbacks=[Planned()])
    layers, floor = seen["layers"], seen["floor"]
    total, pointwise = sum(p.saved_bytes for p in layers), sum(p.pointwise_bytes for p in layers)
    assert pointwise > 0
    budget = floor + total - pointwise // 2
    ref, _ = fit(module, token_loader(), max_steps=4)
    seen.clear()
    got, trainer = fit(module, token_loader(), VDNNStrategy("auto", min_offload_bytes=0, layers="model.blocks",
                                                            memory_budget=budget, lean_activations=True),
                       max_steps=4, callbacks=[Planned()])
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=0, atol=0)
    assert_same_params(got, ref, rtol=0, atol=0)
    plan, report = seen["plan"], trainer.strategy.memory_report()
    assert plan.lean and not plan.recomputed and not plan.offloaded, plan
    assert report.layers_lean == len(plan.lean) and "lean" in str(report)
    assert abs(report.kept_bytes - plan.kept_bytes) <= 0.1 * plan.kept_bytes
    assert report.measured_peak_bytes <= report.predicted_peak_bytes <= budget and report.budget_kept
    seen.clear()
    fit(module, token_loader(), VDNNStrategy("auto", min_offload_bytes=0, layers="model.blocks", memory_budget=budget),
        max_steps=2, callbacks=[Planned()])  # off by default (``VDNNConfig.lean_activations``)
    assert not seen["plan"].lean and (seen["plan"].recomputed or seen["plan"].offloaded)
