"""Out of memory in "auto": the budget is lowered, the same batch runs again, and training ends exactly where
plain training does: same steps, losses, parameters and BatchNorm statistics. OOMs are injected on CPU."""

from __future__ import annotations

import warnings
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision
from lightning.pytorch.strategies import Strategy

from conftest import Classifier, ResidualCNN, TokenLM, fit, image_loader, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.integrations.lightning_hooks import OffloadHooks
from lightning_vdnn.report.memory_report import format_bytes
from lightning_vdnn.planning.oom_retry import MAX_RETRIES, BudgetLowered, StepOutOfMemory

INJECTED = "CUDA out of memory (injected)"


class _FailInBackward(torch.autograd.Function):
    """Identity whose backward runs out of memory: layers after it have accumulated their grads by then."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError(INJECTED)


def failing(make, layer, calls, where="forward"):
    """``make`` with ``layer(module)`` running out of memory on the given (0-based) calls of its forward (or of
    the backward through its output)."""
    def build():
        module = make()
        target = layer(module)
        forward, count = target.forward, [0]

        def patched(*args, **kwargs):
            count[0] += 1
            fails = (count[0] - 1) in calls
            if fails and where == "forward":
                raise torch.OutOfMemoryError(INJECTED)
            out = forward(*args, **kwargs)
            return _FailInBackward.apply(out) if fails else out

        target.forward = patched
        return module
    return build


def cnn():
    return Classifier(ResidualCNN())


def lm():
    return TokenLM(dropout=0.1)


def budget_for_half(make, loader):
    """A budget that keeps about half of the saved activations (on a CPU device the planner's peak is what
    stays in place), so a plan has something to lower."""
    _, probe = fit(make, loader, VDNNStrategy("all", min_offload_bytes=0), max_steps=1)
    return probe.strategy.memory_report().offloaded_bytes // 2


def fit_recording(make, loader, strategy, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, trainer = fit(make, loader, strategy, **kwargs)
    lowered = [str(w.message) for w in caught if issubclass(w.category, BudgetLowered)]
    return module, trainer, lowered


def assert_same_state(got, ref):
    """Parameters and buffers (BatchNorm running statistics) bit for bit."""
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("model, loader, layer", [
    (cnn, image_loader, lambda m: m.net.head),  # after dropout and BatchNorm: RNG and statistics restored
    (lm, token_loader, lambda m: m.model.blocks[1]),
], ids=["cnn", "gpt"])
def test_oom_in_forward_lowers_the_budget_and_reruns_the_batch(one_thread, model, loader, layer):
    steps = 5
    budget = budget_for_half(model, loader())
    ref, _ = fit(model, loader(), max_steps=steps)
    got, trainer, lowered = fit_recording(failing(model, layer, calls={2}), loader(),
                                          VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget),
                                          max_steps=steps)
    assert trainer.global_step == steps and len(got.losses) == len(ref.losses) == steps  # none lost or doubled
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_state(got, ref)
    report = trainer.strategy.memory_report()
    assert report.budget_bytes < budget and report.kept_bytes > 0
    assert len(lowered) == 1 and format_bytes(budget) in lowered[0]
    assert format_bytes(report.budget_bytes) in lowered[0] and str(report.budget_bytes) in lowered[0]


@pytest.mark.parametrize("where, call", [("forward", 3), ("backward", 3), ("backward", 2)],
                         ids=["forward-second-micro-batch", "backward-second-micro-batch",
                              "backward-first-micro-batch"])
def test_oom_with_gradient_accumulation_keeps_the_earlier_micro_batches(one_thread, where, call):
    """A backward that fails half-way has accumulated some layers' gradients: they must not count. With two
    micro-batches per step, call 3 is the second micro-batch of step 1 (its first's gradients are in .grad)."""
    loader = lambda: image_loader(n=96)  # noqa: E731
    budget = budget_for_half(cnn, loader())
    ref, _ = fit(cnn, loader(), max_steps=4, accumulate_grad_batches=2)
    got, trainer, lowered = fit_recording(failing(cnn, lambda m: m.net.res[4], {call}, where), loader(),
                                          VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget),
                                          max_steps=4, accumulate_grad_batches=2)
    assert trainer.global_step == 4 and len(lowered) == 1
    losses = list(got.losses)
    if where == "backward":  # training_step ran twice for that batch, with the same loss both times
        assert losses[call] == losses[call + 1]
        del losses[call]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_state(got, ref)


def test_oom_under_a_fixed_policy_propagates_unchanged(one_thread):
    with pytest.raises(torch.OutOfMemoryError, match="injected") as info:
        fit(failing(cnn, lambda m: m.net.head, {1}), image_loader(), VDNNStrategy("all", min_offload_bytes=0))
    assert type(info.value) is torch.OutOfMemoryError


