"""The copy link in the planner (``planning/copy_link.py``): offloaded layers' copies hide under all the compute
that follows them, so a GPU plan offloads the leading layers where the per-layer model recomputed them; the
prefetcher starts each copy back at the cue the plan chose; a CPU profile plans as before."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch import nn

from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.offload.prefetch import Prefetcher
from lightning_vdnn.offload.trace import LayerProfile
from lightning_vdnn.planning import copy_link
from lightning_vdnn.planning.activation_plan import AutoPlanner
from lightning_vdnn.planning.activation_solver import held_levels, predicted_peak, solve_layers
from lightning_vdnn.units import GiB, MiB
from test_planner import random_layers

# gpt_1b on the H200 (benchmarks/README.md): a block keeps 705 MB, recomputing it costs 1.24 ms, one copy of it
# 12.8 ms at 55 GB/s; a recomputed block still holds its input (32 MiB)
BLOCK = LayerProfile(705 * MiB, 32 * MiB, forward_ms=1.24, transfer_ms=12.8, overlap_ms=1.24)
FLOOR = 20 * GiB
BUDGET = FLOOR + int(7.4 * GiB)  # room for about 10 of the 24 blocks: the 75% plan's shape


def gpt(n: int = 24, head_ms: float = 0.0) -> list[LayerProfile]:
    """n blocks; the code after the last one (final norm, head, loss) runs ``head_ms``. As a profile measures it:
    a layer's ``overlap_ms`` is the next one's span, the last block's span runs to forward's end (with the head)."""
    return [BLOCK] * (n - 2) + [dataclasses.replace(BLOCK, overlap_ms=1.24 + head_ms),
                                dataclasses.replace(BLOCK, overlap_ms=0.0)]


def backward_memory(layers, plan, base):
    """Independently of the solver: bytes on the device as each layer's backward runs, with the copies back the
    plan starts ahead (from its cue down to the layer that reads them) on top of what the layers hold."""
    held, levels = held_levels(layers, plan.kept, plan.recomputed, plan.segments, plan.selective)
    out = []
    for s in range(len(layers)):
        ahead = sum(layers[j].offload_bytes for j, cue in plan.prefetch_from if j < s <= cue)
        out.append(base + levels[s] + ahead)
    return out


def test_gpt_plan_offloads_leading_blocks_and_recomputes_fewer():
    layers = gpt()
    old = solve_layers(layers, FLOOR, BUDGET)
    new = solve_layers(layers, FLOOR, BUDGET, link=True)
    assert not old.offloaded and len(old.recomputed) == 14  # the per-layer model: a copy costs ~22 ms, never chosen
    assert new.offloaded == (0, 1)  # forward's 30 ms hide two 12.8 ms copies
    assert len(new.recomputed) == 12 and new.kept == old.kept
    assert new.added_ms == pytest.approx(old.added_ms - 2 * 1.24)
    assert new.exposed_copy_ms == 0.0 and new.copy_ms == pytest.approx(4 * 12.8) and new.hidden_copy_ms == new.copy_ms
    # the copies back start several layers up (12.8 ms behind 2.48 ms of backward per layer), top layer first
    assert [j for j, _ in new.prefetch_from] == [1, 0]
    assert all(cue - j >= 5 for j, cue in new.prefetch_from)
    # the predicted peak counts the bytes copied back ahead, and stays within the budget
    assert max(backward_memory(layers, new, FLOOR)) <= new.predicted_peak <= BUDGET
    assert new.predicted_peak >= predicted_peak(layers, new.kept, new.recomputed, FLOOR, FLOOR)
    # forward queues both copies at once: the offloader must let them through
    assert new.inflight_bytes == 2 * 705 * MiB


def test_longer_forward_hides_more_blocks():
    """gpt_1b's forward is ~50 ms with its head and loss: three or four blocks go out hidden."""
    layers = gpt(head_ms=20.0)
    budget = BUDGET + GiB  # at BUDGET the third copy, in flight as the last block runs, costs a kept block
    plan, old = solve_layers(layers, FLOOR, budget, link=True), solve_layers(layers, FLOOR, budget)
    assert plan.offloaded == (0, 1, 2) and plan.exposed_copy_ms == 0.0 and plan.predicted_peak <= budget
    assert len(plan.recomputed) == 10 and len(old.recomputed) == 12 and plan.added_ms == pytest.approx(10 * 1.24)


def test_a_copy_the_link_finds_dearer_is_priced_again():
    """Beside a long last span (the head) the per-layer model calls a copy free; on the link its copy back has no
    room to start early (backward begins with everything held), so the plan pays for it or does not offload it."""
    layers = [BLOCK] * 23 + [dataclasses.replace(BLOCK, overlap_ms=20.0)]
    assert layers[-1].offload_ms == 0.0
    assert copy_link.least_exposed_ms(layers, [23]) == pytest.approx(12.8)  # nothing above it to cue it
    plan = solve_layers(layers, FLOOR, FLOOR + 4 * GiB, link=True)
    assert 23 not in plan.offloaded and plan.predicted_peak <= FLOOR + 4 * GiB
    assert plan.added_ms == pytest.approx(len(plan.recomputed) * 1.24 + plan.exposed_copy_ms)


