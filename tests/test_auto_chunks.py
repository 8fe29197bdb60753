"""``batch_chunks="auto"``: a budget below the all-offloaded floor runs the module holding the largest layers in
batch chunks, as few as fit; training equals plain; BatchNorm, and budgets no count can meet, get clear errors.

On a CPU device the planner's peak is the saved bytes kept in place, which chunks do not change; these runs plug in
:class:`WorkingSet`, which adds what bounds a GPU's all-offloaded peak: the largest layer call's input and output
and their gradients, counted from the tensors each call really takes and returns."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from torch import nn

from conftest import Classifier, assert_same_params, fit, image_loader
from lightning_vdnn import VDNNConfig, VDNNStrategy
from lightning_vdnn.examples.models.vgg import VGG, VGGConfig
from lightning_vdnn.planning.activation_solver import BudgetTooSmall
from lightning_vdnn.planning.auto_chunks import AutoChunks, Tried, refusal

pytestmark = pytest.mark.usefixtures("one_thread")


def vgg(batch_norm: bool = False) -> Classifier:
    """A small VGG (dropout off in its classifier), optionally with BatchNorm in its trunk."""
    config = VGGConfig(layers=(8, "M", 16, 16, "M"), num_classes=10, image_size=16, hidden=32, dropout=0.0,
                       batch_norm=batch_norm)
    return Classifier(VGG(config))


class WorkingSet:
    """Peak = ``static`` (weights and optimizer state, say, which chunks do not shrink) + the saved bytes kept in
    place + twice the largest leaf call's input and output bytes (forward holds them, backward their gradients),
    each tensor once."""

    def __init__(self, strategy: VDNNStrategy, static: int = 0) -> None:
        self.strategy, self.static, self.largest, self.readings = strategy, static, 0, []
        self._hooked: set[int] = set()

    def reset(self) -> None:
        self.largest = 0
        module = self.strategy.lightning_module
        for m in module.modules():
            if not list(m.children()) and id(m) not in self._hooked:
                self._hooked.add(id(m))
                m.register_forward_hook(self._seen)

    def _seen(self, module, args, out) -> None:
        tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor)]
        held = {t.data_ptr(): t.nbytes for t in tensors}  # a chunk is a view: its own bytes, not the batch's
        self.largest = max(self.largest, sum(held.values()))

    def read(self) -> int:
        self.readings.append(self.static + self.strategy._offloader.report().kept_bytes + 2 * self.largest)
        return self.readings[-1]


def auto(budget: int, static: int = 0, **kw) -> VDNNStrategy:
    strategy = VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget, **kw)
    strategy.activation_meter = WorkingSet(strategy, static)
    return strategy


def unchunked_floor(make=vgg) -> int:
    """The all-offloaded peak as :class:`WorkingSet` counts it, without chunks and static bytes."""
    strategy = VDNNStrategy("all", min_offload_bytes=0)
    strategy.activation_meter = meter = WorkingSet(strategy)

    class Measure(L.Callback):
        def on_train_batch_start(self, *_):
            meter.reset()

        def on_train_batch_end(self, *_):
            meter.read()

    fit(make, image_loader(), strategy, max_steps=1, callbacks=[Measure()])
    return meter.readings[-1]


class Chunks(L.Callback):
    """How many times the trunk's first conv ran in each training batch."""

    def __init__(self) -> None:
        self.calls, self.seen = 0, []

    def on_train_start(self, trainer, module):
        module.net.features[0].register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def on_train_batch_start(self, *_):
        self.calls = 0

    def on_train_batch_end(self, *_):
        self.seen.append(self.calls)


