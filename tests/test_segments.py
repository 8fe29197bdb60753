"""Segments: a run of consecutive layers recomputed as one (its input kept, everything inside rebuilt in backward),
the boundaries chosen by the planner's dynamic program; and budgets kept (a measured peak over the budget makes the
plan again, lower). Training with segment plans ends exactly where plain training does (losses, parameters,
buffers with BatchNorm's running statistics), on the project's GPT, a VGG with BatchNorm and a ``transformers``
Llama; the predicted peak matches the bytes counted on the CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from conftest import Classifier, TokenLM, assert_same_params, fit, image_loader, made_storages, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.offload import recompute
from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.offload.recompute_probe import SegmentFacts
from lightning_vdnn.offload.trace import LayerProfile
from lightning_vdnn.planning.activation_plan import MAX_REPLANS, AutoPlanner
from lightning_vdnn.planning.activation_solver import predicted_peak, segment_bytes, solve_layers
from lightning_vdnn.units import MiB

BLOCKS = "model.blocks"


# -- the solver ------------------------------------------------------------------------------------------------
def chain(n: int, size: int = 4 * MiB, joins=None, reach=None, ms: float = 1.0) -> list[LayerProfile]:
    """What runs before the first layer, then ``n`` leaf layers of a CNN: each saves its input alone (``b = r``), so
    recomputing one alone frees nothing; copies are dear (20 ms a layer on a CPU device)."""
    layers = [LayerProfile(0)]
    for g in range(1, n + 1):
        facts = SegmentFacts(starts=True, joins=g > 1 if joins is None else joins(g),
                             reach=g if reach is None else reach(g), input_bytes=size, own_input_bytes=size)
        layers.append(LayerProfile(size, size, forward_ms=ms, transfer_ms=10.0, segment=facts))
    return layers


def test_dp_recomputes_a_segment_where_one_layer_alone_frees_nothing():
    layers, budget = chain(9), 16 * MiB
    plan = solve_layers(layers, 0, budget)
    without = solve_layers([dataclasses.replace(p, segment=None) for p in layers], 0, budget)
    assert without.segments == () and without.recomputed == frozenset()  # one by one frees nothing: offload
    assert plan.segments and plan.added_ms < without.added_ms and plan.predicted_peak <= budget
    for first, end in plan.segments:
        assert end - first >= 2 and set(range(first, end)) <= plan.recomputed
    held, rebuilt = segment_bytes(layers, *plan.segments[0])
    first, end = plan.segments[0]
    assert held == 4 * MiB and rebuilt == (end - first - 1) * 4 * MiB  # the input held, the rest rebuilt
    assert plan.predicted_peak == predicted_peak(layers, plan.kept, plan.recomputed, 0, 0, plan.segments)
    # the peak counts a segment's rebuild: with room for it but not for one more kept layer, the segment is taken
    assert all(segment_bytes(layers, a, b)[1] <= budget for a, b in plan.segments)


def test_dp_honours_the_chain_and_what_is_saved_after_the_run():
    broken = solve_layers(chain(9, joins=lambda g: g > 1 and g % 2), 0, 16 * MiB)
    assert all(b - a == 2 and a % 2 == 0 for a, b in broken.segments)  # only [2, 4), [4, 6), ...: layer g joins if odd
    late = solve_layers(chain(9, reach=lambda g: 9), 0, 16 * MiB)  # each layer's tensors saved again by the last
    assert all(b == 10 for _, b in late.segments)
    none = solve_layers(chain(9, ms=1000.0), 0, 16 * MiB)  # recompute dearer than copies: none
    assert none.segments == () and none.recomputed == frozenset()


# -- budgets kept ----------------------------------------------------------------------------------------------
def test_a_peak_over_the_budget_plans_again_lower_then_settles_for_the_safe_plan():
    layers = chain(9)
    planner = AutoPlanner(budget=16 * MiB)
    first = planner.observe(layers, peak=0)
    assert first.segments and planner.report_fields(10)["segments"] == len(first.segments)
    planner.observe(layers, peak=16 * MiB)  # within the budget: kept
    assert planner.plan is first and planner.budget_kept is True and planner.replans == 0
    over = first.predicted_peak + 4 * MiB  # the model missed 4 MiB
    second = planner.observe(layers, peak=over)
    assert planner.replans == 1 and second.predicted_peak <= planner.budget and second.added_ms > first.added_ms
    assert second.predicted_peak - 4 * MiB <= first.predicted_peak - 4 * MiB  # the miss counted: 4 MiB less held
    assert planner.budget_kept is False and planner.report_fields(10)["budget_replans"] == 1
    for _ in range(MAX_REPLANS):
        if not planner.plan.on_device:
            break
        planner.observe(layers, peak=planner.budget + 4 * MiB)
    assert not planner.plan.on_device and planner.replans <= MAX_REPLANS + 1  # the profiling step's plan, which fit


def test_the_report_says_whether_the_budget_was_kept():
    from lightning_vdnn.report.memory_report import MemoryReport

    common = dict(policy="auto", budget_bytes=100 * MiB, predicted_peak_bytes=99 * MiB, layers_kept=1,
                  layers_offloaded=1, layers_recomputed=4, segments=2)
    kept = str(MemoryReport(measured_peak_bytes=101 * MiB, budget_kept=True, **common))
    assert "4 recomputed (2 as segments)" in kept and "(within budget)" in kept
    over = str(MemoryReport(measured_peak_bytes=110 * MiB, budget_kept=False, budget_replans=3, **common))
    assert "OVER budget by 10.0%, after 3 re-plans" in over


# -- training with segment plans ---------------------------------------------------------------------------------
@pytest.fixture
def dear_copies(monkeypatch):
    """Copies made dear and recomputes cheap in the profiled times: the plan no longer depends on the machine."""
    measured = ActivationOffloader.layer_profile

    def profile(self):
        return [dataclasses.replace(p, forward_ms=0.1, transfer_ms=50.0 if p.saved_bytes else 0.0)
                for p in measured(self)]

    monkeypatch.setattr(ActivationOffloader, "layer_profile", profile)


class Profile:
    """The first step's profile and the planner's floor (a Lightning callback)."""

    def __init__(self):
        import lightning as L

        outer = self

        class CB(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                planner = trainer.strategy._planner
                if not hasattr(outer, "layers"):
                    outer.layers, outer.floor = planner._layers, planner._floor
                    outer.forward = planner._forward_peak
                outer.plan = planner.plan

        self.callback = CB()


def segment_budget(profile: Profile) -> int:
    """The least budget (in twentieths of the saved bytes) whose plan recomputes a segment."""
    total = sum(p.saved_bytes for p in profile.layers)
    for twentieths in range(1, 20):
        budget = profile.floor + total * twentieths // 20
        if solve_layers(profile.layers, profile.floor, budget, MiB, profile.forward).segments:
            return budget
    raise AssertionError("no budget makes a segment plan")


def assert_same_buffers(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def forced(segments):
    """A solver that plans ``segments`` and keeps the rest (the transformer blocks of a 4-block GPT recompute best one
    by one: a segment pays only where a block's input is a large part of what it saves)."""
    from lightning_vdnn.planning.activation_solver import _plan

    def solve(layers, floor, budget, granule=MiB, forward_peak=None):
        base = floor if forward_peak is None else min(forward_peak, floor)
        inside = {g for a, b in segments for g in range(a, b)}
        return _plan(layers, frozenset(range(len(layers))) - inside, frozenset(), floor, base, budget, segments)

    return solve


def train_with_segments(module_fn, loader, layers=None, steps=4, precision="32-true", budget=True):
    profile = Profile()
    fit(module_fn, loader(), VDNNStrategy("auto", min_offload_bytes=0, layers=layers), max_steps=1,
        callbacks=[profile.callback], precision=precision)
    budget = segment_budget(profile) if budget else None
    ref, _ = fit(module_fn, loader(), max_steps=steps, precision=precision)
    planned = Profile()
    got, trainer = fit(module_fn, loader(), VDNNStrategy("auto", min_offload_bytes=0, layers=layers,
                                                         memory_budget=budget),
                       max_steps=steps, callbacks=[planned.callback], precision=precision)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)
    assert_same_buffers(got, ref)
    report = trainer.strategy.memory_report()
    assert planned.plan.segments and report.segments == len(planned.plan.segments)
    assert report.recomputed_forwards >= len(planned.plan.segments)
    if budget is not None:
        assert report.measured_peak_bytes <= report.predicted_peak_bytes <= budget and report.budget_kept
    return planned.plan, report


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gpt_blocks_in_segments_train_like_plain(monkeypatch, precision):
    from lightning_vdnn.planning import activation_plan

    monkeypatch.setattr(activation_plan, "solve_layers", forced(((1, 3), (3, 5))))
    plan, report = train_with_segments(lambda: TokenLM(dropout=0.1), token_loader, BLOCKS, precision=precision,
                                       budget=False)
    assert plan.segments == ((1, 3), (3, 5)) and report.recomputed_forwards == 2
    assert [r.decision for r in report.layers] == ["keep"] + ["recompute"] * 4


