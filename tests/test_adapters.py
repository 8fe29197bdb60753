"""The adapters (``integrations/adapters/``) hold every use of another library's private state. These tests check
each private name they rely on, as the library now has it, and fail naming what changed; the version tests
fail on any upgrade, so that someone re-reads the adapter against the new release before bumping
``WRITTEN_AGAINST``. Also the public hooks used instead of patches: the Precision subclass for clipping across
ranks, and RNG/autocast replay through ``torch.utils.checkpoint``'s helpers."""

from __future__ import annotations

import argparse
import inspect

import accelerate
import deepspeed
import lightning
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_vdnn.integrations.adapters import accelerate as acc_adapter
from lightning_vdnn.integrations.adapters import deepspeed as ds_adapter
from lightning_vdnn.integrations.adapters import lightning as pl_adapter
from lightning_vdnn.integrations.adapters import torch as torch_adapter
from lightning_vdnn.integrations.sharded_clipping import ShardedClipping, with_sharded_clipping
from lightning_vdnn.rng import AutocastState, RngState


def _release(version: str) -> str:
    return version.split("+")[0]


@pytest.mark.parametrize("adapter, installed", [
    (pl_adapter, lightning.__version__), (ds_adapter, deepspeed.__version__), (torch_adapter, torch.__version__),
    (acc_adapter, accelerate.__version__)])
def test_adapter_was_written_against_the_installed_release(adapter, installed):
    assert _release(installed) == adapter.WRITTEN_AGAINST, (
        f"{adapter.__name__} was written against {adapter.WRITTEN_AGAINST}, and {_release(installed)} is installed. "
        f"Re-check every private name it uses against the new release (the other tests here name the ones that "
        f"broke), then set WRITTEN_AGAINST = {_release(installed)!r}.")


# -- lightning ---------------------------------------------------------------------------------------------
def _trainer() -> Trainer:
    return Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_lightning_module_files_logs_under_current_fx_name():
    module = LightningModule()
    assert "_current_fx_name" in vars(module), "LightningModule no longer sets _current_fx_name in __init__"
    assert "self._current_fx_name" in inspect.getsource(LightningModule.log), (
        "LightningModule.log no longer reads self._current_fx_name: adapters/lightning.running_hook is void")
    with pl_adapter.running_hook(module, "training_step"):
        assert module._current_fx_name == "training_step"
    assert module._current_fx_name is None


def test_trainer_logging_privates_exist():
    assert isinstance(inspect.getattr_static(_LoggerConnector, "should_update_logs"), property), (
        "_LoggerConnector.should_update_logs is no longer a property")
    trainer = _trainer()
    assert isinstance(pl_adapter.should_update_logs(trainer), bool)
    assert pl_adapter.logging_step(trainer) == 0, "fit_loop.epoch_loop._batches_that_stepped is gone"
    assert pl_adapter.accumulating(trainer) is False, "fit_loop._should_accumulate() is gone or changed"
    source = inspect.getsource(_LoggerConnector.update_train_step_metrics)
    assert "_should_accumulate()" in source and "should_update_logs" in source, (
        "Lightning's step metrics no longer skip accumulating batches, or no longer follow should_update_logs: "
        "report/callbacks.MemoryMonitor logs where they do, and must follow")
    assert hasattr(trainer, "_results"), "Trainer._results (the running loop's _ResultCollection) is gone"


def test_result_metric_keeps_the_state_logged_results_snapshots():
    results = _ResultCollection(training=True)
    results.log("training_step", "loss", torch.tensor(1.0), on_step=True, on_epoch=True, batch_size=1)
    metric = results["training_step.loss"]
    missing = [a for a in pl_adapter.RESULT_METRIC_STATE if not hasattr(metric, a)]
    assert not missing, f"_ResultMetric lost {missing}: LoggedResults would not put them back"
    before = metric.value
    results.log("training_step", "loss", torch.tensor(2.0), on_step=True, on_epoch=True, batch_size=1)
    assert metric.value is not before and before.item() == 1.0, (
        "_ResultMetric.update now writes its state in place: LoggedResults must clone it to snapshot it")