def test_a_budget_below_the_floor_chunks_the_trunk_and_trains_as_plain():
    chunked = unchunked_floor()
    floor, budget = 2 * chunked, int(1.2 * chunked)  # as much again that chunks do not shrink
    ref, _ = fit(vgg, image_loader(), max_steps=6)
    seen = Chunks()
    strategy = auto(budget, static=chunked)
    got, trainer = fit(vgg, image_loader(), strategy, max_steps=6, callbacks=[seen])
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    assert_same_params(got, ref)
    for a, b in zip(got.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # profiled whole (over: 4 chunks might fit with room to spare), in 4 (still over: the other half of the floor
    # does not shrink; 8 would fit, 16 with room), in 16 (fits, planned), planned steps
    assert seen.seen == [1, 4, 16, 16, 16, 16]
    readings = strategy.activation_meter.readings
    assert readings[0] == floor > budget and readings[1] > budget >= readings[2]
    report = strategy.memory_report()
    assert (report.batch_chunks, report.chunk_layers, report.chunks_auto) == (16, "net.features", True)
    assert report.predicted_peak_bytes <= budget and report.budget_kept
    assert "batch chunks           16 of 'net.features' (auto: the budget is below its unchunked floor)" in str(report)
    assert report.metrics()["vdnn/batch_chunks"] == 16
    assert "forward" not in vars(got.net.features)  # its own forward back after fit


def test_the_fit_table_says_the_chunks(capsys):
    budget = int(0.6 * unchunked_floor())
    fit(vgg, image_loader(), auto(budget, fit_report=True), max_steps=3)
    out = " ".join(capsys.readouterr().out.split())  # as rich wraps it at any width
    assert "batch chunks: 4 of 'net.features' (auto: the budget is below its unchunked floor)" in out


def test_a_budget_the_floor_meets_chunks_nothing():
    strategy = auto(2 * unchunked_floor())
    seen = Chunks()
    fit(vgg, image_loader(), strategy, max_steps=2, callbacks=[seen])
    assert seen.seen == [1, 1] and strategy.memory_report().batch_chunks is None


def test_batchnorm_in_the_trunk_is_named_in_the_error():
    budget = int(0.5 * unchunked_floor(lambda: vgg(batch_norm=True)))
    with pytest.raises(BudgetTooSmall, match=r"below .* every activation offloaded.*batch_chunks='auto' found no "
                                             r"module .*'net\.features': net\.features\.1 is a BatchNorm2d, whose "
                                             r"statistics would then cover a chunk"):
        fit(lambda: vgg(batch_norm=True), image_loader(), auto(budget), max_steps=2)


def test_a_budget_no_count_meets_says_what_was_tried():
    chunked = unchunked_floor()
    with pytest.raises(BudgetTooSmall, match=r"batch_chunks='auto' would run 'net\.features' in batch "
                                             r"chunks \(floors measured: 1 chunk: .*, 4 chunks: .*\), but no count up "
                                             r"to 16 is predicted .*: the rest of the peak is outside that module"):
        fit(vgg, image_loader(), auto(chunked + 1000, static=chunked), max_steps=3)
    with pytest.raises(BudgetTooSmall, match=r"floors measured: 1 chunk: [^,]*\), but no count up to 16 .*: even "
                                             r"if all of it shrank with the chunks"):
        fit(vgg, image_loader(), auto(1000), max_steps=3)  # not even 16 chunks of all of it: none tried


def test_chunk_layers_names_the_module_auto_may_split():
    budget = int(0.6 * unchunked_floor())
    strategy = auto(budget, chunk_layers="net.features")
    fit(vgg, image_loader(), strategy, max_steps=2)
    assert strategy.memory_report().chunk_layers == "net.features"
    with pytest.raises(ValueError, match=r"chunk_layers='net\.trunk' does not exist in Classifier"):
        fit(vgg, image_loader(), auto(budget, chunk_layers="net.trunk"), max_steps=2)


def test_refusals_name_what_mixes_or_redraws_the_batch():
    class Mixer(nn.Module):
        def forward(self, x):
            return x - x.mean(0)

    assert refusal(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()), "f") is None
    assert "f.1 is a Dropout(p=0.5), whose masks would be other draws" in refusal(
        nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), "f")
    assert refusal(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)), "f") is None
    assert "f.1 is a Mixer, not known to compute each sample on its own" in refusal(
        nn.Sequential(nn.Linear(2, 2), Mixer()), "f")
    assert refusal(nn.Sequential(Mixer()), "f", named=True) is None  # the user's module, theirs to vouch for


def test_the_count_is_the_fewest_the_measured_floors_allow():
    chunks = AutoChunks(nn.Module())
    chunks.tried = [Tried(1, 1000)]  # hoping all of it shrinks, with room for one more chunk's share
    assert chunks._next(1000) == 2 and chunks._next(600) == 4 and chunks._next(300) == 8
    assert chunks._next(30) is None  # not even 32 chunks
    chunks.tried.append(Tried(2, 700))  # 600 shrinks, 400 stays
    chunks._chunks = type("Applied", (), {"chunks": 2, "close": lambda self: None})()
    assert chunks._next(600) == 8  # 4 chunks would fit (550), 8 leave room (475 + 75)
    assert chunks._next(480) == 16 and chunks._next(430) == 32  # at all: no count leaves room
    assert chunks._next(400) is None
    chunks.batch = 4
    assert chunks._next(600) == 4 and chunks._next(500) is None  # no more chunks than samples


@pytest.mark.parametrize("kw, error, match", [
    (dict(batch_chunks="some"), TypeError, r"batch_chunks='some' must be an int or 'auto'"),
    (dict(batch_chunks=0), ValueError, r"batch_chunks=0 must be a positive integer"),
])
def test_bad_values_are_refused(kw, error, match):
    with pytest.raises(error, match=match):
        VDNNConfig(**kw)


def test_auto_is_the_default_and_other_entry_points_take_it_as_one():
    from lightning_vdnn.integrations.fabric import VDNNFabricStrategy

    assert VDNNConfig().batch_chunks == "auto" and VDNNConfig().fixed_chunks == 1
    assert VDNNConfig(chunk_layers="model.features").batch_chunks == "auto"
    VDNNFabricStrategy(config=VDNNConfig())  # "auto" never chunks where chunks are not built
    with pytest.raises(NotImplementedError, match=r"batch_chunks='auto' is built for VDNNStrategy .* not for "
                                                  r"VDNNFabricStrategy"):
        VDNNFabricStrategy(config=VDNNConfig(chunk_layers="model.features"))


def test_a_step_over_the_budget_is_named_in_the_new_plan_s_line(caplog):
    """A plan whose step peaks over the budget is replaced, and the new plan's line says by how much the old one
    missed: the measured and predicted peaks (the planner's error, which a user tuning a budget wants to see)."""

    class OverOnce(WorkingSet):  # the first step that runs a plan measures 64 MiB more than it holds
        over = True

        def read(self) -> int:
            planned = self.strategy._planner.plan is not None
            extra = 64 * 2**20 if planned and self.over else 0
            self.over = self.over and not planned
            self.readings.append(self.strategy._offloader.report().kept_bytes + extra)
            return self.readings[-1]

    strategy = VDNNStrategy("auto", min_offload_bytes=0, memory_budget=32 * 2**20)
    strategy.activation_meter = OverOnce(strategy)
    with caplog.at_level("INFO"):
        fit(vgg, image_loader(), strategy, max_steps=4)
    lines = [line for line in caplog.text.splitlines() if "auto plan" in line]
    assert "re-planned" not in lines[0]
    assert re.search(r"auto plan \(re-planned: the last plan's step peaked at 64\.\d+ MiB, predicted \d", lines[1])
    assert strategy.memory_report().budget_replans == 1