def test_vgg_leaf_layers_with_batchnorm_in_segments_train_like_plain(dear_copies):
    """A CNN without repeated blocks: segments of leaf modules (conv, BatchNorm, ReLU, pool) in forward order;
    BatchNorm's running statistics are updated once per step, as without the recompute."""
    from lightning_vdnn.examples.models.vgg import VGG, VGGConfig

    vgg = lambda: Classifier(VGG(VGGConfig.from_name("vgg_tiny", batch_norm=True, image_size=16)))  # noqa: E731
    plan, report = train_with_segments(vgg, image_loader)
    norms = {f"net.features.{i}" for i, m in enumerate(vgg().net.features) if isinstance(m, nn.BatchNorm2d)}
    assert any(report.layers[g].name in norms for a, b in plan.segments for g in range(a, b))


def hf_llama():
    from lightning_vdnn.examples.hf_tasks import build_causal_lm

    torch.manual_seed(0)
    return build_causal_lm("llama_tiny", num_hidden_layers=3, hidden_size=64, intermediate_size=128)


def llama_pass(model, x, off, keep=None, segments=()):
    model.zero_grad()
    torch.manual_seed(1)
    off.set_plan(keep, (), segments)
    off.watch = True
    with off.capture():
        model(x).logits.float().sum().backward()
    off.finish_pass()
    return [p.grad.clone() for p in model.parameters()]