def test_logged_results_restore_what_a_failed_attempt_logged():
    class Holder:
        _results = _ResultCollection(training=True)

    trainer = Holder()
    log = trainer._results.log
    log("training_step", "loss", torch.tensor(1.0), on_step=False, on_epoch=True, batch_size=2)
    expected = trainer._results["training_step.loss"].compute().clone()
    snapshot = pl_adapter.LoggedResults(trainer)
    log("training_step", "loss", torch.tensor(5.0), on_step=False, on_epoch=True, batch_size=2)
    log("training_step", "other", torch.tensor(3.0), on_step=False, on_epoch=True, batch_size=2)
    snapshot.restore()
    assert list(trainer._results) == ["training_step.loss"]
    trainer._results["training_step.loss"]._computed = None
    torch.testing.assert_close(trainer._results["training_step.loss"].compute(), expected)
    pl_adapter.LoggedResults(None).restore()  # outside a Trainer: nothing to put back


@pytest.mark.parametrize("name, params", sorted(pl_adapter.DEEPSPEED_PRIVATE_OVERRIDES.items()))
def test_deepspeed_strategy_private_methods_we_override(name, params):
    method = getattr(DeepSpeedStrategy, name, None)
    assert method is not None, f"DeepSpeedStrategy.{name} is gone: VDNNZeroStrategy overrides it"
    got = tuple(inspect.signature(method).parameters)[1:]
    assert got == params, f"DeepSpeedStrategy.{name}{got} changed from {params}: update VDNNZeroStrategy"


# -- deepspeed ---------------------------------------------------------------------------------------------
def test_lightning_hands_deepspeed_the_device_rank_the_adapter_replaces():
    for name in ("_setup_model_and_optimizer", "_initialize_deepspeed_inference"):
        source = inspect.getsource(getattr(DeepSpeedStrategy, name))
        assert "deepspeed.initialize(" in source and "device_rank=self.root_device.index" in source, (
            f"DeepSpeedStrategy.{name} no longer calls deepspeed.initialize(args=Namespace(device_rank=...)): "
            "adapters/deepspeed.device_rank may be unneeded or void")
    assert "args" in inspect.signature(deepspeed.initialize).parameters
    engine = inspect.getsource(deepspeed.runtime.engine.DeepSpeedEngine._set_distributed_vars)
    assert "args.device_rank" in engine, "DeepSpeedEngine no longer reads args.device_rank"


def test_device_rank_redirects_initialize_for_the_block_only(monkeypatch):
    calls = []

    def initialize(*args, **kwargs):
        calls.append(kwargs)
        return "engine"

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    with ds_adapter.device_rank(3):
        assert deepspeed.initialize(args=argparse.Namespace(device_rank=None), config={}) == "engine"
    assert deepspeed.initialize is initialize
    assert calls[0]["args"].device_rank == 3 and calls[0]["config"] == {}


# -- accelerate --------------------------------------------------------------------------------------------
def test_unwrap_model_peels_a_forward_wrapped_as_accelerate_wraps_it():
    from accelerate.utils import extract_model_from_parallel

    source = inspect.getsource(extract_model_from_parallel)
    assert acc_adapter.ORIGINAL_FORWARD in source and "__wrapped__" in source, (
        f"extract_model_from_parallel no longer follows __wrapped__ back to {acc_adapter.ORIGINAL_FORWARD}")
    model, entered = nn.Linear(2, 2), []

    class Around:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return None

    acc_adapter.wrap_forward(model, Around)
    model(torch.zeros(1, 2))
    assert entered == [True]
    unwrapped = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    unwrapped(torch.zeros(1, 2))
    assert entered == [True], "accelerator.unwrap_model left our forward wrapper on the model"


def test_after_backward_runs_after_accelerators_backward():
    params = list(inspect.signature(accelerate.Accelerator.backward).parameters)
    assert params == ["self", "loss", "kwargs"], f"Accelerator.backward{params} changed: adapters/accelerate"
    calls = []

    class Fake:
        def backward(self, loss, **kwargs):
            calls.append(("backward", loss))

    fake = Fake()
    acc_adapter.after_backward(fake, lambda: calls.append("done"))
    fake.backward(1)
    assert calls == [("backward", 1), "done"]


