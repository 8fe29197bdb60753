"""``with offload_activations(policy="all"):`` without a model, as ``torch.autograd.graph.save_on_cpu``: the same
gradients as plain autograd on the same seed, tensors back in reverse order of saving, and clear refusals of
what needs the model."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ResidualCNN, image_loader, token_loader
from lightning_vdnn import offload_activations
from lightning_vdnn.examples.models import GPT, GPTConfig
from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.offload.prefetch import Prefetcher

MODELS = {
    "cnn": (lambda: ResidualCNN(width=8), image_loader),  # BatchNorm, in-place ReLU, dropout
    "gpt": (lambda: GPT(GPTConfig.from_name("gpt_tiny", dropout=0.1)), token_loader),
}


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return F.cross_entropy(out.flatten(0, 1), y.flatten()) if out.dim() == 3 else F.cross_entropy(out, y)


def step(name: str, around=contextlib.nullcontext, steps: int = 2):
    """Two training steps of a fresh model (seed 0) with ``around()`` around each forward: its gradients, buffers
    (BatchNorm's running statistics), the loss and the RNG state after (dropout draws the same masks)."""
    make, loader = MODELS[name]
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in list(loader())[:steps]:
        opt.zero_grad()
        with around():
            loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
    return ([p.grad.clone() for p in model.parameters()], [b.clone() for b in model.buffers()], loss.detach(),
            torch.get_rng_state())


def assert_same(got, ref) -> None:
    grads, buffers, loss, rng = got
    torch.testing.assert_close(loss, ref[2], rtol=0, atol=0)
    for a, b in zip(grads + buffers, ref[0] + ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(rng, ref[3])  # the hooks draw no random numbers


@pytest.mark.parametrize("name", list(MODELS))
def test_matches_plain_autograd_and_save_on_cpu(name, one_thread):
    handles = []

    def offloaded():
        off = offload_activations(policy="all", min_offload_bytes=0)
        handles.append(off)
        return off

    ref = step(name)
    assert_same(step(name, offloaded), ref)
    assert_same(step(name, torch.autograd.graph.save_on_cpu), ref)
    off = handles[0]
    assert all(h is off for h in handles)  # one handle without a model: its host pool is reused
    off.step_done()
    report = off.report()
    assert report.policy == "all" and report.step == 2
    assert report.offloaded_bytes > 0 and report.offloaded_tensors > 0 and report.prefetched_bytes > 0
    assert report.layers == ()  # no model, no layers to break the numbers down by
    off.close()


def test_default_policy_is_all_and_min_offload_bytes_applies(one_thread):
    off = offload_activations()
    assert off.config.activation_offload == "all" and off.offloader.grouping == "tensor"
    big = offload_activations(min_offload_bytes=2**40)  # nothing is that large: nothing moves
    assert off.offloader is None  # other arguments replaced the handle
    ref = step("cnn")
    assert_same(step("cnn", lambda: big), ref)
    big.step_done()
    assert big.report().offloaded_bytes == 0
    big.close()


@pytest.mark.parametrize("outer_first", [True, False])
def test_nested_inside_other_saved_tensors_hooks(outer_first, one_thread):
    """Inside another hook pair, the innermost pair packs (ours, or theirs when nested in ours)."""
    packed = []

    def other():
        return torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t)

    def nested():
        outer, inner = (other(), offload_activations(policy="all", min_offload_bytes=0))[::1 if outer_first else -1]
        stack = contextlib.ExitStack()
        stack.enter_context(outer)
        stack.enter_context(inner)
        return stack

    ref = step("cnn")
    assert_same(step("cnn", nested), ref)
    off = offload_activations(policy="all", min_offload_bytes=0)
    off.step_done()
    assert (off.report().offloaded_bytes > 0) == outer_first and (not packed) == outer_first
    off.close()


@pytest.mark.parametrize("kwargs, match", [
    (dict(policy="auto"), "(?i)pass the model"),
    (dict(policy="all", memory_budget="1GiB"), "memory_budget"),
    (dict(memory_budget=0.5), "(?i)pass the model"),
    (dict(policy="conv"), "(?i)pass the model"),
    (dict(layers="blocks"), "(?i)pass the model"),
    (dict(policy="bogus"), "policy='bogus'"),
])
def test_what_needs_the_model_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        offload_activations(**kwargs)


def test_a_policy_in_place_of_the_model_is_refused():
    with pytest.raises(TypeError, match="offload_activations\\(policy='all'\\)"):
        offload_activations("all")


def test_model_free_offloader_has_no_layers_to_attach():
    off = ActivationOffloader(torch.device("cpu"), "all", grouping="tensor")
    with pytest.raises(ValueError, match="grouping='layer'"):
        off.attach(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="(?i)pass the model"):
        ActivationOffloader(torch.device("cpu"), "conv", grouping="tensor")


def _record_copies(monkeypatch):
    """Patch the prefetcher: every host->device copy as (save index, prefetched ahead?, bytes ahead not yet read)."""
    saved, copies, reading = [], [], []
    offload, fetch, below = ActivationOffloader._offload, Prefetcher.fetch, Prefetcher.below

    def record_offload(self, *args):
        entry = offload(self, *args)
        saved.append(entry)
        return entry

    def record_fetch(self, entry, trace):
        below_read = [e for _, e in copies if reading and e.group < reading[-1] and not e.used]
        ahead = sum(e.nbytes for e in {id(e): e for e in below_read}.values())
        took = fetch(self, entry, trace)
        if took:
            copies.append(((bool(reading), ahead), entry))
        return took

    def record_below(self, groups, group, trace):
        reading.append(group)
        try:
            below(self, groups, group, trace)
        finally:
            reading.pop()

    monkeypatch.setattr(ActivationOffloader, "_offload", record_offload)
    monkeypatch.setattr(Prefetcher, "fetch", record_fetch)
    monkeypatch.setattr(Prefetcher, "below", record_below)
    return saved, copies


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("max_inflight", [2**28, 0])
def test_prefetch_in_reverse_order_of_saving(name, max_inflight, monkeypatch, one_thread):
    saved, copies = _record_copies(monkeypatch)
    off = offload_activations(policy="all", min_offload_bytes=0, max_inflight_bytes=max_inflight)
    step(name, lambda: off, steps=1)
    off.step_done()
    assert len({id(e) for _, e in copies}) > len(saved) // 2  # the rest were alive on the device: used in place
    order = [saved.index(e) for (pre, _), e in copies if pre]
    assert order == sorted(set(order), reverse=True)  # prefetch runs in reverse order of saving, each span once
    ahead = [a for (pre, a), _ in copies if pre]
    if max_inflight == 0:  # the bound holds: one span ahead at a time
        assert len(order) > 3 and all(a == 0 for a in ahead)
        return
    assert len(order) > len(saved) // 2 and max(ahead) > 0
    first_reads, seen = [], set()
    for (pre, _), e in copies:
        if not pre and id(e) not in seen:
            first_reads.append(saved.index(e))  # a copy backward waited for, not a second read of a span
        seen.add(id(e))
    # only backward's first read, and reads of spans saved after it (above the prefetch), wait for their copies
    assert first_reads[0] == max(order) + 1 and all(i > first_reads[0] for i in first_reads[1:])
    off.close()


def test_a_span_read_twice_is_copied_once(one_thread):
    """A ReLU's output that the next Linear saves too: backward reads it twice in a row, from one copy."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)), torch.randn(8, 16)
    off = offload_activations(policy="all", min_offload_bytes=0)
    with off:
        loss = model(x).square().sum()
    loss.backward()
    off.step_done()
    report = off.report()
    assert report.offloaded_bytes > 8 * 64 * 4 and report.prefetched_bytes == 8 * 64 * 4  # x stayed; one copy
    off.close()
