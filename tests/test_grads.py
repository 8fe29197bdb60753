"""The last step's gradients are freed when the next batch starts, where nothing the user wrote can tell."""

from __future__ import annotations

import lightning as L
import pytest

from conftest import Classifier, ResidualCNN, TokenLM, assert_same_params, fit, image_loader, token_loader
from lightning_vdnn import VDNNStrategy


class Held(Classifier):
    """Records, as each training_step begins, whether any gradient is still allocated."""

    def __init__(self) -> None:
        super().__init__(ResidualCNN())
        self.held: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.held.append(any(p.grad is not None for p in self.parameters()))
        return super().training_step(batch, batch_idx)


class SeesZeroGrad(Held):
    def on_before_zero_grad(self, optimizer):  # reads the gradients Lightning is about to clear
        self.seen = [p.grad is not None for p in self.parameters()]


class Grads(L.Callback):
    """A callback that may read the gradients before Lightning clears them."""

    def on_before_zero_grad(self, trainer, module, optimizer):
        pass


class HeldLM(TokenLM):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.held.append(any(p.grad is not None for p in self.parameters()))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("make, data, strategy", [
    (Held, image_loader, "vdnn_all"), (Held, image_loader, "vdnn_none"),
    (HeldLM, token_loader, VDNNStrategy("none", layer_streaming=True)),  # block grads live on the host
])
def test_the_last_steps_gradients_are_gone_when_the_next_step_begins(make, data, strategy):
    """Under plain Lightning the last step's gradients are held through the next forward; ours frees them as
    the batch starts, and trains the same."""
    ref, _ = fit(make, data(), max_steps=3)
    got, _ = fit(make, data(), strategy=strategy, max_steps=3)
    assert ref.held == [False, True, True]
    assert got.held == [False, False, False]
    assert got.losses == pytest.approx(ref.losses, rel=1e-5)
    assert_same_params(got, ref)


def test_within_an_accumulation_window_the_gradients_stay():
    got, _ = fit(Held, image_loader(n=96), strategy="vdnn_all", max_steps=3, accumulate_grad_batches=2)
    assert got.held == [False, True, False, True, False, True]  # freed only where a window starts


@pytest.mark.parametrize("make, callbacks", [(SeesZeroGrad, []), (Held, [Grads()])])
def test_a_hook_that_runs_before_zero_grad_keeps_them(make, callbacks):
    """``on_before_zero_grad`` (module or callback) runs after training_step and may read the gradients: then
    they are held as Lightning holds them."""
    got, _ = fit(make, image_loader(), strategy="vdnn_all", max_steps=3, callbacks=callbacks)
    assert got.held == [False, True, True]
