"""The offloader on its own: exact gradients through every kind of saved view, one copy per tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_vdnn.offload.offloader import ActivationOffloader
from lightning_vdnn.offload.host_pool import HostBufferPool, size_class


def grads(fn, offloader=None, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    if offloader is None:
        fn(x, w).backward()
    else:
        with offloader.capture():
            out = fn(x, w)
        out.backward()
        offloader.finish_pass()
    return x.grad, w.grad


def cpu_offloader(**kw) -> ActivationOffloader:
    return ActivationOffloader(torch.device("cpu"), policy=kw.pop("policy", "all"), min_offload_bytes=0, **kw)


CASES = {
    "conv_bn_relu_pool": lambda x, w: F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x, w, padding=1), None, None,
                                                                        training=True)), 2).sum(),
    "channels_last": lambda x, w: F.conv2d(x.to(memory_format=torch.channels_last), w, padding=1).pow(2).sum(),
    "transposed_views": lambda x, w: (x.transpose(1, 3) @ x.transpose(1, 3).transpose(-1, -2)).sin().sum(),
    "qkv_split_attention": lambda x, w: _attention(x),
    "strided_slice": lambda x, w: (x[:, ::2, 1:, ::3].exp() * x[:, 1::2, :-1, ::3]).sum(),
    "expand_and_int_index": lambda x, w: (x.amax(1, keepdim=True).expand_as(x) * x).sum() + x.max(1)[0].sum(),
}


def _attention(x):
    qkv = x.flatten(2).transpose(1, 2).repeat(1, 1, 3)  # (B, 256, 24)
    q, k, v = qkv.split(8, dim=-1)
    q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum()


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_exact_through_saved_views(name):
    ref = grads(CASES[name])
    off = cpu_offloader()
    got = grads(CASES[name], off)
    for a, b in zip(ref, got):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert off.report().offloaded_tensors > 0


def test_tensor_saved_three_times_moves_once():
    off = cpu_offloader()
    x = torch.randn(64, 64, requires_grad=True)
    with off.capture():
        y = torch.relu(x)  # relu saves its output y
        z = (y * y).sum()  # mul saves y twice
    z.backward()
    off.finish_pass()
    report = off.report()
    assert report.offloaded_tensors == 1 and report.offloaded_bytes == 64 * 64 * 4
    torch.testing.assert_close(x.grad, 2 * torch.relu(x))


def test_a_view_moves_only_its_span():
    off = cpu_offloader()
    big = torch.randn(1000, 64, requires_grad=True)
    with off.capture():
        h = big * 1.0
        out = h[10:20].exp().sum()  # exp saves its output, a fresh tensor: h's slice itself is not saved
        out2 = (h[500:510] ** 2).sum()  # pow saves h[500:510], a view into a 256 KB storage
    (out + out2).backward()
    off.finish_pass()
    assert off.report().offloaded_bytes == 10 * 64 * 4 * 2


def test_parameters_are_never_copied():
    lin = torch.nn.Linear(256, 256)
    off = cpu_offloader()
    off.attach(lin)
    x = torch.randn(8, 256)  # input does not require grad: linear saves only the weight... and x
    with off.capture():
        lin(x).sum().backward()
    off.finish_pass()
    report = off.report()
    assert report.offloaded_bytes == x.numel() * 4  # x moved, weight (and weight.t() view) kept in place


def test_span_and_parameter_shortcuts_agree_with_their_definitions():
    """``span_of``'s contiguous shortcut gives the strides' span; ``_parameter`` is ``isinstance(t, Parameter)``
    (a plain tensor carrying Parameter's ``_is_param`` flag included)."""
    from lightning_vdnn.offload import spans

    base = torch.randn(6, 5, 4)
    views = [base, base[1:3], base[:, 1], base.transpose(0, 2), base[..., ::2], base[2:3, :, 1:2], base.view(-1)[7:],
             base.unsqueeze(1), base.as_strided((3, 1, 4), (20, 99, 1)), base[:0],
             torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)]
    for v in views:
        general = (1 + sum((s - 1) * st for s, st in zip(v.shape, v.stride()))) * v.element_size()
        (address, lo, hi), nbytes = spans.span_of(v)
        assert nbytes == general and hi - lo == general and address == v.untyped_storage().data_ptr()
        assert spans.span_of(v, 12345)[0][0] == 12345
    weight = torch.nn.Parameter(torch.randn(3))
    flagged = torch.randn(3)
    flagged._is_param = True
    for t in (weight, weight[1:], weight.detach(), torch.randn(3), flagged, torch.nn.Buffer(torch.randn(2))):
        assert spans._parameter(t) == isinstance(t, torch.nn.Parameter)
        assert spans._is_param(t) == (isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter))


