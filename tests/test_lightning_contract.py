"""Lightning's contract as its own tests see it: with our strategies swapped in, a fit calls the same hooks in the
same order, calls the optimizer's ``zero_grad`` as often, logs at the same steps and leaves the same files as
plain Lightning on the same seed. Results are checked elsewhere; these are the side effects Lightning's trainer,
loop, logging and checkpointing tests assert on (issue 21, item 7)."""

from __future__ import annotations

import functools
from copy import deepcopy
import uuid
from unittest import mock

import fsspec
import lightning as L
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import Logger

from conftest import Classifier, ResidualCNN, TokenLM, fit, image_loader, token_loader
from lightning_vdnn import MemoryMonitor
from lightning_vdnn.report.end_of_fit import TIMELINE_FILE

#: strategy name -> (module, loader): ``l2l`` streams blocks, so it trains the GPT; the others the CNN.
CASES = {
    "vdnn_all": (lambda: Classifier(ResidualCNN()), image_loader),
    "vdnn": (lambda: Classifier(ResidualCNN()), image_loader),
    "l2l": (TokenLM, token_loader),
}
STRATEGIES = list(CASES)
#: LightningModule hooks a fit calls (Lightning's ``tests_pytorch/models/test_hooks.py`` records these too).
MODULE_HOOKS = (
    "setup", "configure_optimizers", "on_fit_start", "on_train_start", "on_train_epoch_start",
    "on_train_batch_start", "on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer",
    "training_step", "on_before_backward", "backward", "on_after_backward", "on_before_optimizer_step",
    "configure_gradient_clipping", "optimizer_step", "optimizer_zero_grad", "on_before_zero_grad",
    "on_train_batch_end", "on_train_epoch_end", "on_save_checkpoint", "on_train_end", "on_fit_end", "teardown",
)
CALLBACK_HOOKS = tuple(sorted(n for n in vars(L.Callback) if n.startswith("on_"))) + ("setup", "teardown")


def recorded(module: L.LightningModule, calls: list[str], optimizer: type = torch.optim.SGD,
             log: bool = False) -> L.LightningModule:
    """``module`` with every hook in :data:`MODULE_HOOKS` appending its name to ``calls``. The wrappers keep
    ``__wrapped__``, so Lightning's ``is_overridden`` (and ours, ``integrations/early_grad_free.py``) sees the module's own overrides
    only. ``training_step`` also notes whether last step's gradients are still held, and with ``log`` logs
    its loss; the optimizer is ``optimizer`` (SGD), whatever the module configures."""
    module.held = []

    def wrap(name: str, original):
        @functools.wraps(original)
        def hook(*args, **kwargs):
            calls.append(name)
            if name == "training_step":
                module.held.append(any(p.grad is not None for p in module.parameters()))
            out = original(*args, **kwargs)
            if name == "training_step" and log:
                module.log("loss", out)
            return out
        return hook

    module.configure_optimizers = functools.wraps(module.configure_optimizers)(
        lambda: optimizer(module.parameters(), lr=0.01, momentum=0.9))
    for name in MODULE_HOOKS:
        setattr(module, name, wrap(name, getattr(module, name)))
    return module


def recorder(calls: list[str], skip: tuple[str, ...] = ()) -> L.Callback:
    """A callback overriding every ``Callback`` hook but ``skip``, each appending ``callback.<hook>``."""
    def hook(name: str):
        def record(self, *args, **kwargs):
            calls.append(f"callback.{name}")
        return record
    return type("Recorder", (L.Callback,), {n: hook(n) for n in CALLBACK_HOOKS if n not in skip})()


