"""Bad input fails at construction, before any training, with the bad value and the fix in the message."""

from __future__ import annotations

import pytest

from lightning_vdnn import MemoryBudget, VDNNConfig, VDNNStrategy, parse_memory_budget
from lightning_vdnn.layers import resolve_layers


@pytest.mark.parametrize("value, expected", [
    ("8GiB", MemoryBudget(nbytes=8 * 2**30)), ("512 MB", MemoryBudget(nbytes=512 * 10**6)),
    ("60%", MemoryBudget(fraction=0.6)), (1024, MemoryBudget(nbytes=1024)), ("1.5GiB", MemoryBudget(nbytes=3 * 2**29)),
    (None, None),
])
def test_budget_forms(value, expected):
    assert parse_memory_budget(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1GiB", "150%", 0, -5, "0%", "8 parsecs", True, [1]])
def test_bad_budgets_name_the_value(value):
    with pytest.raises(ValueError, match=f"memory_budget={value!r}".replace("[", r"\[").replace("]", r"\]")):
        parse_memory_budget(value)


def test_budget_resolves_against_capacity():
    assert parse_memory_budget("50%").resolve(80) == 40
    assert parse_memory_budget(10).resolve(80) == 10


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(activation_offload="bogus"), ValueError, r"activation_offload='bogus'.*\['none', 'all', 'conv', 'auto'\]"),
    (dict(activation_offload=3), TypeError, "activation_offload=3"),
    (dict(microbatches=0), ValueError, "microbatches=0 must be a positive integer"),
    (dict(microbatches=0, layer_streaming=True), ValueError, "microbatches=0 must be a positive integer"),
    (dict(microbatches=2), ValueError, r"microbatches=2 .* needs layer streaming: use strategy='l2l'"),
    (dict(saved_blocks=2), ValueError, r"saved_blocks=2 .* layer_streaming is off"),
    (dict(saved_blocks=-1, layer_streaming=True), ValueError, r"saved_blocks=-1 must be >= 0"),
    (dict(saved_blocks="2", layer_streaming=True), TypeError, r"saved_blocks='2' must be an int"),
    (dict(saved_blocks=2, layer_streaming=True), ValueError, r"saved_blocks=2 with activation_offload='auto'.* Use a "),
    (dict(saved_blocks=2, layer_streaming=True, activation_offload="all", memory_budget="50%"), ValueError,
     r"budget's plan counts every streamed block as recomputed"),
    (dict(microbatches=2.0, layer_streaming=True), TypeError, "microbatches=2.0 must be an int"),
    (dict(zero_stage=7), ValueError, r"zero_stage=7 is not a ZeRO stage.*\[0, 1, 2, 3\]"),
    (dict(zero_stage="2"), TypeError, "zero_stage='2' must be an int"),
    (dict(prefetch_layers=0), ValueError, "prefetch_layers=0"),
    (dict(min_offload_bytes=-1), ValueError, "min_offload_bytes=-1"),
    (dict(pin_memory="yes"), TypeError, "pin_memory='yes' must be True or False"),
    (dict(layers="model..blocks"), ValueError, "layers='model..blocks' is not a dotted attribute path"),
    (dict(layers=5), TypeError, "layers=5"),
    (dict(memory_budget="lots"), ValueError, "memory_budget='lots'"),
    (dict(fit_report="yes"), TypeError, "fit_report='yes' must be True, False or None"),
    (dict(report_dir=3), TypeError, "report_dir=3 must be a non-empty path or fsspec URL"),
    (dict(report_dir=""), TypeError, "report_dir='' must be a non-empty path"),
    (dict(report_dir="plots", fit_report=False), ValueError, "report_dir='plots' is where fit_report saves its plot"),
])
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        VDNNStrategy(**kwargs)


@pytest.mark.parametrize("kwargs, feature", [
    (dict(zero_stage=2, layer_streaming=True, offload_params=True),
     "offload_params=True with layer_streaming=True and zero_stage=2: the streamed blocks' weights"),
    (dict(offload_params=True, layer_streaming=True), "parameter offload of the non-streamed parameters"),
])
def test_features_not_built_yet_are_refused_not_ignored(kwargs, feature):
    with pytest.raises(NotImplementedError, match=feature):
        VDNNStrategy(**kwargs)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(offload_optimizer=True), r"offload_optimizer=True .* needs zero_stage=1, 2 or 3, not zero_stage=0"),
    (dict(offload_params=True), r"offload_params=True needs zero_stage=3 .* not zero_stage=0"),
    (dict(zero_stage=1, offload_params=True), r"offload_params=True needs zero_stage=3 .* not zero_stage=1"),
])
def test_host_offload_of_model_state_needs_its_zero_stage(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        VDNNConfig(**kwargs)


def test_microbatches_need_layer_streaming():
    assert VDNNStrategy(layer_streaming=True, microbatches=4).config.microbatches == 4
    with pytest.raises(ValueError, match=r"microbatches=4 .* needs layer streaming"):
        VDNNConfig(microbatches=4, zero_stage=2)
    assert VDNNConfig(microbatches=4, layer_streaming=True, zero_stage=2).microbatches == 4  # L2LZeroStrategy


def test_zero_stages_are_valid_config_but_not_for_one_device():
    assert VDNNConfig(zero_stage=1, offload_optimizer=True).offload_optimizer
    assert VDNNConfig(zero_stage=3, offload_params=True, offload_optimizer=True).offload_params
    with pytest.raises(ValueError, match=r"zero_stage=2 needs DeepSpeed.*strategy='vdnn_zero2'"):
        VDNNStrategy(zero_stage=2)


def test_budget_needs_the_planner():
    with pytest.raises(ValueError, match=r"memory_budget='8GiB'.*activation_offload='auto', not 'all'"):
        VDNNStrategy("all", memory_budget="8GiB")
    assert VDNNConfig(memory_budget="8GiB").budget == MemoryBudget(nbytes=8 * 2**30)


def test_auto_runs_all_with_kept_layers():
    assert VDNNConfig(activation_offload="auto").offload_policy == "all"
    assert VDNNConfig(activation_offload="conv").offload_policy == "conv"


def test_config_is_frozen():
    cfg = VDNNConfig()
    with pytest.raises(Exception):
        cfg.activation_offload = "all"  # type: ignore[misc]


def test_layer_detection_and_errors():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()])
            self.head = nn.Linear(4, 2)

    assert resolve_layers(Net(), None)[0] == "blocks"
    with pytest.raises(ValueError, match=r"layers='head' is a Linear.*'blocks' \(3 x Linear\)"):
        resolve_layers(Net(), "head")
    with pytest.raises(ValueError, match=r"different classes \['Linear', 'ReLU'\]"):
        resolve_layers(Net(), "mixed")
    with pytest.raises(ValueError, match="found no nn.ModuleList"):
        resolve_layers(nn.Linear(2, 2), None)

    class Twins(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.b = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    twins = Twins()
    label, blocks = resolve_layers(twins, None)  # equal longest lists (an encoder's, a decoder's): both stream
    assert label == "a, b" and list(blocks) == [*twins.a, *twins.b]
    assert list(resolve_layers(twins, ["b", "a"])[1]) == [*twins.b, *twins.a]
    with pytest.raises(ValueError, match=r"name some blocks twice"):
        resolve_layers(twins, ["a", "a"])

    class Experts(nn.Module):  # an MoE block: its experts' list is part of the block, however long
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(8))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Experts() for _ in range(2))

    assert resolve_layers(MoE(), None)[0] == "layers"