def test_retain_graph_backward_twice():
    off = cpu_offloader()
    x = torch.randn(32, 32, requires_grad=True)
    with off.capture():
        y = (x.sin() * x.cos()).sum()
    y.backward(retain_graph=True)
    first = x.grad.clone()
    y.backward()
    off.finish_pass()
    torch.testing.assert_close(x.grad, 2 * first)


def test_plain_pytorch_loop_needs_no_finish_call():
    off = cpu_offloader()
    for _ in range(3):
        x = torch.randn(16, 16, requires_grad=True)
        with off.capture():
            y = x.exp().sum()
        y.backward()
        torch.testing.assert_close(x.grad, x.exp())
    assert off.report().step == 2  # the third pass closes at the next capture or finish_pass


def test_pool_reuses_buffers_and_rounds_sizes():
    assert size_class(1) == 4096 and size_class(5000) >= 5000
    for n in (5000, 10**6, 3 * 2**20 + 1):
        assert n <= size_class(n) <= n * 1.25 + 4096
    pool = HostBufferPool(pin_memory=False)
    assert pool.would_allocate(10**6)
    a, _ = pool.acquire(10**6)
    pool.release(a)
    assert not pool.would_allocate(10**6 - 100) and pool.would_allocate(2 * 10**6)  # what the profile times
    b, _ = pool.acquire(10**6 - 100)
    assert b.data_ptr() == a.data_ptr() and pool.allocations == 1


def test_bad_policy():
    with pytest.raises(ValueError, match="policy='some'"):
        ActivationOffloader(torch.device("cpu"), policy="some")


def test_autocast_weight_copies_are_not_offloaded():
    lin = torch.nn.Linear(256, 256)
    off = cpu_offloader()
    off.attach(lin)
    x = torch.randn(16, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16), off.capture():
        y = lin(x).float().sum()
    y.backward()
    off.finish_pass()
    assert off.report().offloaded_bytes == 16 * 256 * 2  # the bf16 input only, not the bf16 weight copy


def test_conv_policy_ignores_reused_addresses_of_freed_inputs():
    """A Linear's input is freed, its address reused by a tensor no expensive layer reads: that stays."""
    lin = torch.nn.Linear(64, 64)
    off = cpu_offloader(policy="conv")
    off.attach(lin)
    with off.capture():
        h = lin(torch.randn(32, 64, requires_grad=True))  # input saved: offloaded
        z = (h.exp() * 2).sin().sum()  # exp/sin save tensors that are not Linear inputs
    z.backward()
    off.finish_pass()
    assert off.report().offloaded_tensors == 1



def test_a_device_is_named_with_its_index(monkeypatch):
    """Saved tensors name their device ``cuda:N``; the offloader compares a save's device with its own, so
    ``cuda`` without an index is the current CUDA device (else nothing would ever be copied)."""
    from lightning_vdnn.offload.host_pool import concrete_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert concrete_device("cuda") == torch.device("cuda", 3)
    assert concrete_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert concrete_device("cuda:1") == torch.device("cuda", 1)
    assert concrete_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError):
        concrete_device("no-such-device")


def test_a_worker_waits_on_an_event_only_while_its_work_runs():
    """``wait_for`` asks ``query`` first, which keeps the GIL, and calls ``synchronize``, which gives it up (a worker
    then waits to win it back from the thread driving the GPU), only for work still running."""
    from lightning_vdnn.offload.host_pool import HostEvent, wait_for

    class Event:
        def __init__(self, done: bool) -> None:
            self.done, self.waits = done, 0

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            self.waits, self.done = self.waits + 1, True

    finished, running = Event(True), Event(False)
    wait_for(finished)
    wait_for(running)
    wait_for(HostEvent())  # the host's own: always done
    assert (finished.waits, running.waits) == (0, 1) and running.done
