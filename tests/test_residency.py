"""``resident_blocks="auto"``: the choice from a budget, and training across a switch equal to plain training.

A CPU device has no peak to measure, so these runs plug in a meter that reports a made-up floor plus what the
resident blocks would truly hold (16 bytes per parameter with AdamW), ``scale`` times over: 1 fits the
prediction (which also counts activations, so predicts more), 3 overshoots it and makes the planner back off.
"""

from __future__ import annotations

import functools
from typing import Optional

import lightning as L
import pytest
import torch

from conftest import fit
from lightning_vdnn import VDNNConfig, VDNNStrategy, stream_layers
from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.planning.activation_solver import BudgetTooSmall
from lightning_vdnn.planning.resident_blocks import ResidencyPlanner, block_activations, block_costs, choose
from lightning_vdnn.streaming.block_runs import spread
from test_streaming import STEPS, LM, assert_same_run, l2l, lm, loader, resume

pytestmark = pytest.mark.usefixtures("one_thread")

MiB, GiB = 2**20, 2**30
FLOOR = GiB  # the made-up all-streamed peak
N = GPTConfig.from_name("gpt_tiny").n_layer


@functools.cache  # once: building the model draws from the RNG, which a run's dropout must have to itself
def true_cost() -> int:
    """What one gpt_tiny block holds on the device when resident under AdamW: weights, grads, two moments."""
    return 16 * sum(p.numel() for p in GPT(GPTConfig.from_name("gpt_tiny")).blocks[0].parameters())


class FakeMeter:
    """Peak = ``FLOOR`` + ``scale`` x true cost per resident block; records every reading."""

    def __init__(self, strategy: VDNNStrategy, scale: float = 1.0, floor: int = FLOOR) -> None:
        self.strategy, self.scale, self.floor = strategy, scale, floor
        self.readings: list[int] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def read(self) -> int:
        self.readings.append(self.floor + int(self.scale * true_cost()) * self.strategy._streamer.resident)
        return self.readings[-1]