def test_transformers_llama_decoder_layers_in_one_segment_are_exact():
    """A ``transformers`` model's decoder layers take rotary tables and masks beside the hidden states: those need
    no gradient and are held as given; the hidden states chain the layers."""
    model, x = hf_llama(), torch.randint(0, 100, (2, 16))
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    off.attach(model, model.model.layers)
    ref = llama_pass(model, x, off)
    layers = off.layer_profile()
    assert [p.segment.joins for p in layers] == [False, False, True, True]
    assert segment_bytes(layers, 1, 4)[0] < layers[1].saved_bytes  # a segment of all three: only its input held
    got = llama_pass(model, x, off, keep=frozenset({0}), segments=[(1, 4)])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    report = off.report()
    assert [r.decision for r in report.layers] == ["keep", "recompute", "recompute", "recompute"]
    assert report.recomputed_forwards == 1 and report.offloaded_bytes == 0
    off.close()


# -- the predicted peak against the bytes counted ----------------------------------------------------------------
def gpt():
    net = TokenLM(dropout=0.0).model
    return net, torch.randint(0, 256, (8, 64)), net.blocks, ((1, 3), (3, 5))


def vgg():
    from lightning_vdnn.examples.models.vgg import VGG, VGGConfig

    net = VGG(VGGConfig.from_name("vgg_tiny", batch_norm=True, image_size=16, dropout=0.0))
    return net, torch.randn(16, 3, 16, 16), None, None


