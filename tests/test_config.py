"""Bad input fails at construction, before any training, with the bad value and the fix in the message."""

from __future__ import annotations

from pathlib import Path

import pytest

import lightning_vdnn
import lightning_vdnn.conf
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
    (dict(zero_stage=True), TypeError, "zero_stage=True must be an int"),
    (dict(host_optimizer=3, layer_streaming=True), TypeError,
     r"host_optimizer=3 must be one of \['auto', 'torch', 'deepspeed', 'native'\]"),
    (dict(host_state_dtype="fp8", layer_streaming=True), ValueError,
     r"host_state_dtype='fp8' is not understood; choose one of \['fp32', 'bf16'\] \(fp32: exact"),
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
    assert resolve_layers(Net(), "mixed")[0] == "mixed"  # named: blocks of any classes

    class Longer(Net):  # a longer list of mixed classes, not transformers layers: not taken for the blocks
        def __init__(self):
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()] * 2)

    assert resolve_layers(Longer(), None)[0] == "blocks"
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


# -- one definition: every entry point's arguments, signature and Hydra schema come from VDNNConfig's fields ----
def _entry_points():
    import lightning_vdnn.accelerate
    from lightning_vdnn import L2LZeroStrategy, VDNNFabricStrategy, VDNNZeroStrategy, offload_activations, stream_layers
    from lightning_vdnn.integrations import options

    return {options.VDNN_STRATEGY: VDNNStrategy, options.VDNN_ZERO: VDNNZeroStrategy,
            options.L2L_ZERO: L2LZeroStrategy, options.FABRIC: VDNNFabricStrategy,
            options.ACCELERATE: lightning_vdnn.accelerate.prepare, options.OFFLOAD_ACTIVATIONS: offload_activations,
            options.STREAM_LAYERS: stream_layers}


def test_every_field_declares_its_scope_and_reaches_the_entry_points_of_that_scope():
    """Adding a field is one line in ``VDNNConfig``: its scope puts it in every entry point that takes it."""
    import dataclasses

    from lightning_vdnn.integrations.options import ENTRIES, VDNN_STRATEGY

    scopes = {"common", "offload", "streaming", "chunks", "zero", "report"}
    for f in dataclasses.fields(VDNNConfig):
        assert f.metadata.get("scope") in scopes, f"{f.name}: declare it with option(default, scope)"
        assert [e.name for e in ENTRIES if f.metadata["scope"] in e.scopes and f.name not in e.fixed]
    assert [f.name for f in VDNN_STRATEGY.fields.values()] == [f.name for f in dataclasses.fields(VDNNConfig)]


def test_signatures_are_generated_from_the_fields():
    """``inspect.signature`` (IDEs, ``help``, LightningCLI) shows each option with the default it really has:
    the field's, unless the entry point's table says otherwise."""
    import dataclasses
    import inspect

    defaults = {f.name: f.default for f in dataclasses.fields(VDNNConfig)}
    for entry, call in _entry_points().items():
        params = inspect.signature(call).parameters
        assert not [p for p in params.values() if p.kind == p.VAR_KEYWORD and p.name == "options"]
        for arg, f in entry.fields.items():
            assert params[arg].default == entry.defaults.get(f.name, defaults[f.name]), (entry.name, arg)
        for arg in entry.positional:
            assert params[arg].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert "__new__" not in VDNNStrategy.__dict__  # a class call builds that class; strategy_for picks one


def test_built_with_no_arguments_each_entry_has_the_declared_defaults():
    from lightning_vdnn import L2LZeroStrategy, VDNNFabricStrategy, VDNNZeroStrategy

    assert VDNNStrategy().config == VDNNConfig()
    assert VDNNFabricStrategy().config == VDNNConfig(resident_blocks=0)
    assert VDNNZeroStrategy().vdnn_config == VDNNConfig(zero_stage=2, resident_blocks=0)
    assert L2LZeroStrategy().config == VDNNConfig("none", layer_streaming=True, zero_stage=2, resident_blocks=0)