def test_repeated_oom_ends_in_an_error_naming_the_budgets_tried(one_thread):
    budget = budget_for_half(cnn, image_loader())
    with pytest.raises(StepOutOfMemory, match=r"training step 2 .*memory_budget tried on this batch: "
                       + format_bytes(budget)) as info:
        fit_recording(failing(cnn, lambda m: m.net.head, calls=set(range(2, 100))), image_loader(),
                      VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget), max_steps=5)
    assert "injected" in str(info.value) and isinstance(info.value, torch.OutOfMemoryError)
    tried = str(info.value).split("tried on this batch: ")[1].split(". ")[0].split(", ")
    assert 2 <= len(tried) <= MAX_RETRIES + 1  # lowered until nothing was kept, or out of retries


def test_oom_in_the_profiling_step_has_nothing_to_lower(one_thread):
    with pytest.raises(StepOutOfMemory, match="profiles the model, with every activation offloaded"):
        fit(failing(cnn, lambda m: m.net.head, {0}), image_loader(),
            VDNNStrategy("auto", min_offload_bytes=0, memory_budget=10**6))


class Logging(Classifier):
    """Logs a count and its loss, per step and per epoch, as a user's ``training_step`` would."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("seen", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
        self.log("first_seen", float(batch_idx), on_step=False, on_epoch=True, reduce_fx="min")
        self.log("fit_loss", loss, on_step=True, on_epoch=True)
        return loss


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_retried_batch_is_logged_once(one_thread, where):
    """``self.log`` in a batch whose backward (or forward) ran out of memory counts once: the epoch's sum, mean
    and step values equal plain training's."""
    make = lambda: Logging(ResidualCNN())  # noqa: E731
    steps = 4
    budget = budget_for_half(make, image_loader())
    _, ref = fit(make, image_loader(), max_steps=steps, max_epochs=1)
    _, got, lowered = fit_recording(failing(make, lambda m: m.net.head, {2}, where), image_loader(),
                                    VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget),
                                    max_steps=steps, max_epochs=1)
    assert len(lowered) == 1
    for name in ("seen", "first_seen", "fit_loss_epoch", "fit_loss_step"):
        torch.testing.assert_close(got.callback_metrics[name], ref.callback_metrics[name], rtol=1e-5, atol=0,
                                   msg=lambda m: f"{name}: {m}")
    assert got.callback_metrics["seen"].item() == got.global_step


class PluginSeen(L.Callback):
    """The precision plugin the Trainer runs backward through, as a callback sees it during fit."""

    def on_train_batch_end(self, trainer, *args):
        self.plugin = trainer.precision_plugin


@pytest.mark.parametrize("plugin", [
    lambda: MixedPrecision("bf16-mixed", "cpu"),
    lambda: MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4)),
    lambda: DoublePrecision(),
], ids=["bf16-mixed", "scaled", "64-true"])
def test_oom_in_backward_retries_under_the_users_precision_plugin(one_thread, plugin):
    """The retry runs from the precision plugin's ``backward`` (no ``Strategy.backward`` override): under a
    plugin that scales the loss, casts or changes dtype, the run ends where plain training with the same plugin
    does, the Trainer's plugin is still of the user's class (and holds the same scaler) during fit, and the
    user's own plugin object is back in place after it."""
    steps, seen = 4, PluginSeen()
    budget = budget_for_half(cnn, image_loader())
    ref, _ = fit(cnn, image_loader(), max_steps=steps, plugins=[plugin()])
    given = plugin()
    got, trainer, lowered = fit_recording(failing(cnn, lambda m: m.net.head, {2}, "backward"), image_loader(),
                                          VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget),
                                          max_steps=steps, plugins=[given], callbacks=[seen])
    assert len(lowered) == 1 and trainer.global_step == steps
    losses = list(got.losses)
    assert losses[2] == losses[3]  # training_step ran twice for the batch whose backward failed
    del losses[2]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_state(got, ref)
    assert isinstance(seen.plugin, type(given)) and seen.plugin is not given
    assert type(seen.plugin).__qualname__ == type(given).__qualname__  # the key its checkpoint state is filed under
    assert getattr(seen.plugin, "scaler", None) is getattr(given, "scaler", None)
    assert trainer.precision_plugin is given


def test_lightnings_own_patch_of_strategy_backward_sees_every_backward(one_thread):
    """Lightning's tests wrap the strategy's backward (``mock.patch.object(Strategy, "backward",
    wraps=trainer.strategy.backward)``): with an override of ours, ``super().backward`` was the mock and
    recursed. Each batch's backward goes through it once, and through the precision plugin's too."""
    budget = budget_for_half(cnn, image_loader())
    for strategy in (VDNNStrategy("all"), VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget)):
        L.seed_everything(0)
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with mock.patch.object(Strategy, "backward", wraps=trainer.strategy.backward) as backward:
            trainer.fit(cnn(), image_loader())
        assert backward.call_count == 3 and trainer.global_step == 3
    assert "backward" not in vars(type(trainer.strategy)) and "backward" not in vars(OffloadHooks)