class Residents(L.Callback):
    """The resident blocks of every training batch."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, *_):
        self.seen.append(trainer.strategy._streamer.resident)


def auto(scale: float = 1.0, budget: int = FLOOR + int(2.5 * true_cost()), **kw) -> VDNNStrategy:
    strategy = l2l(memory_budget=budget, **kw)  # resident_blocks: None, "auto" with a budget
    strategy.peak_meter = FakeMeter(strategy, scale)
    return strategy


# -- the choice ------------------------------------------------------------------------------------------------
def test_choice_is_the_most_leading_blocks_within_budget_and_monotone():
    costs = [30, 10, 20, 25, 5]
    for budget in range(100, 200):
        got = choose(100, costs, budget)
        assert got.predicted_peak <= budget and 0 <= got.resident <= len(costs) - 1
        assert got.predicted_peak == 100 + sum(costs[:got.resident])
        if got.resident < len(costs) - 1:  # one more would not fit
            assert 100 + sum(costs[:got.resident + 1]) > budget
    ks = [choose(100, costs, b).resident for b in range(100, 200)]
    assert ks == sorted(ks) and ks[0] == 0 and ks[-1] == len(costs) - 1  # never all: one block streams
    assert choose(100, [30, 30], 10**9).resident == 1
    assert choose(100, [30, 30, 30], 150, freed=[0, 0, 20]).resident == 2  # buffers no longer needed count


def test_blocks_first_then_the_activations_that_still_fit():
    """Resident blocks are maximised with their activations recomputed, then the leading ones keep theirs as far
    as the budget allows; with activations offloaded (none to keep) every resident block keeps them."""
    got = choose(100, [30] * 5, 200, activations=[10] * 5)
    assert (got.resident, got.kept, got.recompute_from, got.predicted_peak) == (3, 1, 1, 200)
    assert choose(100, [30] * 5, 220, activations=[10] * 5, most=3).kept == 3  # room for all: none recomputes
    assert choose(100, [30] * 5, 200).recompute_from == 3  # activations offloaded: they cost the device nothing
    assert choose(100, [30] * 5, 200, activations=[10] * 5, most=2).resident == 2


def test_overshoot_gives_up_kept_activations_before_blocks():
    planner = ResidencyPlanner(budget=230)
    first = planner.profile(100, [30] * 5, [0] * 5, activations=[10] * 5)
    assert (first.resident, first.kept) == (4, 1)
    lower = planner.verify(235)  # 5 over: the floor rises to 105; four blocks still fit, no activations
    assert (lower.resident, lower.kept) == (4, 0)
    lower = planner.verify(240)  # over again: fewer blocks
    assert lower.resident < 4


def test_streamed_blocks_save_first_then_resident_ones_keep_as_brute_force_orders_them():
    """With ``saving``, the choice is: the most resident blocks, then the most streamed ones saving (spread as
    ``saved_blocks`` spreads them), then the most resident ones keeping; peak and recompute count add up."""
    floor, costs, acts, saves = 100, [30, 20, 30, 25, 30], [12, 9, 11, 10, 12], [7, 9, 6, 8, 5]
    for budget in range(100, 260, 3):
        got = choose(floor, costs, budget, activations=acts, saving=saves)
        k = max(k for k in range(len(costs)) if floor + sum(costs[:k]) <= budget)
        fits = [c for c in range(len(costs) - k + 1)
                if floor + sum(costs[:k]) + sum(saves[k + i] for i in spread(c, len(costs) - k)) <= budget]
        s = max(fits)
        peak = floor + sum(costs[:k]) + sum(saves[k + i] for i in spread(s, len(costs) - k))
        j = max(j for j in range(k + 1) if peak + sum(acts[:j]) <= budget)
        assert (got.resident, got.saving, got.kept) == (k, s, j)
        assert got.predicted_peak == peak + sum(acts[:j]) <= budget
        assert got.recomputing == (k - j) + (len(costs) - k - s)
    assert choose(floor, costs, 200, activations=acts).saving is None  # no ``saving``: the streamer's own


def test_widening_streams_what_the_host_hides_to_keep_what_was_recomputed_and_can_be_given_back():
    """Streaming a block frees its weights and state (30) for activations (8-10 each); a block's host update
    (0.25 s) hides under 75% of the step (1 s) three times over. The widened choice recomputes fewer blocks."""
    planner = ResidencyPlanner(budget=240)
    first = planner.profile(100, [30] * 6, [0] * 6, activations=[10] * 6, saving=[8] * 6)
    assert (first.resident, first.saving, first.kept, first.recomputing) == (4, 2, 0, 4)
    assert planner.widen(1.0, 0.5) is None  # the host hides one block: two stream already
    wide = planner.widen(1.0, 0.25)
    assert (wide.resident, wide.saving, wide.kept, wide.recomputing) == (3, 3, 2, 1)
    assert wide.predicted_peak == 100 + 3 * 30 + 3 * 8 + 2 * 10 <= 240 and planner.before == first
    assert planner.widen(1.0, 0.25) is None  # nothing recomputes fewer within what the host hides
    assert planner.verify(250).resident == 3  # an overshoot keeps the widened block count, holding less
    assert planner.give_back() == first and planner.choice == first and planner.before is None
    planner = ResidencyPlanner(budget=240)
    planner.profile(100, [30] * 6, [0] * 6, activations=[10] * 6)  # streamed blocks keep their own saving
    assert planner.widen(1.0, 0.01) is None


@pytest.mark.parametrize("grads_in_forward, kind, per_parameter", [
    (True, {"fused": True}, 18), (False, {"fused": True}, 16), (False, {"foreach": True}, 20),
    (True, {"foreach": True}, 20), (False, {}, 16)])  # {}: torch's default on a CPU device, per tensor
def test_a_resident_block_costs_its_weights_state_and_its_largest_phase(grads_in_forward, kind, per_parameter):
    """Under bf16 autocast a resident block holds fp32 weights (4 bytes a parameter) and AdamW's two moments (8)
    all step; then the largest of: forward, autocast's bf16 copy (2), beside the last step's gradient (4) unless
    ``integrations/early_grad_free.py`` freed it; the optimizer step, its gradient and, for a multi-tensor kernel (``foreach``, torch's
    default on CUDA), a temporary of its size (4). Keeping its activations adds the copy too, which
    backward then reads."""
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), **kind)
    streamer = stream_layers(model, optimizer, device="cpu", precision="bf16-mixed")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randint(0, model.config.vocab_size, (2, 16))).float().mean().backward()
        optimizer.step()
        streamer.synchronize()
        streamer.saved_bytes = [100] * len(streamer.blocks)
        n = sum(p.numel() for p in model.blocks[0].parameters())
        costs = block_costs(streamer, [optimizer], grads_in_forward)
        assert costs == [per_parameter * n] * len(streamer.blocks)
        assert block_activations(streamer, kept=True) == [100 + 2 * n] * len(streamer.blocks)
        assert block_activations(streamer, kept=False) == [0] * len(streamer.blocks)
    finally:
        streamer.close()


def test_budget_below_the_all_streamed_peak_states_the_minimum():
    with pytest.raises(BudgetTooSmall, match=r"memory_budget=1\.00 GiB is below 2\.00 GiB.*at least 2\.00 GiB"):
        choose(2 * GiB, [MiB], GiB)


def test_overshoot_lowers_the_choice_and_a_fit_keeps_it():
    planner = ResidencyPlanner(budget=200)
    assert planner.profile(100, [30, 30, 30, 30], [0] * 4).resident == 3
    assert planner.verify(190) is None  # within budget (below the prediction, too): kept
    lower = planner.verify(230)  # 40 over the prediction of 190: the floor rises by it, to 140
    assert lower.resident == 2 and lower.predicted_peak == 200
    assert planner.verify(None) is None
    assert planner.verify(260).resident == 0  # 60 over 200: the floor reaches the budget, every block streams
    assert planner.verify(300) is None  # nothing left to lower


# -- training --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [{}, STEPS])  # eager host updates; clipping + accumulation (at the step)
def test_auto_switches_between_steps_and_trains_exactly_as_plain(steps):
    ref, _ = fit(lm(), loader(), max_steps=5, **steps)
    strategy, residents = auto(), Residents()
    got, trainer = fit(lm(), loader(), strategy, max_steps=5, callbacks=[residents], **steps)
    assert_same_run(got, ref)
    per_step, seen = (2 if steps else 1), residents.seen
    k = seen[-1]
    assert 0 < k < N - 1  # strictly between: the budget holds some blocks, not all
    assert seen == [0] * per_step + [k] * (len(seen) - per_step)  # switched once, after the first step
    report = trainer.strategy.memory_report()
    meter = strategy.peak_meter
    assert report.resident_blocks == k and report.resident_budget_bytes == FLOOR + int(2.5 * true_cost())
    assert meter.readings[0] == FLOOR and report.resident_measured_peak_bytes == meter.readings[-1] == (
        FLOOR + k * true_cost())
    assert report.resident_measured_peak_bytes <= report.resident_predicted_peak_bytes <= report.resident_budget_bytes
    assert report.resident_predicted_peak_bytes >= FLOOR + k * true_cost()  # weights, grads, state, activations
    # 2.5 blocks of room: two resident, recomputing their activations; what is left keeps those of one of the
    # two streamed blocks, which saves them instead of recomputing (streamed ones first: no weight copy to hold)
    assert report.resident_recomputed_blocks == 2 and report.saved_blocks == 1
    assert f"{k} on the device, 2 recomputing (auto)" in str(report)
    assert len(meter.readings) == 1 + 3  # the profiling step, then three verifying the choice


class Widen(L.Callback):
    """Turns widening on (a CPU run has no host work beside the device to hide) with a clock under which a
    watched step takes 1 s, 2 s while ``slow`` blocks are resident, and 0.1 s while the activation planner
    profiles (a step not to be timed); records (resident, recompute_from, saving) per batch."""

    def __init__(self, slow: Optional[int] = None) -> None:
        self.slow, self.seen, self.t, self.pending = slow, [], 0.0, 0.0

    def on_train_start(self, trainer, *_):
        residency = trainer.strategy._residency
        residency.widens, residency.steps.clock = True, functools.partial(self.clock, trainer.strategy)

    def clock(self, strategy) -> float:
        """Each call adds the time the call before chose, from the state then: a watched step lasts what its
        start chose."""
        planner = strategy._planner
        self.t += self.pending
        self.pending = (0.1 if planner is not None and planner.plan is None else
                        2.0 if strategy._streamer.resident == self.slow else 1.0)
        return self.t

    def on_train_batch_end(self, trainer, *_):
        streamer = trainer.strategy._streamer
        self.seen.append((streamer.resident, streamer.recompute_from, len(streamer.saving)))


@pytest.mark.parametrize("policy", ["none", "auto"])
@pytest.mark.parametrize("slower", [False, True])
def test_widening_after_the_choice_is_verified_trains_exactly_and_a_slower_one_is_given_back(slower, policy):
    """Once the first choice (2 resident, both recomputing, 1 streamed block saving) has run its three watched
    steps, one more block streams and the room keeps every activation; three watched steps later it stays, or,
    slower, the first choice comes back for good. Training equals plain throughout. Under the activation planner
    the step after each switch profiles it; that step is not timed (it would have made the slow choice look
    fast)."""
    ref, _ = fit(lm(), loader(), max_steps=12)
    widen = Widen(slow=1 if slower else None)
    got, trainer = fit(lm(), loader(), auto(activation_offload=policy, min_offload_bytes=0), max_steps=12,
                       callbacks=[widen])
    assert_same_run(got, ref)
    first, wide = (2, 0, 1), (1, 1, 3)  # resident, the first that recomputes, saving: 3 recompute, then 0
    assert widen.seen == [(0, 0, 0)] + [first] * 3 + ([wide] * 3 + [first] * 5 if slower else [wide] * 8)
    report = trainer.strategy.memory_report()
    assert report.resident_measured_peak_bytes <= report.resident_predicted_peak_bytes <= report.resident_budget_bytes


def test_a_resident_block_that_recomputes_runs_its_forward_again_in_backward():
    """The second resident block (room for the activations of one) runs under activation checkpointing: its
    forward runs twice in each step after the switch, the first block's once, and training equals plain, with
    dropout (the recompute draws the same masks). ``saved_blocks=0`` leaves the room to the resident blocks."""
    ref, _ = fit(lm(dropout=0.1), loader(), max_steps=3)
    calls = [0, 0]

    def make():
        module = lm(dropout=0.1)()
        for i in (0, 1):
            own = module.model.blocks[i].forward

            def counted(*args, i=i, own=own, **kwargs):
                calls[i] += 1
                return own(*args, **kwargs)

            module.model.blocks[i].forward = counted
        return module

    got, _ = fit(make, loader(), auto(saved_blocks=0), max_steps=3)
    assert_same_run(got, ref)
    assert calls == [2 + 1 * 2, 2 + 2 * 2]  # step 1 streams both, which recompute them too; then 1 and 2 a step
    assert [vars(b)["forward"].__name__ for b in got.model.blocks[:2]] == ["counted", "counted"]  # unwrapped


def test_blocks_on_the_device_are_stepped_by_the_ordinary_optimizer_and_the_rest_on_the_host():
    class Check(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            streamer = trainer.strategy._streamer
            optimizer = trainer.optimizers[0]
            hosted = {id(p) for b in streamer.blocks for p in b.params}
            for i, block in enumerate(trainer.lightning_module.model.blocks):
                for p in block.parameters():
                    assert (id(p) in hosted) == (i >= streamer.resident)
                    assert all(v.device.type == "cpu" for v in optimizer.state[p].values())  # CPU: one device
            self.saved = list(streamer.saved_bytes)
            self.measuring = streamer.measure_saved

    check = Check()
    fit(lm(), loader(), auto(), max_steps=2, callbacks=[check])
    assert not check.measuring and all(b is None for b in check.saved)  # measured in the first step only


def test_first_step_measures_each_block_saved_activations():
    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, *_):
            self.saved = list(trainer.strategy._streamer.saved_bytes)

    grab = Grab()
    fit(lm(), loader(), auto(), max_steps=1, callbacks=[grab])
    tokens, width = 4 * 32, GPTConfig.from_name("gpt_tiny").n_embd
    assert all(s > 4 * tokens * width for s in grab.saved)  # more than one activation of the block's width


def test_saved_activations_are_the_whole_batch_s_whatever_the_microbatches():
    """A resident block runs the whole batch: the bytes measured while streaming in k chunks (whose saves reuse
    each other's memory) add up to those of one chunk of the whole batch."""
    class Grab(L.Callback):
        def on_before_optimizer_step(self, trainer, *_):
            self.saved = list(trainer.strategy._streamer.saved_bytes)

    whole, split = Grab(), Grab()
    fit(lm(), loader(), auto(), max_steps=1, callbacks=[whole])
    fit(lm(), loader(), auto(microbatches=4), max_steps=1, callbacks=[split])
    for a, b in zip(whole.saved, split.saved):
        assert 0.9 * a <= b <= 1.1 * a


def test_overshoot_backs_off_to_fewer_resident_blocks_and_stays_exact():
    ref, _ = fit(lm(), loader(), max_steps=6)
    strategy, residents = auto(scale=3.0), Residents()  # each resident block truly costs 3x the plain estimate
    got, _ = fit(lm(), loader(), strategy, max_steps=6, callbacks=[residents])
    assert_same_run(got, ref)
    seen = residents.seen
    k = seen[1]
    assert k > 0 and seen[2] < k and seen[-1] == 0  # FLOOR + 3 x cost exceeds the budget of 2.5 x: back off


def test_budget_below_the_all_streamed_peak_fails_after_the_first_step():
    with pytest.raises(BudgetTooSmall, match=r"below 1\.00 GiB, the peak this step reaches with every block "
                                             r"streamed\. Raise memory_budget to at least 1\.00 GiB"):
        fit(lm(), loader(), auto(budget=FLOOR - MiB), max_steps=3)


def test_checkpoint_after_the_switch_resumes_exactly(tmp_path):
    path = tmp_path / "half.ckpt"

    class Save(L.Callback):  # mid-fit, with blocks on the device, as ModelCheckpoint would
        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step == 4:  # two epochs of two batches: a resumed epoch would start over
                self.resident = trainer.strategy._streamer.resident
                trainer.save_checkpoint(path)

    full, _ = fit(lm(), loader(8), auto(), max_steps=5, gradient_clip_val=1.0)
    save = Save()
    fit(lm(), loader(8), auto(), max_steps=5, gradient_clip_val=1.0, callbacks=[save])
    assert save.resident > 0
    plain = LM.load_from_checkpoint(path)
    assert all(p.device.type == "cpu" for p in plain.parameters())
    ours, theirs = resume(auto(), path, steps=6), resume("auto", path, steps=6)
    assert ours.losses[0] == pytest.approx(full.losses[4], rel=1e-6)
    assert_same_run(ours, theirs)


def test_auto_on_cpu_without_budget_keeps_all_but_one_block():
    """The host is the device: nothing needs to fit, so every block but the one that must stream stays."""
    seen = Residents()
    fit(lm(), loader(), l2l(resident_blocks="auto"), max_steps=3, callbacks=[seen])
    assert seen.seen == [0, N - 1, N - 1]


def test_explicit_count_is_kept_and_a_budget_needs_auto_or_the_planner():
    seen = Residents()
    fit(lm(), loader(), l2l(resident_blocks=1), max_steps=2, callbacks=[seen])
    assert seen.seen == [1, 1]
    with pytest.raises(ValueError, match=r"memory_budget='8GiB' .* or resident_blocks='auto' .* not 2"):
        l2l(resident_blocks=2, memory_budget="8GiB")


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(resident_blocks="lots"), ValueError,
     r"resident_blocks='lots' is not understood; .*'auto' to choose it from memory_budget"),
    (dict(resident_blocks=-1), ValueError, r"resident_blocks=-1 must be >= 0"),
    (dict(resident_blocks=1.5), TypeError, r"resident_blocks=1\.5 must be an int, 'auto' or None"),
    (dict(resident_blocks="auto", layer_streaming=False), ValueError,
     r"resident_blocks='auto' .* Set layer_streaming=True"),
    (dict(resident_blocks="auto", zero_stage=2), NotImplementedError,
     r"resident_blocks='auto' with zero_stage=2.*Give resident_blocks a number of blocks"),
])
def test_bad_resident_blocks_name_the_value_and_the_fix(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        VDNNConfig(activation_offload="none", **{"layer_streaming": True, **kwargs})


def test_entry_points_without_auto_say_so():
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    with pytest.raises(NotImplementedError, match=r"resident_blocks='auto' .* VDNNStrategy.*give resident_blocks"):
        stream_layers(model, device="cpu", resident_blocks="auto")
    assert all("forward" not in b.__dict__ for b in model.blocks)  # refused before anything was streamed


def test_with_the_activation_planner_blocks_come_first_and_training_stays_exact():
    ref, _ = fit(lm(), loader(), max_steps=4)
    strategy, residents = auto(activation_offload="auto", min_offload_bytes=0), Residents()

    class Plans(L.Callback):
        def on_before_backward(self, trainer, *_):  # in the step, after the strategy's batch start
            self.profiling = getattr(self, "profiling", []) + [trainer.strategy._planner.profiling]

    plans = Plans()
    got, trainer = fit(lm(), loader(), strategy, max_steps=4, callbacks=[residents, plans])
    assert_same_run(got, ref)
    assert residents.seen[0] == 0 and residents.seen[-1] > 0
    # the report's peak is the latest watched step's, with the blocks resident, not the all-streamed first one
    meter = strategy.peak_meter
    assert trainer.strategy.memory_report().resident_measured_peak_bytes == meter.readings[-1] > meter.readings[0]
    assert plans.profiling[:3] == [True, True, False]  # profiled again with the blocks on the device


# -- offload_optimizer=True: the modules outside the blocks are stepped on the host too -------------------------
@pytest.mark.parametrize("steps, resident", [({}, 0), (STEPS, 0), ({}, 1), (STEPS, "auto")])
def test_offload_optimizer_steps_the_modules_outside_on_the_host_exactly(steps, resident):
    class Check(L.Callback):
        def on_train_batch_end(self, trainer, module, *_):
            [outside] = trainer.strategy._outside
            optimizer = trainer.optimizers[0]
            names = {id(p): n for n, p in module.named_parameters()}
            assert {names[id(p)] for p in outside.params} >= {"model.wte.weight", "model.ln_f.weight"}
            assert not any(names[id(p)].startswith("model.blocks.") for p in outside.params)
            for p, master in zip(outside.params, outside.masters):
                assert master.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
                torch.testing.assert_close(master, p.detach(), rtol=0, atol=0)  # the device copy is the master's
                if trainer.global_step:  # the user's state, stepped on the host
                    assert outside.sub.state[master] is optimizer.state[p] and optimizer.state[p]
            self.checked = getattr(self, "checked", 0) + 1

    ref, _ = fit(lm(), loader(), max_steps=4, **steps)
    check = Check()
    kw = dict(memory_budget=FLOOR + int(2.5 * true_cost())) if resident == "auto" else dict(resident_blocks=resident)
    strategy = l2l(offload_optimizer=True, **kw)
    strategy.peak_meter = FakeMeter(strategy)
    got, trainer = fit(lm(), loader(), strategy, max_steps=4, callbacks=[check], **steps)
    assert_same_run(got, ref)
    assert check.checked == 4 * (2 if steps else 1) and trainer.strategy._outside == []
    assert got.model.lm_head.weight is got.model.wte.weight


def test_offload_optimizer_resume_refreshes_the_masters_from_the_checkpoint(tmp_path):
    half, trainer = fit(lm(), loader(8), l2l(offload_optimizer=True), max_steps=2, gradient_clip_val=1.0)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    ours, theirs = resume(l2l(offload_optimizer=True), path), resume("auto", path)
    assert_same_run(ours, theirs)


def test_offload_optimizer_takes_a_device_parameter_written_between_steps_as_the_newer_value():
    class Shrink(L.Callback):  # user code writing a parameter outside the blocks, like load_state_dict would
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 2:
                with torch.no_grad():
                    module.model.wte.weight.mul_(0.5)

    ref, _ = fit(lm(), loader(), max_steps=4, callbacks=[Shrink()])
    got, _ = fit(lm(), loader(), l2l(offload_optimizer=True), max_steps=4, callbacks=[Shrink()])
    assert_same_run(got, ref)


def test_offload_params_with_layer_streaming_is_still_refused():
    with pytest.raises(NotImplementedError, match="parameter offload of the non-streamed parameters"):
        l2l(offload_params=True)


def test_teardown_that_fails_still_unwraps_and_closes_the_rest(monkeypatch):
    """A streamer whose close raises (a failed host update surfaces there) still leaves the optimizer's own
    ``step`` and the offloader's hooks taken back, and the error reaches the user."""
    from lightning_vdnn.streaming.streamer import LayerStreamer

    close = LayerStreamer.close

    def failing_close(self, *args, **kwargs):
        close(self, *args, **kwargs)
        raise RuntimeError("host update failed (injected)")

    monkeypatch.setattr(LayerStreamer, "close", failing_close)
    strategy = l2l(activation_offload="all", offload_optimizer=True)
    with pytest.raises(RuntimeError, match="injected"):
        fit(lm(), loader(), strategy, max_steps=2)
    monkeypatch.setattr(LayerStreamer, "close", close)
    optimizer = strategy.lightning_module.trainer.optimizers[0]
    assert strategy._offloader is None and strategy._streamer is None and strategy._outside == []
    for name in ("step", "zero_grad"):  # not our wrappers (torch's profiling hook may leave its own there)
        assert "_wrapped" not in getattr(getattr(optimizer, name), "__qualname__", "")


@pytest.mark.parametrize("fused", [False, True])
def test_state_follows_its_parameter_as_torch_keeps_it(fused):
    """A block switched to the device takes its optimizer state along; ``step`` too where torch's kernel wants
    it beside the parameter (fused: a fused CUDA AdamW refuses a host ``step``). The way back is in
    ``test_gpu_streaming.py`` (a meta tensor has no data to copy back)."""
    from lightning_vdnn.streaming.host_state import state_to_device

    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
    p.grad = torch.ones(4)
    opt.step()
    state_to_device(opt, [p], torch.device("meta"))  # stands in for "cuda": a device other than the host
    devices = {k: v.device.type for k, v in opt.state[p].items()}
    assert devices == {"step": "meta" if fused else "cpu", "exp_avg": "meta", "exp_avg_sq": "meta"}