def test_copies_that_outlast_forward_are_exposed():
    layers = [LayerProfile(10 * MiB, None, transfer_ms=3.0, overlap_ms=1.0)] * 4  # forward: 4 ms of windows
    link = copy_link.schedule(layers, [0, 1], [0] * 4, GiB)
    assert link.out_exposed_ms == pytest.approx(2.0)  # queued: done at 3 and 6, forward ends at 4
    # layers end at 0, 1, 2, 3 and forward at 4: beyond each layer's own, the earlier copies still queued
    assert link.forward_extra == (0, 10 * MiB, 20 * MiB, 10 * MiB, 10 * MiB)
    assert link.inflight_bytes == 20 * MiB


def test_no_room_ahead_means_a_copy_back_on_demand():
    layers = [LayerProfile(10 * MiB, None, transfer_ms=1.0, overlap_ms=5.0)] * 4
    roomy = copy_link.schedule(layers, [0], [0] * 4, GiB)
    assert roomy.back_exposed_ms == 0.0 and roomy.prefetch_from == ((0, 1),)  # layer 1's 10 ms of backward hide it
    full = copy_link.schedule(layers, [0], [GiB] * 4, GiB)
    assert full.prefetch_from == () and full.back_exposed_ms == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(12))
def test_without_overlap_the_link_changes_no_plan(seed):
    """A CPU device copies inline (overlap 0): the link model must plan exactly as the per-layer one."""
    rng = random.Random(2000 + seed)
    layers = [dataclasses.replace(p, overlap_ms=0.0) for p in random_layers(rng, rng.randint(1, 10))]
    floor = rng.randint(1, 100) * MiB
    budget = floor + rng.randint(0, sum(p.saved_bytes for p in layers) // MiB) * MiB
    assert solve_layers(layers, floor, budget, link=True) == solve_layers(layers, floor, budget)



@pytest.mark.parametrize("seed", range(12))
def test_a_link_plan_offloads_only_leading_layers_and_beats_the_per_layer_plan(seed):
    """With overlap (a GPU profile) the link's plan is taken only where the layers it offloads are a leading run and
    it adds less than the per-layer model's plan; otherwise the per-layer plan stands (VGG-16 on the H200: link
    plans that offloaded layers throughout exposed 25-214 ms they predicted hidden)."""
    rng = random.Random(3000 + seed)
    layers = [dataclasses.replace(p, overlap_ms=round(rng.uniform(0.5, 3), 3))
              for p in random_layers(rng, rng.randint(2, 10))]
    floor = rng.randint(1, 100) * MiB
    budget = floor + rng.randint(0, sum(p.saved_bytes for p in layers) // MiB) * MiB
    linked, per_layer = solve_layers(layers, floor, budget, link=True), solve_layers(layers, floor, budget)
    if linked != per_layer:
        assert set(linked.offloaded) == set(range(len(linked.offloaded)))
        assert linked.added_ms < per_layer.added_ms
    assert linked.predicted_peak <= budget

def test_planner_hands_the_schedule_to_the_offloader():
    planner = AutoPlanner(BUDGET)
    plan = planner.observe(gpt(), FLOOR)
    assert plan.prefetch_from and planner.prefetch_from == plan.prefetch_from
    assert planner.inflight_bytes == plan.inflight_bytes > 0
    fields = planner.report_fields(24)
    assert fields["offloaded_layers"] == (0, 1) and fields["predicted_exposed_copy_ms"] == 0.0
    cpu = AutoPlanner(BUDGET)
    assert not cpu.observe([dataclasses.replace(p, overlap_ms=0.0) for p in gpt()], FLOOR).prefetch_from


# -- the prefetcher's schedule, on a CPU device ----------------------------------------------------------------------
def blocks(n: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(n)])


def run(model: nn.Sequential, offloader=None):
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    if offloader is None:
        model(x).square().sum().backward()
        return
    with offloader.capture():
        loss = model(x).square().sum()
    loss.backward()
    offloader.finish_pass()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first block's input needs no grad
def test_copies_back_start_at_their_cues_and_gradients_stay_exact():
    ref = blocks()
    run(ref)
    model = blocks()
    off = ActivationOffloader(torch.device("cpu"), min_offload_bytes=0, max_inflight_bytes=1024)
    off.attach(model, model)
    run(model, off)  # the first pass names the layers: group g is block g - 1
    events: list[tuple[str, int]] = []
    for g, block in enumerate(model, start=1):
        block.register_full_backward_pre_hook(lambda m, grad, g=g: events.append(("backward", g)))
    fetch = off._prefetcher.fetch
    off._prefetcher.fetch = lambda entry, trace: events.append(("copy", entry.group)) or fetch(entry, trace)
    # blocks 1 and 2 offloaded (groups 1, 2), brought back as backward reaches groups 5 and 4; the rest kept
    off.set_plan(frozenset({0, 3, 4, 5, 6}), prefetch_from=((2, 5), (1, 4)), inflight_bytes=4096)
    assert off._prefetcher.cues == {4, 5}
    for p in model.parameters():
        p.grad = None
    run(model, off)
    assert off._copies.max_bytes == 1024 + 4096
    assert {g for kind, g in events if kind == "copy"} == {1, 2}
    at = events.index  # first occurrence
    assert at(("backward", 5)) < at(("copy", 2)) < at(("backward", 4))  # group 2 leaves at its cue, 3 layers ahead
    assert at(("backward", 4)) < at(("copy", 1)) < at(("backward", 3))
    assert off.report().offloaded_bytes > 0
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_a_cue_is_the_layer_backward_is_in_not_the_one_owning_the_bytes():
    """Block 4's Linear saves block 3's Tanh output, which group 3 owns and offloads: reading it in layer 4's
    backward must not fire the cue of layer 3 (group 1's copy would start a layer early, on memory the plan gave
    to layer 4)."""
    model = blocks()
    off = ActivationOffloader(torch.device("cpu"), min_offload_bytes=0)
    off.attach(model, model)
    run(model, off)
    events: list[tuple[str, int]] = []
    for g, block in enumerate(model, start=1):
        block.register_full_backward_pre_hook(lambda m, grad, g=g: events.append(("backward", g)))
    fetch = off._prefetcher.fetch
    off._prefetcher.fetch = lambda entry, trace: events.append(("copy", entry.group)) or fetch(entry, trace)
    off.set_plan(frozenset({0, 2, 4, 5, 6}), prefetch_from=((3, 5), (1, 3)))
    run(model, off)
    at = events.index
    assert at(("backward", 5)) < at(("copy", 3)) < at(("backward", 4))
    assert at(("backward", 3)) < at(("copy", 1)) < at(("backward", 2))


def test_without_a_schedule_prefetch_counts_layers():
    prefetcher = Prefetcher(engine=None)
    assert prefetcher.cues == frozenset()
    prefetcher.plan(((3, 7),))
    assert prefetcher.cues == {7}
    prefetcher.plan(())
    assert prefetcher.cues == frozenset()


def test_negative_inflight_bytes_are_refused():
    off = ActivationOffloader(torch.device("cpu"))
    with pytest.raises(ValueError, match="inflight_bytes=-1 must be a byte count"):
        off.set_plan(None, inflight_bytes=-1)


def test_the_plan_line_and_report_name_offloaded_layers_and_copy_times():
    from lightning_vdnn.integrations.lightning_hooks import plan_message
    from lightning_vdnn.report.memory_report import MemoryReport

    planner = AutoPlanner(BUDGET)
    plan = planner.observe(gpt(), FLOOR)
    assert "to the host per step from layers 0-1 (copies 51.2 ms: 51.2 hidden, 0.0 exposed)" in plan_message(plan)
    report = str(MemoryReport(**planner.report_fields(24)))
    assert "offloaded layers       0-1: copies predicted 51.2 ms, 51.2 hidden, 0.0 exposed" in report
    keep_all = AutoPlanner(FLOOR + 24 * 705 * MiB).observe(gpt(), FLOOR)
    assert "from layers" not in plan_message(keep_all)


def test_a_link_plan_that_overshoots_is_made_again_without_the_link_not_with_slack():
    """An overshoot by a plan timed on the copy link is blamed on the link (its copies in flight and ahead), so the
    next plan is the per-layer model's at the full budget; an overshoot by that plan gives back its bytes as before."""
    layers = gpt()
    planner = AutoPlanner(BUDGET)
    assert planner.planned_from() == {}
    linked = planner.observe(layers, FLOOR)
    assert linked.linked and linked.offloaded == (0, 1) and planner.planned_from()["link"]
    again = planner.observe(layers, BUDGET + GiB)  # its first check: over by 1 GiB
    per_layer = solve_layers(layers, FLOOR, BUDGET)
    assert not again.linked and planner.replans == 1
    state = planner.planned_from()  # what benchmarks/replan.py solves again
    assert (state["link"], state["slack"], state["plan"]) == (False, 0, again)
    assert (again.kept, again.recomputed, again.predicted_peak) == (per_layer.kept, per_layer.recomputed,
                                                                   per_layer.predicted_peak)
    assert planner.observe(layers, BUDGET) is None  # fits: kept, and no link plan comes back
    lower = planner.observe(layers, BUDGET + GiB)  # the per-layer plan overshoots: the bytes are given back
    assert not lower.linked and planner.replans == 2 and lower.kept_bytes < again.kept_bytes
    assert lower.predicted_peak <= BUDGET


def test_an_out_of_memory_in_a_link_plan_lowers_the_budget_and_drops_the_link():
    layers = gpt()
    planner = AutoPlanner(BUDGET)
    assert planner.observe(layers, FLOOR).linked
    lowered = planner.lower(fraction=0.25)
    assert not lowered.linked and lowered.predicted_peak <= planner.budget < BUDGET
    assert not planner.planned_from()["link"]
