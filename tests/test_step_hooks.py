"""Layer streaming's host steppers act through torch's public step hooks (``streaming/step_hooks.py``), not by
replacing ``optimizer.step``: every way of calling the step (Lightning's closure, ``step()`` after
``backward()``, ``step(closure)`` in a plain loop) trains exactly as plain, the user's hooks and overrides run as
often and in the same order, and ``zero_grad`` (wrapped by the torch adapter, which has no hook for it) may
zero in place while block updates are queued."""

from __future__ import annotations

import functools

import pytest
import torch

import lightning_vdnn
from conftest import fit, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.streaming.host_optimizer import HostStepper
from lightning_vdnn.streaming.streamer import LayerStreamer
from test_lightning_contract import CASES, recorded, recorder

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


def gpt_tiny() -> torch.nn.Module:
    return GPT(GPTConfig.from_name("gpt_tiny"))


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def assert_same_model(got: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Parameters, gradients (None or equal) and buffers bit for bit."""
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=lambda m: f"{name}.grad: {m}")
    for (name, b), c in zip(got.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def host_updates(monkeypatch) -> list[int]:
    """The block index of every update the host worker ran (not the optimizer's own step over the blocks)."""
    ran, update = [], HostStepper._update

    def counted(self, sub, *args):
        ran.append(sub.block.index)
        return update(self, sub, *args)
    monkeypatch.setattr(HostStepper, "_update", counted)
    return ran


def train(stream: bool, loop, eager: bool = False):
    """``loop(model, opt, x, y, step)`` for each batch of a fresh gpt_tiny (seed 0) and AdamW; returns the
    model, the losses and how many block updates ran during backward. Streamed: ``stream_layers``, closed
    (ordinary module again) before returning."""
    torch.manual_seed(0)
    model = gpt_tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    streamer = lightning_vdnn.stream_layers(model, opt, device="cpu", eager_updates=eager) if stream else None
    if stream:
        assert "step" not in opt.__dict__  # torch's hooks: nothing replaced (zero_grad: the torch adapter's)
    losses = [loop(model, opt, x, y, step) for step, (x, y) in zip(range(STEPS), token_loader(n=8 * STEPS))]
    eager_updates = 0
    if stream:
        eager_updates = sum(s.eager_updates for s in streamer.steppers)
        streamer.close()
        assert "step" not in opt.__dict__ and "zero_grad" not in opt.__dict__
    return model, losses, eager_updates


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("keyword", [False, True])
def test_step_with_a_closure_in_a_plain_loop_equals_plain(eager, keyword, host_updates):
    """``optimizer.step(closure)`` called directly: torch runs the step pre-hooks before the closure, so the
    blocks' updates are queued once its backward is done (during it with eager updates), as plain computes."""
    def loop(model, opt, x, y, step):
        def closure():
            loss = loss_of(model, x, y)
            loss.backward()
            return loss
        loss = opt.step(closure=closure) if keyword else opt.step(closure)
        opt.zero_grad()
        return loss.item()

    (ref, ref_losses, _), (got, losses, eager_updates) = train(False, loop), train(True, loop, eager=eager)
    assert losses == ref_losses
    assert_same_model(got, ref)
    blocks = len(got.blocks)
    assert sorted(host_updates) == sorted(list(range(blocks)) * STEPS)  # every block on the host, every step
    assert eager_updates == (STEPS * blocks if eager else 0)


@pytest.mark.parametrize("eager", [False, True])
def test_zero_grad_in_place_and_accumulation_across_steps_equal_plain(eager, host_updates):
    """``zero_grad(set_to_none=False)`` right after ``step()``, while block updates are still queued (it waits
    for them), and a step whose gradients were not zeroed before the next backward (they add up, as plain):
    same parameters, same gradients."""
    def loop(model, opt, x, y, step):
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        if step % 2:
            opt.zero_grad(set_to_none=False)
        return loss.item()

    (ref, ref_losses, _), (got, losses, eager_updates) = train(False, loop), train(True, loop, eager=eager)
    assert losses == ref_losses
    assert_same_model(got, ref)
    assert len(host_updates) == STEPS * len(got.blocks) and eager_updates == 0  # no closure: at the step


class CountingSGD(torch.optim.SGD):
    """Counts (per instance) its ``step`` and ``zero_grad`` overrides, which call torch's."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def step(self, closure=None):
        self.calls.append("step")
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.calls.append("zero_grad")
        super().zero_grad(set_to_none)


def test_an_optimizer_subclass_sees_its_overrides_called_as_often_as_plain(host_updates):
    """A subclass overriding ``step`` and ``zero_grad`` (``stream_layers`` takes torch's classes only, so the
    stepper is attached directly): both overrides run once per call, as plain, and training is the same."""
    def run(stream: bool):
        torch.manual_seed(0)
        model = gpt_tiny()
        opt = CountingSGD(model.parameters(), lr=1e-2, momentum=0.9)
        streamer = LayerStreamer(model, "blocks", torch.device("cpu")) if stream else None
        if stream:
            streamer.steppers.append(HostStepper(opt, streamer.blocks, eager=False, fused=False))
        for _, (x, y) in zip(range(STEPS), token_loader(n=8 * STEPS)):
            loss_of(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        if stream:
            streamer.close()
        return model, opt

    (ref, ref_opt), (got, opt) = run(False), run(True)
    assert opt.calls == ref_opt.calls == ["step", "zero_grad"] * STEPS
    assert_same_model(got, ref)
    assert len(host_updates) == STEPS * len(got.blocks)


def with_step_hooks(make, calls: list[str]):
    """``make()`` recorded (``test_lightning_contract.recorded``), its optimizer carrying the user's own step
    pre- and post-hooks, which append to ``calls`` too."""
    def build():
        module = recorded(make(), calls)
        configure = module.configure_optimizers

        @functools.wraps(configure)
        def configure_optimizers():
            opt = configure()
            opt.register_step_pre_hook(lambda *_: calls.append("optimizer.step_pre_hook"))
            opt.register_step_post_hook(lambda *_: calls.append("optimizer.step_post_hook"))
            return opt
        module.configure_optimizers = configure_optimizers
        return module
    return build


@pytest.mark.parametrize("options", [{}, {"offload_optimizer": True}, {"clip": 1.0}],
                         ids=["eager", "offload_optimizer", "clipped"])
def test_lightning_hooks_and_optimizer_calls_in_plain_order(options, monkeypatch, host_updates):
    """Every module and callback hook, the optimizer's ``zero_grad`` and the user's step hooks: the same
    sequence under layer streaming (eager updates, the modules outside stepped on the host, or clipping) as
    under plain Lightning."""
    original = torch.optim.Optimizer.zero_grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        calls.append("optimizer.zero_grad")
        original(self, set_to_none)

    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", zero_grad)
    make, loader = CASES["l2l"]
    clip = options.pop("clip", None)
    runs = {}
    for name in ("auto", "l2l"):
        runs[name] = calls = []
        strategy = VDNNStrategy("none", layer_streaming=True, **options) if name == "l2l" else "auto"
        module, _ = fit(with_step_hooks(make, calls), loader(n=8 * STEPS), strategy, max_steps=STEPS,
                        gradient_clip_val=clip, callbacks=[recorder(calls)])
    assert runs["l2l"] == runs["auto"]
    blocks = len(module.model.blocks)
    assert len(host_updates) == STEPS * blocks  # the blocks stepped on the host, not by the optimizer's body
    assert strategy._last_eager_updates == (0 if clip else STEPS * blocks)  # during backward unless clipped
    for call in ("optimizer.zero_grad", "optimizer.step_pre_hook", "optimizer.step_post_hook", "optimizer_step"):
        assert runs["auto"].count(call) == STEPS, call