def counting(calls: list[str]) -> type:
    """An SGD subclass whose ``zero_grad`` override appends ``optimizer.zero_grad``."""
    class CountingSGD(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append("optimizer.zero_grad")
            super().zero_grad(set_to_none)
    return CountingSGD


def run(name: str, strategy: str, module_calls: list[str], optimizer: type = torch.optim.SGD, log: bool = False,
        max_steps: int = 4, **trainer_kwargs):
    make, loader = CASES[name]
    return fit(lambda: recorded(make(), module_calls, optimizer, log), loader(), strategy, max_steps=max_steps,
               **trainer_kwargs)


@pytest.mark.parametrize("name", ["vdnn_all", "vdnn"])  # l2l refuses optimizer subclasses (streaming.py)
def test_every_hook_and_zero_grad_in_plain_lightnings_order(name, tmp_path):
    """All module and callback hooks (``on_before_zero_grad`` included: the gradients are then held as plain
    holds them), with an optimizer subclass that counts its ``zero_grad``: the early gradient free must not
    call it, nor free behind a ``zero_grad`` it cannot see into. (Layer streaming steps each block with its
    own copy of the optimizer, so it takes only torch's classes: the next test covers it.)"""
    calls = {}
    for strategy in ("auto", name):
        calls[strategy] = got = []
        module, _ = run(name, strategy, got, counting(got), callbacks=[recorder(got)], enable_checkpointing=True,
                        default_root_dir=tmp_path / strategy)
        assert module.held == [False, True, True, True]  # plain's: held through the next forward
    assert calls[name] == calls["auto"]
    assert calls["auto"].count("optimizer.zero_grad") == 4 and "callback.on_save_checkpoint" in calls["auto"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_the_early_gradient_free_calls_no_optimizer(name, monkeypatch):
    """torch's own ``zero_grad`` and no hook before it: the last step's gradients are freed as the batch starts
    (lower peak), by setting them to None, not by a second ``zero_grad``; every hook runs as in plain."""
    original = torch.optim.Optimizer.zero_grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        calls.append("optimizer.zero_grad")
        original(self, set_to_none)

    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", zero_grad)  # SGD's own, counted
    runs = {}
    for strategy in ("auto", name):
        runs[strategy] = calls = []
        module, _ = run(name, strategy, calls, callbacks=[recorder(calls, skip=("on_before_zero_grad",))])
        runs[strategy + ".held"] = module.held
    assert runs[name] == runs["auto"] and runs["auto"].count("optimizer.zero_grad") == 4
    assert runs["auto.held"] == [False, True, True, True] and runs[name + ".held"] == [False] * 4


class StepLogger(Logger):
    """Records the step and the keys of every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, list[str]]] = []

    @property
    def name(self) -> str:
        return "steps"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, sorted(metrics)))


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("every, accumulate", [(1, 1), (2, 1), (3, 1), (0, 1), (1, 2)])
def test_metrics_reach_the_logger_at_lightnings_steps(name, every, accumulate):
    """Without ``MemoryMonitor``, the logger gets exactly plain's calls (Lightning's tests count them). With it,
    plain's calls too, and ours (``vdnn/...``, a call of their own) only at the steps Lightning logs at
    (``log_every_n_steps``; 0: never; not in the middle of gradient accumulation), under the same step numbers."""
    loggers = {}
    for strategy, callbacks in (("auto", []), (name, []), (name + "+monitor", [MemoryMonitor()])):
        loggers[strategy] = StepLogger()
        run(name, strategy.split("+")[0], [], log=True, logger=loggers[strategy], log_every_n_steps=every,
            max_steps=5, callbacks=callbacks, accumulate_grad_batches=accumulate)
    plain, ours, monitored = (loggers[k].calls for k in ("auto", name, name + "+monitor"))
    assert ours == plain
    theirs = [(step, keys) for step, keys in monitored if not any(k.startswith("vdnn/") for k in keys)]
    assert theirs == plain
    mine = [(step, keys) for step, keys in monitored if any(k.startswith("vdnn/") for k in keys)]
    assert [step for step, _ in mine] == [step for step, _ in plain]
    assert all(all(k.startswith("vdnn/") for k in keys) and "vdnn/offloaded_GiB" in keys for _, keys in mine)
    assert len(plain) == (0 if every == 0 else 5 // every)


def files(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """Every file under ``root``, relative to it."""
    root = fs._strip_protocol(root).rstrip("/")
    return {path[len(root) + 1:] for path in fs.find(root)}


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("logger", [False, True])
def test_files_after_fit_are_plain_lightnings(name, logger, tmp_path, monkeypatch):
    """Checkpoints, logs, and nothing else in the working directory or the root: with a logger, our plot in
    its log directory at most; without one, nothing (``logger=False``, no ``default_root_dir``)."""
    local = fsspec.filesystem("file")
    found = {}
    for strategy in ("auto", name):
        cwd = tmp_path / strategy
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        run(name, strategy, [], logger=logger, enable_checkpointing=True, enable_model_summary=True)
        found[strategy] = files(local, str(cwd))
    assert any(f.endswith(".ckpt") for f in found["auto"])
    assert found[name] - found["auto"] == ({f"lightning_logs/version_0/{TIMELINE_FILE}"} if logger else set())
    assert found["auto"] <= found[name]


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("logger", [False, True])
def test_a_remote_root_dir_gets_plain_lightnings_files(name, logger, tmp_path, monkeypatch):
    """``default_root_dir="memory://..."`` (any fsspec URL): nothing local (no folder named ``memory:``), and in
    the remote root what plain writes there, plus our plot in the logger's directory when there is a logger."""
    monkeypatch.chdir(tmp_path)
    memory = fsspec.filesystem("memory")
    found = {}
    for strategy in ("auto", name):
        root = f"memory://{uuid.uuid4().hex}/{strategy}"
        run(name, strategy, [], logger=logger, default_root_dir=root, enable_checkpointing=True,
            enable_model_summary=True)
        found[strategy] = files(memory, root)
    assert list(tmp_path.iterdir()) == []
    assert any(f.endswith(".ckpt") for f in found["auto"])
    assert found[name] - found["auto"] == ({f"lightning_logs/version_0/{TIMELINE_FILE}"} if logger else set())
    assert found["auto"] <= found[name]


@pytest.mark.parametrize("name", STRATEGIES)
def test_storage_options_reach_the_checkpoint_io_as_lightning_passes_them(name, tmp_path):
    """By keyword, as ``Strategy.save_checkpoint`` passes them (a mocked ``TorchCheckpointIO.save_checkpoint``
    asserted ``called_with(..., storage_options=...)`` fails on a positional one)."""
    for strategy in ("auto", name):
        _, trainer = run(name, strategy, [], max_steps=1)
        path = tmp_path / f"{strategy}.ckpt"
        with mock.patch.object(TorchCheckpointIO, "save_checkpoint") as save:
            trainer.save_checkpoint(path, storage_options={"acl": "private"})
        save.assert_called_once_with(mock.ANY, path, storage_options={"acl": "private"})


def snapshotting(module: L.LightningModule, copies: list[torch.nn.Module]) -> L.LightningModule:
    """``module`` whose ``training_step`` first deep-copies its network and runs the copy on the batch, as a
    user's snapshot or an EMA callback does (Lightning's ``test_model_checkpoint_manual_opt`` copies a layer)."""
    step = module.training_step

    @functools.wraps(step)
    def training_step(batch, batch_idx):
        copy = deepcopy(module.net)
        with torch.no_grad():
            copy.loss = torch.nn.functional.cross_entropy(copy(batch[0]), batch[1])
        copies.append(copy)
        return step(batch, batch_idx)

    module.training_step = training_step
    return module


@pytest.mark.parametrize("name", ["vdnn_all", "vdnn"])
def test_a_deep_copy_of_the_module_during_fit_is_plain_lightnings(name):
    """``copy.deepcopy`` of the module inside ``training_step`` works (the hooks are shared, not copied with
    the offloader's locks and streams) and the copy is a plain module: the same weights, buffers and forward
    as plain Lightning's copy at every step, and nothing of it reaches the offloader's trace."""
    copies, modules = {}, {}
    for strategy in ("auto", name):
        copies[strategy] = got = []
        modules[strategy], trainer = fit(lambda: snapshotting(Classifier(ResidualCNN()), got), image_loader(),
                                         strategy)
    assert len(copies[name]) == len(copies["auto"]) == 3
    for plain, ours in zip(copies["auto"], copies[name]):
        assert plain.state_dict().keys() == ours.state_dict().keys()
        for key, value in plain.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, msg=lambda m: f"{key}: {m}")
        torch.testing.assert_close(ours.loss, plain.loss)
    for (key, value), theirs in zip(modules["auto"].state_dict().items(), modules[name].state_dict().values()):
        torch.testing.assert_close(theirs, value, msg=lambda m: f"{key}: {m}")
    assert trainer.strategy.memory_report().layers  # the original network was still measured


@pytest.mark.parametrize("name", STRATEGIES)
def test_our_timing_takes_nothing_from_a_patched_clock(name):
    """Lightning's ``ThroughputMonitor`` tests patch ``time.perf_counter`` with a fixed list of times, one per call
    they expect: a fit calls it as often under our strategies as under plain (our per-layer timing keeps its own
    reference to the clock)."""
    counts = {}
    for strategy in ("auto", name):
        with mock.patch("time.perf_counter", return_value=1.0) as clock:
            run(name, strategy, [])
        counts[strategy] = clock.call_count
    assert counts[name] == counts["auto"]