@pytest.mark.parametrize("model", [gpt, vgg])
def test_predicted_peak_matches_the_bytes_counted_on_cpu(monkeypatch, dear_copies, model):
    """What a segment plan holds through forward (counted as the offloader's hooks see it) and what each segment's
    recompute rebuilds at once (counted as the storages its recompute leaves held): the predicted peak above the
    floor is within 10% of the counted one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rebuilt: dict[int, int] = {}

    class Storages(TorchDispatchMode):
        """The storages ops make (not views or detached aliases of their inputs)."""

        def __init__(self):
            super().__init__()
            self.made = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for address, storage in made_storages(args, kwargs, out).items():
                self.made.setdefault(address, storage)
            return out

    replay = recompute._OpenSegment._replay

    def counted(self, *inputs):
        mode = Storages()
        try:
            with mode:
                return replay(self, *inputs)
        finally:
            inputs = None
            held = [s for s in mode.made.values() if torch._C._storage_Use_Count(s._cdata) > 1]
            rebuilt[self.start] = sum(s.nbytes() for s in held)

    monkeypatch.setattr(recompute._OpenSegment, "_replay", counted)
    torch.manual_seed(0)
    net, x, units, segments = model()
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    off.attach(net, units)
    off.watch = True
    with off.capture():
        net(x).sum().backward()
    off.finish_pass()
    layers = off.layer_profile()  # copies made dear: recompute pays
    total = sum(p.saved_bytes for p in layers)
    plans = [solve_layers(layers, 0, total * n // 20) for n in range(2, 20)] if segments is None else \
        [forced(segments)(layers, 0, total)]
    plan = next(p for p in plans if p.segments)
    off.set_plan(plan.kept, plan.recomputed, plan.segments, plan.selective)
    with off.capture():
        net(x).sum().backward()
    off.finish_pass()
    rows = off.report().layers
    kept = [r.saved_bytes - r.offloaded_bytes for r in rows]
    assert set(rebuilt) == {a for a, _ in plan.segments}
    counted_peak = max([sum(kept)] + [sum(kept[: a + 1]) + rebuilt[a] for a, _ in plan.segments])
    assert abs(sum(kept) - plan.kept_bytes) <= 0.1 * plan.kept_bytes
    assert abs(counted_peak - plan.predicted_peak) <= 0.1 * plan.predicted_peak
    off.close()


def test_a_model_that_no_longer_chains_its_layers_is_told_what_changed():
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
    off.attach(net)
    off.watch = True
    x = torch.randn(4, 8, requires_grad=True)
    with off.capture():
        net(x).sum().backward()
    off.finish_pass()
    off.set_plan(frozenset(), (), [(1, 4)])
    with pytest.raises(RuntimeError, match=r"Forward ended inside the recomputed segment of layers \[1, 4\)"):
        with off.capture():
            net[0](x)  # the pass stops after the first layer
    with off.capture():  # the hooks are off autograd's stack: a new pass runs
        net(x).sum().backward()
    off.finish_pass()
    off.close()


# -- on a GPU ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vgg_segments_on_cuda_train_like_plain_within_the_budget(dear_copies):
    """VGG with BatchNorm, leaf layers, copies made dear: at a budget halfway between the planner's own floor (its
    all-offloaded profile, measured as it measures it) and plain's peak, the plan recomputes segments, the measured
    peak keeps the budget (2%), and fp32 training matches plain as closely as plain matches itself.

    cuDNN runs deterministic algorithms (its default ones differ run to run beyond 1e-4 over five steps), and the
    budget comes from the same runs' floor, so it is above it under these algorithms too. Max pooling's backward
    has no deterministic kernel: plain runs twice, and its own spread widens the tolerance."""
    import lightning as L

    from lightning_vdnn.examples.models.vgg import VGG, VGGConfig

    floors: list[int] = []

    class Floor(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            planner = trainer.strategy._planner
            if planner is not None and planner._floor is not None:
                floors.append(planner._floor)

    def run(strategy, steps=5, callbacks=()):
        L.seed_everything(0, verbose=False)
        module = Classifier(VGG(VGGConfig.from_name("vgg_tiny", batch_norm=True, image_size=64)))
        trainer = L.Trainer(strategy=strategy, accelerator="gpu", devices=1, max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=list(callbacks))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64 * steps, 3, 64, 64, generator=g),
                                              torch.randint(0, 10, (64 * steps,), generator=g))
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=64))
        return module, trainer, torch.cuda.max_memory_allocated()

    def spread(a, b):
        losses = (torch.tensor(a.losses) - torch.tensor(b.losses)).abs().max().item()
        params = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
        return losses, params

    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        ref, _, plain_peak = run(VDNNStrategy("none", min_offload_bytes=0))
        again, _, _ = run(VDNNStrategy("none", min_offload_bytes=0))
        run(VDNNStrategy("auto", min_offload_bytes=0), steps=3, callbacks=[Floor()])  # no budget: profile only
        floor = floors[-1]
        assert floor < plain_peak
        budget = floor + (plain_peak - floor) // 2
        got, trainer, _ = run(VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget))
    report = trainer.strategy.memory_report()
    (loss_spread, param_spread), (loss_diff, param_diff) = spread(ref, again), spread(got, ref)
    print(f"\nplain {plain_peak / MiB:.1f} MiB, floor {floor / MiB:.1f} MiB, budget {budget / MiB:.1f} MiB; plain "
          f"against itself: losses {loss_spread:.2e}, parameters {param_spread:.2e}; vdnn against plain: losses "
          f"{loss_diff:.2e}, parameters {param_diff:.2e}\n{report}")
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4,
                               atol=max(1e-5, 4 * loss_spread))
    assert_same_params(got, ref, rtol=1e-3, atol=max(1e-5, 4 * param_spread))
    assert report.segments and report.budget_kept