@pytest.mark.parametrize("call, pattern", [
    (lambda: VDNNStrategy(activation_offlod="all"),
     r"VDNNStrategy\(\) got an unexpected keyword argument 'activation_offlod'; did you mean 'activation_offload'"),
    (lambda: VDNNStrategy(prefetch_layer=2), r"did you mean 'prefetch_layers'\?"),
    (lambda: VDNNStrategy("all", "conv"), r"takes 1 positional option\(s\) \(activation_offload\) but 2 were given"),
    (lambda: VDNNStrategy("all", activation_offload="conv"), r"multiple values for argument 'activation_offload'"),
    (lambda: VDNNStrategy(bogus=1), r"unexpected keyword argument 'bogus'\. It takes: activation_offload, "),
    (lambda: _entry_points_by_name()["VDNNFabricStrategy"](batch_chunks=2),
     r"'batch_chunks': batch_chunks is a VDNNConfig option of VDNNStrategy, which VDNNFabricStrategy does not"),
    (lambda: _entry_points_by_name()["offload_activations"](activation_offload="all"),
     r"offload_activations\(\) got an unexpected keyword argument 'activation_offload'; here it is called 'policy'"),
    (lambda: _entry_points_by_name()["stream_layers"](None, microbatch=2), r"did you mean 'microbatches'\?"),
    (lambda: _entry_points_by_name()["L2LZeroStrategy"](resident_block=1), r"did you mean 'resident_blocks'\?"),
    (lambda: _entry_points_by_name()["VDNNZeroStrategy"](layer_streamin=True), r"did you mean 'layer_streaming'\?"),
])
def test_an_unknown_or_misspelt_option_names_the_close_match(call, pattern):
    with pytest.raises(TypeError, match=pattern):
        call()


def _entry_points_by_name():
    return {e.name: call for e, call in _entry_points().items()}


def test_a_ready_config_with_options_takes_the_options():
    """``config=`` and options together: the options replace the config's values (none is silently ignored)."""
    base = VDNNConfig("all", min_offload_bytes=0)
    assert VDNNStrategy(config=base).config is base
    assert VDNNStrategy("conv", config=base).config == VDNNConfig("conv", min_offload_bytes=0)
    with pytest.raises(ValueError, match=r"prefetch_layers=0 must be a positive integer"):
        VDNNStrategy(config=base, prefetch_layers=0)


def test_strategy_for_picks_the_class_from_the_config():
    from lightning_vdnn import L2LZeroStrategy, VDNNZeroStrategy, strategy_for

    assert type(strategy_for(VDNNConfig("all"))) is VDNNStrategy
    assert type(strategy_for(VDNNConfig(zero_stage=3))) is VDNNZeroStrategy
    streams = strategy_for(VDNNConfig(layer_streaming=True, zero_stage=1), process_group_backend="gloo")
    assert type(streams) is L2LZeroStrategy and streams.config.zero_stage == 1
    with pytest.raises(ValueError, match=r"L2LZeroStrategy \(strategy='l2l_zero'\).*L2LZeroStrategy\(zero_stage=2"):
        VDNNStrategy(layer_streaming=True, zero_stage=2)


# -- Hydra: every strategy file is checked against the schema generated for its class -----------------------
STRATEGY_FILES = sorted(p.stem for p in (Path(lightning_vdnn.conf.__file__).parent / "strategy").glob("*.yaml"))


def compose_strategy(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="lightning_vdnn.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides)).strategy


def test_schemas_are_generated_from_the_options():
    import dataclasses

    from lightning_vdnn.conf.schema import SCHEMAS, strategy_schema

    for name, (entry, target, extras) in SCHEMAS.items():
        schema = strategy_schema(entry, target, extras)
        assert [f.name for f in dataclasses.fields(schema)] == ["_target_", *entry.fields, *extras], name


@pytest.mark.parametrize("name", [n for n in STRATEGY_FILES if n != "plain"])
def test_every_strategy_file_is_typed_and_builds_its_registered_name(name):
    """Each file names its class's schema (so a typo fails at compose, before training), sets only keys the
    schema has, and builds what its registered name builds."""
    from hydra.errors import ConfigCompositionException
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import StrategyRegistry
    from omegaconf import OmegaConf

    from lightning_vdnn.conf.schema import SCHEMAS

    path = Path(lightning_vdnn.conf.__file__).parent / "strategy" / f"{name}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path))
    schema = [s for s, (_, target, _) in SCHEMAS.items() if target == raw["_target_"]]
    assert raw["defaults"] == [schema[0], "_self_"], name
    composed = compose_strategy(f"strategy={name}")
    assert set(raw) - {"defaults"} <= set(composed)
    assert OmegaConf.get_type(composed).__name__ == raw["_target_"].rsplit(".", 1)[1] + "Conf"
    with pytest.raises(ConfigCompositionException, match="layer_strem"):
        compose_strategy(f"strategy={name}", "strategy.layer_strem=true")
    with pytest.raises(ConfigCompositionException, match="min_offload_bytes"):
        compose_strategy(f"strategy={name}", "strategy.min_offload_bytes=lots")
    built = instantiate(composed)
    assert type(built).__name__ == raw["_target_"].rsplit(".", 1)[1]
    assert name in lightning_vdnn.REGISTERED or name in lightning_vdnn.REGISTERED_ZERO or (
        name in lightning_vdnn.REGISTERED_L2L_ZERO)
    registered = StrategyRegistry.get(name)
    assert getattr(built, "vdnn_config", built.config) == getattr(registered, "vdnn_config", registered.config)


def test_plain_strategy_file_is_lightnings_own():
    assert STRATEGY_FILES.count("plain") == 1 and compose_strategy("strategy=plain").name == "auto"
