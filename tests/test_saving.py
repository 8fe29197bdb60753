"""``saved_blocks="auto"``: the choice from a budget, and training across a change equal to plain training.

A CPU device has no peak to measure, so these runs plug in a meter that reports a made-up floor plus what the
saving blocks truly keep (their saves, measured in the first step's recompute), ``scale`` times over: 1 fits the
prediction, 1.5 overshoots it and makes the choice back off.
"""

from __future__ import annotations

import itertools

import lightning as L
import pytest

from conftest import fit
from lightning_vdnn import VDNNConfig, VDNNStrategy
from lightning_vdnn.integrations.fabric import VDNNFabricStrategy
from lightning_vdnn.planning.activation_solver import BudgetTooSmall
from lightning_vdnn.planning.saving_blocks import choose_saved
from lightning_vdnn.streaming.block_runs import spread
from test_streaming import STEPS, assert_same_run, l2l, lm, loader

pytestmark = pytest.mark.usefixtures("one_thread")

FLOOR = 2**30  # the made-up all-recomputing peak


class FakeMeter:
    """Peak = ``FLOOR`` + ``scale`` x the saves of the blocks saving in the step measured."""

    def __init__(self, strategy: VDNNStrategy, scale: float = 1.0) -> None:
        self.strategy, self.scale = strategy, scale
        self.readings: list[int] = []

    def reset(self) -> None:
        self.saving = self.strategy._streamer.saving

    def read(self) -> int:
        saved = self.strategy._streamer.saved_bytes
        self.readings.append(FLOOR + int(self.scale * sum(saved[i] for i in self.saving)))
        return self.readings[-1]


class Saving(L.Callback):
    """How many streamed blocks saved, batch by batch."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer, *_):
        self.seen.append(len(trainer.strategy._streamer.saving))


def test_choice_is_the_most_spread_blocks_within_budget_and_matches_brute_force():
    sizes = [30, 10, 20, 25, 5, 40]
    for budget in range(100, 100 + sum(sizes) + 1, 7):
        got = choose_saved(100, sizes, budget)
        fits = [s for s in range(len(sizes) + 1) if 100 + sum(sizes[i] for i in spread(s, len(sizes))) <= budget]
        assert got.saved == max(fits) and got.predicted_peak <= budget
        assert got.predicted_peak == 100 + sum(sizes[i] for i in spread(got.saved, len(sizes)))
    assert choose_saved(100, sizes, 10**6, most=2).saved == 2
    assert spread(3, 6) == {1, 3, 5} and spread(6, 6) == set(range(6)) and spread(9, 4) == set(range(4))
    assert all(len(spread(k, 24)) == k for k in range(25))  # distinct indices for every count
    with pytest.raises(BudgetTooSmall, match=r"below 0\.10 GiB, the peak this step reaches with every streamed"):
        choose_saved(int(0.1 * 2**30), sizes, 2**20)


@pytest.mark.parametrize("scale, expected", [(1.0, [0, 0, 2, 2, 2, 2]), (1.5, [0, 0, 2, 2, 1, 1])])  # per batch
def test_auto_saves_what_fits_backs_off_when_over_and_trains_like_plain(scale, expected):
    """The first step recomputes every block and measures their saves; the budget fits 2.5 blocks' worth, so 2
    save from the next step on. A meter reading 1.5x the prediction makes it back off to 1. Either way the run
    is plain training's (5 optimizer steps of 2 batches each, clipping, accumulation)."""
    ref, _ = fit(lm(dropout=0.1), loader(), max_steps=3, **STEPS)
    per_block = _first_step_saves()
    strategy = l2l(saved_blocks="auto", memory_budget=FLOOR + int(2.5 * per_block))
    strategy.peak_meter = FakeMeter(strategy, scale)
    seen = Saving()
    got, trainer = fit(lm(dropout=0.1), loader(), strategy, max_steps=3, callbacks=[seen], **STEPS)
    assert_same_run(got, ref)
    assert seen.seen == expected
    report = trainer.strategy.memory_report()
    assert report.saved_blocks == expected[-1] and report.saved_budget_bytes == FLOOR + int(2.5 * per_block)
    overshoot = int(1.5 * 2 * per_block) - 2 * per_block if scale > 1 else 0  # added to the floor, and kept
    assert report.saved_predicted_peak_bytes == FLOOR + overshoot + expected[-1] * per_block
    assert report.saved_measured_peak_bytes == strategy.peak_meter.readings[-1]
    assert f"saving blocks          {expected[-1]} streamed blocks keep their activations, not recomputed (auto): " \
           "budget" in str(report)
    assert report.metrics()["vdnn/saved_blocks"] == expected[-1]


def _first_step_saves() -> int:
    """What one gpt_tiny block saves over the test batch (all four blocks alike), measured as the choice does."""
    strategy = l2l(saved_blocks="auto", memory_budget=FLOOR * 4)
    strategy.peak_meter = FakeMeter(strategy)
    seen = []

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            seen.append(list(trainer.strategy._streamer.saved_bytes))

    fit(lm(dropout=0.1), loader(), strategy, max_steps=2, callbacks=[Grab()], **STEPS)
    sizes = {b for b in itertools.chain.from_iterable(seen) if b}
    assert len(sizes) == 1, sizes
    return sizes.pop()


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(activation_offload="all"), ValueError, r"saved_blocks='auto' with activation_offload='all'.* needs "
                                                 r"activation_offload='none'"),
    (dict(resident_blocks="auto"), NotImplementedError, r"saved_blocks='auto' with resident_blocks='auto'"),
    (dict(layer_streaming=False), ValueError, r"saved_blocks='auto' .* layer_streaming is off"),
    (dict(saved_blocks="most"), TypeError, r"saved_blocks='most' must be an int .*, 'auto' or None"),
])
def test_bad_auto_combinations_name_the_fix(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        VDNNConfig(**{"activation_offload": "none", "layer_streaming": True, "saved_blocks": "auto", **kwargs})


def test_a_budget_with_auto_saving_does_not_choose_resident_blocks_too():
    config = VDNNStrategy("none", layer_streaming=True, saved_blocks="auto", memory_budget="10GiB").config
    assert not config.auto_resident and config.streamed_saves == 0 and config.fixed_resident == 0


def test_entry_points_without_auto_saving_say_so():
    with pytest.raises(NotImplementedError, match=r"saved_blocks='auto' .* VDNNStrategy.* give saved_blocks a num"):
        VDNNFabricStrategy("none", layer_streaming=True, saved_blocks="auto").setup_module(lm()())