def test_before_clipping_checks_the_parameters_accelerators_clipping_gets():
    for name, want in (("clip_grad_norm_", ["self", "parameters", "max_norm", "norm_type"]),
                       ("clip_grad_value_", ["self", "parameters", "clip_value"])):
        params = list(inspect.signature(getattr(accelerate.Accelerator, name)).parameters)
        assert params == want, f"Accelerator.{name}{params} changed: adapters/accelerate.before_clipping"
    calls = []

    class Fake:
        def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
            calls.append(("norm", list(parameters), max_norm))

        def clip_grad_value_(self, parameters, clip_value):
            calls.append(("value", list(parameters), clip_value))

    fake, p = Fake(), torch.zeros(1)
    acc_adapter.before_clipping(fake, lambda params, how: calls.append((how, params)))
    fake.clip_grad_norm_(iter([p]), 1.0)  # a generator reaches both as the same list
    fake.clip_grad_value_(p, 0.5)
    assert calls == [("accelerator.clip_grad_norm_", [p]), ("norm", [p], 1.0),
                     ("accelerator.clip_grad_value_", [p]), ("value", [p], 0.5)]


# -- torch -------------------------------------------------------------------------------------------------
def test_autocast_kwargs_as_checkpoint_captures_them():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        device, cpu = torch_adapter.autocast_kwargs("cpu")
    assert cpu == {"enabled": True, "dtype": torch.bfloat16, "cache_enabled": torch.is_autocast_cache_enabled()}
    assert device == cpu
    assert torch_adapter.autocast_kwargs("cpu")[1]["enabled"] is False


def test_the_partitioner_budget_is_functorch_s_setting():
    """``torch._functorch.config.activation_memory_budget``, read and set (what it does to a compiled graph's saves:
    ``tests/test_compiled_budget.py::test_a_lower_budget_makes_a_compiled_block_save_less``)."""
    from torch._functorch import config

    assert hasattr(config, torch_adapter.PARTITIONER_BUDGET), (
        f"torch._functorch.config has no {torch_adapter.PARTITIONER_BUDGET}: the partitioner's budget moved")
    found = torch_adapter.partitioner_budget()
    assert found == 1.0, "torch's default partitioner budget is no longer 1 (its min-cut choice)"
    try:
        torch_adapter.set_partitioner_budget(0.25)
        assert getattr(config, torch_adapter.PARTITIONER_BUDGET) == 0.25 == torch_adapter.partitioner_budget()
    finally:
        torch_adapter.set_partitioner_budget(found)


def test_outside_dispatch_modes_hides_ops_from_the_active_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        torch.ones(2).clone()
        with torch_adapter.outside_dispatch_modes():
            torch.ones(2).add(1)
    assert torch.ops.aten.clone.default in seen.ops and torch.ops.aten.add.Tensor not in seen.ops


def test_ddp_ignore_marks_what_ddp_reads():
    assert "module." + torch_adapter.DDP_IGNORE_LIST in inspect.getsource(DistributedDataParallel.__init__), (
        f"DistributedDataParallel no longer reads module.{torch_adapter.DDP_IGNORE_LIST}")
    module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    torch_adapter.ddp_ignore(module, ["0.weight", "1.running_mean"])
    assert getattr(module, torch_adapter.DDP_IGNORE_LIST) == ["0.weight", "1.running_mean"]
    ignored = [n for n, t in (*module.named_parameters(), *module.named_buffers())
               if getattr(t, torch_adapter.DDP_IGNORED_FLAG, False)]
    assert ignored == ["0.weight", "1.running_mean"]
    torch_adapter.ddp_unignore(module)
    assert not hasattr(module, torch_adapter.DDP_IGNORE_LIST)
    assert not any(hasattr(t, torch_adapter.DDP_IGNORED_FLAG) for t in (*module.parameters(), *module.buffers()))


