"""The "auto" planner: exact on synthetic profiles, safe on budgets it cannot meet, and exact in training."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from conftest import assert_same_params, fit, image_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.planner import AutoPlanner, BudgetTooSmall, solve

MiB = 2**20


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
    with pytest.raises(BudgetTooSmall, match=r"below 3\.00 GiB.*at least 3\.00 GiB"):
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
    assert report.predicted_peak_bytes <= budget and report.offloaded_bytes > 0
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
    from lightning_vdnn.offload import ActivationOffloader

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
