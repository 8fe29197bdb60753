"""The "auto" planner: exact on synthetic profiles, safe on budgets it cannot meet, and exact in training."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from conftest import assert_same_params, fit, image_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.offload.trace import LayerProfile
from lightning_vdnn.planning.activation_plan import AutoPlanner, Later
from lightning_vdnn.planning.activation_solver import BudgetTooSmall, predicted_peak, solve, solve_layers

MiB = 2**20
KEEP, OFFLOAD, RECOMPUTE = 0, 1, 2


def brute_force(sizes, floor, budget):
    best = None
    for r in range(len(sizes) + 1):
        for kept in itertools.combinations(range(len(sizes)), r):
            kept_bytes = sum(sizes[g] for g in kept)
            if floor + kept_bytes <= budget and (best is None or kept_bytes > best):
                best = kept_bytes
    return sum(sizes) - best


@pytest.mark.parametrize("seed", range(25))
def test_solver_matches_brute_force_and_fits(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 10)
    sizes = [rng.randint(0, 64) * MiB for _ in range(n)]
    floor = rng.randint(1, 100) * MiB
    budget = floor + rng.randint(0, sum(sizes) + MiB) // MiB * MiB
    plan = solve(sizes, floor, budget)
    assert plan.predicted_peak <= budget
    assert plan.offloaded_bytes == brute_force(sizes, floor, budget)
    assert plan.kept_bytes + plan.offloaded_bytes == sum(sizes)


def test_everything_fits_moves_nothing_and_ties_prefer_the_tail():
    assert solve([5 * MiB] * 4, 0, 100 * MiB).offloaded_bytes == 0
    plan = solve([8 * MiB] * 4, 0, 17 * MiB)  # room for two of four equal layers
    assert plan.kept == frozenset({2, 3})


def test_budget_below_floor_states_the_minimum():
    with pytest.raises(BudgetTooSmall,
                       match=r"below 3\.00 GiB.*at least 3\.00 GiB.*batch_chunks=4, chunk_layers=.*"
                             r"strategy='l2l' with this memory_budget"):
        solve([MiB], 3 * 2**30, 2**30)


def test_planner_profiles_plans_verifies_and_replans():
    p = AutoPlanner(budget=100 * MiB)
    assert p.profiling and p.keep is None and p.watching
    plan = p.observe([40 * MiB, 40 * MiB, 30 * MiB], peak=20 * MiB)
    assert plan.kept == frozenset({0, 1}) and plan.predicted_peak == 100 * MiB
    assert p.observe([40 * MiB, 40 * MiB, 30 * MiB], peak=97 * MiB) is None  # verified
    replan = p.observe([40 * MiB, 40 * MiB, 30 * MiB], peak=120 * MiB)  # overshoot by 30 MiB
    assert replan.predicted_peak <= 100 * MiB and replan.kept_bytes < plan.kept_bytes
    p.observe([41 * MiB, 40 * MiB, 30 * MiB], peak=None)  # a new shape: profile again, safely
    assert p.profiling and p.keep is None


def test_an_overshoot_the_model_cannot_place_falls_back_to_the_profiled_plan():
    """The same plan made again after an overshoot (what overshot is outside the model, here beside two layers
    that save nothing): the next steps run the profiling step's plan, which was measured to fit, rather than
    overshoot every step."""
    layers = [0, 40 * MiB, 0]
    p = AutoPlanner(budget=100 * MiB)
    assert p.observe(layers, peak=20 * MiB).kept == frozenset({0, 1, 2})
    second = p.observe(layers, peak=101 * MiB)  # the raised floor leaves no room for the 40 MiB layer
    assert second.kept == frozenset({0, 2}) and second.predicted_peak <= 100 * MiB
    third = p.observe(layers, peak=101 * MiB)  # overshoots again and the model would make the same plan
    assert third.kept == frozenset() and not third.recomputed and third.predicted_peak == 20 * MiB
    assert p.observe(layers, peak=20 * MiB) is None  # it fits: kept


def test_an_overcounted_forward_peak_solved_lower_keeps_more():
    """``benchmarks/replan.py --overcount``: the profiled forward peak lowered by that much, as if the profile had
    counted it twice; the plan keeps more within the same budget."""
    from lightning_vdnn.planning.activation_plan import solve_planned

    layers = [LayerProfile(100 * MiB, 10 * MiB, forward_ms=1.0, transfer_ms=10.0)] * 10
    budget = 900 * MiB + 450 * MiB
    as_profiled = solve_planned(layers, 1000 * MiB, budget, MiB, forward_peak=900 * MiB)
    lowered = solve_planned(layers, 1000 * MiB, budget, MiB, forward_peak=900 * MiB - 200 * MiB)
    assert lowered.kept_bytes >= as_profiled.kept_bytes + 100 * MiB and lowered.added_ms < as_profiled.added_ms
    assert lowered.predicted_peak <= budget


def test_lower_gives_up_a_share_of_the_kept_bytes_and_stops_at_the_floor():
    """After an OOM: budget = min(predicted, allocated at failure) - fraction * kept, never below the floor."""
    p = AutoPlanner(budget=100 * MiB)
    plan = p.observe([40 * MiB, 40 * MiB, 30 * MiB], peak=20 * MiB)
    assert plan.kept_bytes == 80 * MiB
    lowered = p.lower(fraction=0.25)  # 100 - 20: room for one 40 and nothing else
    assert p.budget == 80 * MiB and lowered.kept_bytes == 40 * MiB and lowered.predicted_peak <= p.budget
    assert p.watching  # the new plan is verified like any other
    nothing = p.lower(failed_at=45 * MiB, fraction=0.5)  # the device gave out below the prediction: start there
    assert p.budget == 25 * MiB and nothing.kept_bytes == 0
    assert p.lower() is None  # keeping nothing already: nothing left to lower

    q = AutoPlanner(budget=150 * MiB)  # forward peaks well below the all-offloaded floor
    assert q.observe([30 * MiB] * 3, peak=100 * MiB, forward_peak=60 * MiB).kept_bytes == 90 * MiB
    assert q.lower(fraction=0.5).kept_bytes == 30 * MiB and q.budget == 105 * MiB
    floor = q.lower(fraction=0.5)  # 100 - 15 MiB is below the floor: the floor, keeping nothing (as profiled)
    assert q.budget == 100 * MiB and floor.kept == frozenset() and floor.predicted_peak == 100 * MiB
    assert AutoPlanner(budget=MiB).lower() is None  # no plan yet (profiling)


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_auto_with_budget_trains_like_plain(cnn, fraction):
    """On a CPU device the budget bounds the saved activations kept in place: half of them, or none."""
    _, probe = fit(cnn, image_loader(), VDNNStrategy("all", min_offload_bytes=0))
    total = probe.strategy.memory_report().offloaded_bytes
    budget = max(int(total * fraction), 1)
    ref, _ = fit(cnn, image_loader(), max_steps=4)
    got, trainer = fit(cnn, image_loader(), VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget),
                       max_steps=4)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)
    report = trainer.strategy.memory_report()
    assert report.policy == "auto" and report.budget_bytes == budget
    assert report.predicted_peak_bytes <= budget
    # what did not fit was moved or rebuilt: which of the two the plan picks depends on the measured times
    assert report.offloaded_bytes > 0 or report.layers_recomputed > 0
    if fraction:
        assert report.layers_kept > 0 and report.kept_bytes > 0  # both paths ran
        assert report.offloaded_bytes < total


def test_auto_on_cpu_without_budget_keeps_everything(cnn):
    _, trainer = fit(cnn, image_loader(), VDNNStrategy("auto", min_offload_bytes=0), max_steps=3)
    report = trainer.strategy.memory_report()
    assert report.offloaded_bytes == 0 and report.layers_offloaded == 0 and report.kept_bytes > 0


def test_forward_peak_model_keeps_what_backward_frees_in_time():
    """Kept activations are all alive when forward ends: with room above the forward peak, more fits."""
    sizes = [30 * MiB, 30 * MiB, 30 * MiB]
    cautious = solve(sizes, floor=100 * MiB, budget=150 * MiB)
    informed = solve(sizes, floor=100 * MiB, budget=150 * MiB, forward_peak=60 * MiB)
    assert cautious.kept_bytes == 30 * MiB and informed.kept_bytes == 90 * MiB
    assert informed.predicted_peak == 150 * MiB
    p = AutoPlanner(budget=150 * MiB)
    assert p.observe(sizes, peak=100 * MiB, forward_peak=60 * MiB).kept_bytes == 90 * MiB


def test_first_save_decides_for_a_tensor_saved_by_two_layers():
    """A ReLU output is saved by the ReLU and by the next Linear: if the plan keeps the ReLU's layer, the
    Linear's save must not move it anyway (else the plan's bytes move regardless)."""
    from lightning_vdnn.offload.offloader import ActivationOffloader

    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    x = torch.randn(64, 256, requires_grad=True)

    def one_pass(keep):
        off = ActivationOffloader(torch.device("cpu"), "all", min_offload_bytes=0)
        off.attach(net)
        off.keep_layers = keep
        with off.capture():
            net(x).sum().backward()
        off.finish_pass()
        return off

    profile = one_pass(None).layer_bytes()
    keep_norm = frozenset({max(g for g, b in enumerate(profile) if b)})  # the ReLU's layer
    report = one_pass(keep_norm).report()
    assert report.kept_bytes == sum(profile[g] for g in keep_norm) and report.kept_bytes > 0
    assert report.offloaded_bytes == sum(profile) - report.kept_bytes


# -- keep, offload or recompute ------------------------------------------------------------------------------------
def brute_force_3(layers, floor, budget, base):
    """Least added time over all 3^n plans whose peak fits, written out independently of the solver: keep holds b;
    offload costs max(0, t - w) + max(0, t - 2w); recompute costs f, holds r, and rebuilds b - r in its backward,
    on top of what the layers up to it hold."""
    n = len(layers)
    plans = np.array(list(itertools.product((KEEP, OFFLOAD, RECOMPUTE), repeat=n)), dtype=np.int64).reshape(-1, n)
    b = np.array([p.saved_bytes for p in layers])
    r = np.array([p.recompute_bytes if p.recompute_bytes is not None else -1 for p in layers])
    f = np.array([p.forward_ms for p in layers])
    off = np.array([max(0, p.transfer_ms - p.overlap_ms) + max(0, p.transfer_ms - 2 * p.overlap_ms) for p in layers])
    allowed = ~((plans == RECOMPUTE) & (r < 0)).any(axis=1)
    held = np.where(plans == KEEP, b, np.where(plans == RECOMPUTE, r, 0))
    prefix = held.cumsum(axis=1)
    rebuilt = np.where(plans == RECOMPUTE, prefix + np.maximum(b - r, 0), 0)
    peak = np.maximum(floor, base + np.maximum(prefix[:, -1], rebuilt.max(axis=1)))
    cost = np.where(plans == OFFLOAD, off, 0).sum(axis=1) + np.where(plans == RECOMPUTE, f, 0).sum(axis=1)
    fits = allowed & (peak <= budget)
    return cost[fits].min(), peak[fits].min()


def random_layers(rng: random.Random, n: int) -> list[LayerProfile]:
    layers = []
    for g in range(n):
        saved = rng.randint(0, 64) * MiB
        redo = None if g == 0 or rng.random() < 0.2 else rng.randint(0, max(1, saved // MiB // 2)) * MiB
        layers.append(LayerProfile(saved, redo, forward_ms=round(rng.uniform(0, 4), 3),
                                   transfer_ms=round(rng.uniform(0, 4), 3),
                                   overlap_ms=rng.choice([0.0, round(rng.uniform(0, 3), 3)])))
    return layers


@pytest.mark.parametrize("seed", range(25))
def test_three_choice_solver_matches_brute_force_and_fits(seed):
    rng = random.Random(1000 + seed)
    n = 10 if seed % 3 == 0 else rng.randint(1, 10)
    layers = random_layers(rng, n)
    floor = rng.randint(1, 100) * MiB
    forward_peak = rng.choice([None, rng.randint(0, 100) * MiB])
    base = floor if forward_peak is None else min(forward_peak, floor)
    budget = floor + rng.randint(0, sum(p.saved_bytes for p in layers) // MiB) * MiB
    plan = solve_layers(layers, floor, budget, forward_peak=forward_peak)
    best, least_peak = brute_force_3(layers, floor, budget, base)
    assert plan.predicted_peak <= budget and least_peak == floor  # offloading everything always fits
    assert plan.added_ms == pytest.approx(best, abs=1e-9)
    assert not plan.kept & plan.recomputed and all(layers[g].recompute_bytes is not None for g in plan.recomputed)
    assert plan.predicted_peak == predicted_peak(layers, plan.kept, plan.recomputed, floor, base)
    assert plan.kept_bytes + plan.offloaded_bytes + plan.recomputed_bytes == sum(p.saved_bytes for p in layers)


def test_recompute_when_cheaper_than_copies_and_the_rebuild_fits():
    """100 MiB layers that keep 10 MiB (their inputs) when recomputed; copies cost 5 ms exposed, a recompute 1 ms."""
    layer = LayerProfile(100 * MiB, 10 * MiB, forward_ms=1.0, transfer_ms=2.5)
    plan = solve_layers([layer, layer], floor=0, budget=120 * MiB)  # one kept; the other's rebuild fits under it
    assert plan.recomputed == {0} and plan.kept == {1} and plan.added_ms == 1.0
    assert plan.predicted_peak == 110 * MiB and plan.decision(0) == "recompute" and plan.on_device == {0, 1}
    assert plan.kept_bytes == 110 * MiB and plan.recomputed_bytes == 90 * MiB and plan.offloaded_bytes == 0
    # both recomputed hold only 20 MiB, but the second one's backward rebuilds 90 on top: 110 > 109
    tight = solve_layers([layer, layer], floor=0, budget=109 * MiB)
    assert tight.recomputed == frozenset() and tight.kept == {1} and tight.added_ms == 5.0
    hidden = LayerProfile(100 * MiB, 10 * MiB, forward_ms=1.0, transfer_ms=2.5, overlap_ms=2.5)
    free = solve_layers([hidden, hidden], floor=0, budget=109 * MiB)  # copies hide under the neighbour's compute
    assert free.recomputed == frozenset() and free.added_ms == 0.0 and free.kept == {1}  # equal time: keep more


def test_keeping_everything_that_fits_costs_nothing():
    layers = [LayerProfile(10 * MiB, MiB, forward_ms=1.0, transfer_ms=1.0)] * 3
    plan = solve_layers(layers, floor=5 * MiB, budget=35 * MiB)
    assert plan.kept == {0, 1, 2} and plan.added_ms == 0 and plan.predicted_peak == 35 * MiB


def test_profiled_budget_below_floor_states_the_minimum():
    layers = [LayerProfile(MiB, 0, forward_ms=1.0)] * 2
    with pytest.raises(BudgetTooSmall, match=r"memory_budget=1\.00 GiB is below 2\.50 GiB.*at least 2\.50 GiB"):
        solve_layers(layers, floor=int(2.5 * 2**30), budget=2**30)


@pytest.mark.parametrize("field, value", [("saved_bytes", -1), ("recompute_bytes", -5), ("forward_ms", -1.0),
                                          ("transfer_ms", float("nan")), ("overlap_ms", float("inf"))])
def test_bad_profiles_name_the_value(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        LayerProfile(**{"saved_bytes": MiB, field: value})
    with pytest.raises(ValueError, match="granule=0"):
        solve_layers([LayerProfile(MiB)], 0, MiB, granule=0)


def test_planner_replans_on_new_input_shapes_not_on_what_recompute_saves():
    shape = ((8, 64),)
    profile = [LayerProfile(MiB), LayerProfile(100 * MiB, MiB, 1.0, 5.0, inputs=shape),
               LayerProfile(100 * MiB, None, 1.0, 5.0, inputs=shape)]
    p = AutoPlanner(budget=110 * MiB)
    plan = p.observe(profile, peak=0)  # the last layer kept, the middle one recomputed under it
    assert plan.recomputed == {1} and plan.kept == {0, 2} and p.keep == {0, 1, 2} and p.recomputed == {1}
    ran = [profile[0], LayerProfile(MiB, inputs=shape), profile[2]]  # the recomputed layer saved its input alone
    assert p.observe(ran, peak=102 * MiB) is None and p.plan is plan
    short = ((4, 64),)  # an epoch's short last batch
    p.observe([profile[0], LayerProfile(MiB, inputs=short), LayerProfile(50 * MiB, inputs=short)], peak=None)
    assert p.profiling and p.keep is None and p.recomputed == frozenset()
    q = AutoPlanner(budget=110 * MiB, recompute=False)  # layer streaming, ZeRO: keep or offload only
    assert q.observe(profile, peak=0).recomputed == frozenset()


def test_the_floor_gains_what_later_steps_hold_that_the_profiling_step_did_not():
    """The optimizer state the first step creates is held through every later forward and backward (and the
    gradients through forward): the floor rises by it, unless the optimizer step's own peak, which had it
    already, is higher."""
    layers = [10 * MiB, 10 * MiB]
    p = AutoPlanner(budget=100 * MiB)
    plan = p.observe(layers, peak=50 * MiB, forward_peak=30 * MiB,
                     later=Later(state=20 * MiB, grads=5 * MiB, backward_peak=45 * MiB))
    assert plan.predicted_peak >= 65 * MiB and p._forward_peak == 55 * MiB
    p = AutoPlanner(budget=100 * MiB)  # the optimizer step peaked: it had the state, forward and backward gain it
    assert p.observe(layers, peak=80 * MiB, later=Later(state=20 * MiB, backward_peak=45 * MiB)) is not None
    assert p._floor == 80 * MiB
    p = AutoPlanner(budget=100 * MiB)  # not measured: the profiled peak as it was
    p.observe(layers, peak=50 * MiB, later=Later(state=20 * MiB))
    assert p._floor == 50 * MiB


def test_layer_times_leave_out_waits_for_the_in_flight_cap():
    """A layer's profiled forward time is its compute: a wait of compute for copies in flight (PCIe's time) is
    left out of the layer it stalled (inside the module or after it) and of the compute a copy can hide under."""
    import time

    from lightning_vdnn.offload.host_pool import CopyEngine
    from lightning_vdnn.offload.trace import PassTimeline

    eng = CopyEngine(torch.device("cpu"))
    tl = PassTimeline(eng)

    def stall(ms: float) -> None:
        start = eng.record()
        time.sleep(ms / 1e3)
        tl.stalled(start, eng.record())

    tl.layer(1)
    time.sleep(0.02)
    stall(60)  # inside layer 1's module
    tl.layer_return(1)
    stall(40)  # after its module returned, before layer 2
    tl.layer(2)
    time.sleep(0.02)
    tl.layer_return(2)
    tl.end_forward()
    spans, compute, module = tl.forward_ms(), tl.compute_ms(), tl.module_ms()
    assert spans[1] >= 120 and compute[1] < 60 and module[1] < 50  # 20 ms of its own, 100 ms of waits
    assert abs(compute[2] - spans[2]) < 1e-6 and 15 <= module[2] < 50  # nothing stalled layer 2


def test_warmup_passes_are_profiled_and_planned_from_with_their_least_times():
    """On a GPU the first step also times library set-up and the pinning of the host pool (run 9: gpt_1b's
    layers took 0.6-2 s in its first step, 3-4 ms in its second): the planner waits one more pass, takes each
    layer's least time over the passes, and takes bytes and peaks from the last, which already held the optimizer
    state (``Later`` is not added again)."""
    first = [LayerProfile(40 * MiB, 4 * MiB, forward_ms=900.0, transfer_ms=3.0, overlap_ms=900.0, inputs=((8, 4),)),
             LayerProfile(40 * MiB, 4 * MiB, forward_ms=1.0, transfer_ms=9.0, overlap_ms=2.0, inputs=((8, 4),))]
    second = [LayerProfile(40 * MiB, 4 * MiB, forward_ms=1.0, transfer_ms=4.0, overlap_ms=1.0, inputs=((8, 4),)),
              LayerProfile(40 * MiB, 4 * MiB, forward_ms=2.0, transfer_ms=8.0, overlap_ms=0.5, inputs=((8, 4),))]
    p = AutoPlanner(budget=100 * MiB, warmup=1)
    assert p.observe(first, peak=90 * MiB, later=Later(state=30 * MiB, backward_peak=80 * MiB)) is None
    assert p.profiling and p.keep is None and p.watching
    plan = p.observe(second, peak=50 * MiB, later=Later(state=0, grads=30 * MiB, backward_peak=45 * MiB))
    assert plan is not None and p._floor == 50 * MiB
    assert [(q.forward_ms, q.transfer_ms, q.overlap_ms) for q in p._layers] == [(1.0, 3.0, 1.0), (1.0, 8.0, 0.5)]
    # set up like this, a first-pass profile alone would have hidden layer 0's copy under 900 ms and never
    # recomputed it; with the least times its copy (3 ms, 1 ms hidden) costs more than its recompute (1 ms)
    assert 0 in plan.recomputed or 0 in plan.kept
    p.observe([LayerProfile(40 * MiB, 4 * MiB, inputs=((2, 4),))] * 2, peak=None)  # new shapes: no warm-up again
    assert p.profiling
    assert p.observe([LayerProfile(40 * MiB, 4 * MiB, inputs=((2, 4),))] * 2, peak=20 * MiB) is not None


def test_bad_warmup_names_the_value():
    with pytest.raises(ValueError, match=r"warmup=-1 .*>= 0"):
        AutoPlanner(budget=100 * MiB, warmup=-1)


def test_a_planner_for_the_host_plans_from_its_first_pass():
    """Warm-up is for a GPU's first step (library set-up, pinning); on the host the first pass is the profile."""
    from lightning_vdnn.config import parse_memory_budget
    from lightning_vdnn.units import UNBOUNDED

    p = AutoPlanner.for_device(None, torch.device("cpu"), recompute=False)
    assert (p.warmup, p.budget, p.recompute) == (0, UNBOUNDED, False)
    assert AutoPlanner.for_device(parse_memory_budget("1GiB"), torch.device("cpu")).budget == 2**30