def test_optimizer_zero_grad_still_has_no_public_hook():
    """``around_zero_grad`` wraps the instance's ``zero_grad`` because torch has no hook for it (it has for
    ``step``: ``streaming/step_hooks.py`` uses those); once torch adds one, use it and drop the wrapper."""
    hooks = [n for n in dir(torch.optim.Optimizer) if n.startswith("register") and "zero_grad" in n]
    assert not hooks, f"torch.optim.Optimizer now has {hooks}: use it instead of adapters.torch.around_zero_grad"
    params = inspect.signature(torch.optim.Optimizer.zero_grad).parameters
    assert list(params) == ["self", "set_to_none"] and params["set_to_none"].default is True, (
        f"Optimizer.zero_grad{inspect.signature(torch.optim.Optimizer.zero_grad)} changed its signature, which "
        "adapters.torch.around_zero_grad repeats")


def test_around_zero_grad_runs_the_override_once_between_the_callbacks():
    calls = []

    class Counting(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(("zero_grad", set_to_none))
            super().zero_grad(set_to_none)

    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    opt = Counting([p], lr=0.1)
    undo = torch_adapter.around_zero_grad(opt, lambda s: calls.append(("before", s)),
                                          lambda s: calls.append(("after", s)))
    opt.zero_grad(set_to_none=False)
    opt.zero_grad()
    assert calls == [("before", False), ("zero_grad", False), ("after", False),
                     ("before", True), ("zero_grad", True), ("after", True)]
    assert p.grad is None
    undo()
    assert "zero_grad" not in opt.__dict__
    opt.zero_grad()
    assert calls[-1] == ("zero_grad", True) and len(calls) == 7


# -- the public hooks used instead -------------------------------------------------------------------------
def test_rng_state_replays_and_rewinds_as_checkpoint_would():
    torch.manual_seed(0)
    state = RngState(torch.device("cpu"))
    first = torch.rand(4)
    after = torch.get_rng_state()
    with state.forked():
        assert torch.equal(torch.rand(4), first)
    assert torch.equal(torch.get_rng_state(), after), "forked() must leave the outer stream where it was"
    state.restore()
    assert torch.equal(torch.rand(4), first)


def test_autocast_state_replays_outside_autocast():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = AutocastState("cpu")
        expected = a @ b
    with state.replay():
        got = a @ b
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert (a @ b).dtype == torch.float32
    with AutocastState("cpu").replay():
        assert (a @ b).dtype == torch.float32


class _Streamer:
    def __init__(self):
        self.calls = []

    def clip_grad_norm_(self, params, max_norm):
        self.calls.append(("norm", len(params), max_norm))

    def clip_grad_value_(self, params, clip_value):
        self.calls.append(("value", len(params), clip_value))


@pytest.mark.parametrize("plugin", [Precision(), MixedPrecision("bf16-mixed", "cpu")])
def test_sharded_clipping_is_the_plugin_with_clipping_overridden(plugin):
    streamer, model = _Streamer(), nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clipping = with_sharded_clipping(plugin, streamer)
    assert isinstance(clipping, type(plugin)) and isinstance(clipping, ShardedClipping)
    assert type(clipping).__qualname__ == type(plugin).__qualname__  # the checkpoint key of its state
    assert vars(plugin).items() <= vars(clipping).items()
    clipping.clip_gradients(optimizer, 0.5, "norm")
    clipping.clip_gradients(optimizer, 2, "value")
    assert streamer.calls == [("norm", 2, 0.5), ("value", 2, 2.0)]
    assert "streamer" not in vars(plugin)
    assert type(with_sharded_clipping(plugin, streamer)) is type(clipping)


def test_strategy_backward_runs_the_precision_plugins_backward_between_its_hooks():
    """Our strategies override no ``backward``: they close the offload pass in ``post_backward`` and retry an
    OOM from the precision plugin's ``backward`` (``integrations/precision_plugins.py``). Both rest on
    ``Strategy.backward`` calling these, in this order, with the loss the plugin's ``pre_backward`` returned."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lightning_vdnn.integrations.precision_plugins import RetriedBackward, extended

    calls, loss = [], torch.ones(())

    class Recording(Precision):
        def pre_backward(self, tensor, module):
            calls.append("plugin.pre_backward")
            return tensor * 2

        def backward(self, tensor, model, optimizer, *args, **kwargs):
            calls.append(("plugin.backward", tensor.item(), args, kwargs))

        def post_backward(self, tensor, module):
            calls.append("plugin.post_backward")
            return tensor

    class Strategy(SingleDeviceStrategy):
        def pre_backward(self, closure_loss):
            calls.append(("pre_backward", closure_loss is loss))

        def post_backward(self, closure_loss):
            calls.append("post_backward")

    def retry(tensor, backward, plugin):
        calls.append("retry")
        backward(tensor)
        return True

    strategy = Strategy(device="cpu", precision_plugin=extended(Recording(), RetriedBackward, retry=retry))
    strategy.connect(LightningModule())
    strategy.backward(loss, None, "arg", key=1)
    assert calls == [("pre_backward", True), "plugin.pre_backward", "retry", ("plugin.backward", 2.0, ("arg",),
                     {"key": 1}), "plugin.post_backward", "post_backward"], (
        "Strategy.backward changed how it calls the strategy's pre/post_backward and the precision plugin: "
        "re-read integrations/lightning_hooks.py (pass bookkeeping) and precision_plugins.py (OOM retry)")


def test_forward_hooks_are_set_aside_and_run_later_as_module_call_runs_them():
    """``streaming/inner_hooks.py`` swaps ``nn.Module``'s forward-hook dicts while a streamed block runs."""
    source = inspect.getsource(nn.Module._call_impl)
    for name in (torch_adapter.FORWARD_HOOKS, torch_adapter.FORWARD_HOOKS_WITH_KWARGS):
        assert f"self.{name}" in source, f"nn.Module._call_impl no longer reads {name}: forward_hooks_set_aside is void"
    layer, seen = nn.Linear(2, 2), []
    ours = lambda m, args, kwargs, out: seen.append(("ours", kwargs))  # noqa: E731
    layer.register_forward_hook(lambda m, args, out: seen.append(("plain", args[0].shape)))
    layer.register_forward_hook(lambda m, args, kwargs, out: seen.append(("kwargs", kwargs)), with_kwargs=True)
    layer.register_forward_hook(ours, with_kwargs=True)
    assert torch_adapter.has_forward_hooks(layer, lambda hook: hook is ours)
    captured = []
    with torch_adapter.forward_hooks_set_aside([layer], lambda *call: captured.append(call),
                                               keep=lambda hook: hook is ours) as kept:
        out = layer(torch.ones(3, 2), )
    assert seen == [("ours", {})] and len(captured) == 1 and captured[0][0] is layer and captured[0][3] is out
    layer(torch.ones(1, 2))  # the hooks are back
    assert seen[1:] == [("plain", (1, 2)), ("kwargs", {}), ("ours", {})]
    torch_adapter.run_forward_hooks(layer, kept[0], (torch.ones(3, 2),), {"x": 1}, out)
    assert seen[4:] == [("plain", (3, 2)), ("kwargs", {"x": 1})]


def test_a_compiled_modules_uncompiled_call_runs_its_hooks_and_forward_eagerly():
    layer, seen = nn.Linear(2, 2), []
    layer.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    layer.compile(backend="eager")
    assert layer._compiled_call_impl is not None, "Module.compile no longer sets _compiled_call_impl"
    out = torch_adapter.uncompiled_call(layer)(torch.ones(3, 2))
    assert seen == [(3, 2)] and torch.equal(out, torch.nn.functional.linear(torch.ones(3, 2), layer.weight, layer.bias))


def test_backward_accumulates_tells_backward_from_autograd_grad():
    """The engine's answer for a leaf's gradient accumulator, asked from inside a backward pass: True where that
    pass fills ``.grad`` (``backward()``, ``inputs`` naming it), False for ``autograd.grad`` and other inputs."""
    anchor, answers = torch.empty(0, requires_grad=True), []

    class Asks(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            answers.append(torch_adapter.backward_accumulates(anchor))
            return None, g * 2

    w, x = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)

    def loss():
        return Asks.apply(anchor, x * w).sum()

    loss().backward()
    torch.autograd.grad(loss(), x)
    loss().backward(inputs=[w])
    torch.autograd.backward([loss()], inputs=[anchor])
    assert answers == [True, False, False, True]
    with pytest.raises(RuntimeError):  # only inside a backward pass
        torch_adapter.backward_accumulates(anchor)
