"""``strategy="vdnn"`` streams the blocks when the model's own state would fill the budget (``planning/when_to_stream.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import fit
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.planning.when_to_stream import STREAM_ABOVE, stream_reason, training_state_bytes
from lightning_vdnn.examples.models import GPT, GPTConfig
from test_residency import FakeMeter
from test_streaming import STEPS, assert_same_run, lm, loader

pytestmark = pytest.mark.usefixtures("one_thread")


def state() -> int:
    """gpt_tiny's estimated training state in fp32 (LM wraps the GPT; its parameters are the GPT's)."""
    return training_state_bytes(GPT(GPTConfig.from_name("gpt_tiny")))


# -- the estimate -------------------------------------------------------------------------------------------------
def test_state_is_weights_grads_and_two_moments_per_trainable_parameter():
    layer = nn.Linear(10, 10)  # 100 + 10 fp32 parameters
    assert training_state_bytes(layer) == 110 * 4 * 4
    assert training_state_bytes(layer, "bf16-mixed") == 110 * 4 * 4 + 110 * 2  # autocast's copies
    layer.bias.requires_grad_(False)  # frozen: its weights only
    assert training_state_bytes(layer) == 100 * 16 + 10 * 4
    tied = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    tied[1].weight = tied[0].weight
    assert training_state_bytes(tied) == 32 * 16  # a shared parameter counts once
    assert training_state_bytes(layer.to(torch.bfloat16)) == 100 * 2 * 4 + 10 * 2


def test_reason_only_when_the_state_fills_the_budget():
    model = GPT(GPTConfig.from_name("gpt_tiny"))
    need = training_state_bytes(model)
    assert stream_reason(model, int(need / STREAM_ABOVE) + 1, "32-true", None) is None
    reason = stream_reason(model, need, "32-true", None)
    assert "streaming its blocks" in reason and "layer_streaming=False" in reason


def test_state_that_cannot_stream_says_why_and_what_to_do():
    with pytest.raises(ValueError, match=r"layers=None: found no nn.ModuleList.*layer_streaming=False"):
        stream_reason(nn.Linear(64, 64), 1000, "32-true", None)
    with pytest.raises(ValueError, match=r"layers='model.nope'"):
        stream_reason(GPT(GPTConfig.from_name("gpt_tiny")), 1000, "32-true", "model.nope")
    with pytest.raises(ValueError, match=r"batch_chunks=4 cannot move them\. Drop batch_chunks"):
        stream_reason(GPT(GPTConfig.from_name("gpt_tiny")), 1000, "32-true", None, batch_chunks=4)


# -- in the Trainer -------------------------------------------------------------------------------------------------
@pytest.fixture
def as_if_on_a_gpu(monkeypatch):
    """The choice is an accelerator's (on a CPU device the weights are in host memory already); these runs make
    the CPU count as one, with a meter that reads no peak (a streamed step's peak is then 0)."""
    monkeypatch.setattr(VDNNStrategy, "_host_is_device", lambda self: False)


def test_vdnn_streams_when_the_state_fills_the_budget_and_trains_exactly(as_if_on_a_gpu, monkeypatch):
    ref, _ = fit(lm(), loader(), max_steps=4, **STEPS)
    strategy = VDNNStrategy(memory_budget=int(0.8 * state()))
    assert strategy.config.layer_streaming is None
    strategy.peak_meter = FakeMeter(strategy, floor=0)  # a CPU device has no peak to read
    said = []
    monkeypatch.setattr("lightning_vdnn.integrations.lightning_strategy.rank_zero_info", said.append)
    got, _ = fit(lm(), loader(), strategy, max_steps=4, **STEPS)
    assert_same_run(got, ref)
    assert strategy.config.layer_streaming is True and strategy.config.resident_blocks == "auto"
    assert "streaming its blocks from host memory" in said[0]  # why, once, before the model moves
    assert len(said) == 2 and said[1].startswith("lightning_vdnn resident_blocks='auto': ")  # the choice made
    report = strategy.memory_report()
    assert report.streamed_h2d_bytes and report.resident_budget_bytes == int(0.8 * state())
    assert 0 < report.resident_blocks < GPTConfig.from_name("gpt_tiny").n_layer  # some came back, within budget


def test_vdnn_keeps_the_blocks_on_the_device_when_the_state_fits(as_if_on_a_gpu):
    strategy = VDNNStrategy(memory_budget=2 * state())
    fit(lm(), loader(), strategy, max_steps=1)
    assert strategy.config.layer_streaming is None and strategy.memory_report().resident_blocks is None


@pytest.mark.parametrize("given", [dict(layer_streaming=False), dict(activation_offload="all")])
def test_streaming_is_only_chosen_by_auto_with_layer_streaming_unset(as_if_on_a_gpu, given):
    if "activation_offload" in given:  # a fixed policy takes no budget: nothing is planned, nothing streams
        strategy = VDNNStrategy(**given)
    else:
        strategy = VDNNStrategy(memory_budget=int(0.8 * state()), **given)
    strategy.peak_meter = FakeMeter(strategy, floor=0)
    fit(lm(), loader(), strategy, max_steps=1)
    assert strategy.config.layer_streaming == given.get("layer_streaming") and (
        strategy.memory_report().resident_blocks is None)


def test_on_a_cpu_device_nothing_streams():
    strategy = VDNNStrategy(memory_budget=int(0.8 * state()), min_offload_bytes=0)
    fit(lm(), loader(), strategy, max_steps=1)
    assert strategy.config.layer_streaming is None and strategy.memory_report().resident_blocks is None


def test_layer_streaming_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match=r"layer_streaming='yes' must be True, False or None"):
        VDNNStrategy(layer_streaming="yes")
