"""Compiled blocks under a memory budget on CUDA with inductor (``planning/compiled_budget.py``): where the first
plan recomputes compiled blocks whole, the fit lowers torch's partitioner budget, inductor compiles the blocks again
and they save less; the training stays compiled plain's and the budget is kept. The CPU tests run the partitioner
with eager kernels (``tests/test_compiled_budget.py``); this is the real compiler and allocator."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch

pytest.importorskip("transformers")

from conftest import fit_on_gpu, token_loader  # noqa: E402
from test_compile import CompiledLlama  # noqa: E402

from lightning_vdnn import VDNNStrategy  # noqa: E402
from lightning_vdnn.integrations.adapters.torch import partitioner_budget  # noqa: E402
from lightning_vdnn.offload.offloader import ActivationOffloader  # noqa: E402
from lightning_vdnn.planning import activation_plan  # noqa: E402
from lightning_vdnn.planning.compiled_budget import LEAST, MAX_COMPILES  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def InductorLlama() -> CompiledLlama:
    """An HF Llama whose decoder layers are each ``.compile()``d with inductor (torch's default backend), fp32."""
    return CompiledLlama("regional", "inductor", lr=1e-3, num_hidden_layers=4, hidden_size=512,
                         intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8)


class FloorSeen(L.Callback):
    def on_train_end(self, trainer, module):  # before teardown lets the planner go
        self.bytes = trainer.strategy._planner.floor


def test_inductor_blocks_save_less_under_the_partitioner_budget_and_train_as_compiled_plain(monkeypatch):
    """Copies made expensive (injected times) and a budget halfway from the planner's all-offloaded peak to compiled
    plain's, so the first plan recomputes compiled blocks whole: the fit then sets torch's budget, the blocks compiled
    again save less, the training is compiled plain's, the measured peak keeps the budget and torch's setting is back
    after fit."""
    found = partitioner_budget()
    measured = ActivationOffloader.layer_profile
    monkeypatch.setattr(ActivationOffloader, "layer_profile", lambda self: [
        dataclasses.replace(p, transfer_ms=10 * p.forward_ms + 1.0, overlap_ms=0.0) for p in measured(self)])
    seen = []
    solve = activation_plan.solve_layers

    def recorded(layers, *args, **kwargs):
        seen.append(list(layers))
        return solve(layers, *args, **kwargs)

    monkeypatch.setattr(activation_plan, "solve_layers", recorded)

    def run(strategy, steps, **kwargs):
        torch.compiler.reset()
        return fit_on_gpu(InductorLlama, token_loader(n=64, batch=16, seq=512), strategy, steps, **kwargs)

    ref, _, plain_peak = run(VDNNStrategy("none", min_offload_bytes=0), 8)
    floor = FloorSeen()  # the planner's all-offloaded peak, at a budget it need not act on
    run(VDNNStrategy("auto", min_offload_bytes=0, memory_budget=plain_peak, compiled_activation_budget=None), 4,
        callbacks=[floor])
    assert floor.bytes < plain_peak, (floor.bytes, plain_peak)
    budget = floor.bytes + int(0.5 * (plain_peak - floor.bytes))
    print(f"\nplain {plain_peak / 2**20:.1f} MiB, floor {floor.bytes / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB")
    seen.clear()
    got, trainer, _ = run(VDNNStrategy("auto", min_offload_bytes=0, memory_budget=budget), 8)
    report = trainer.strategy.memory_report()
    compiles = trainer.strategy._compiled_budget.compiles
    print(f"compiles {compiles}\n{[r.decision for r in report.layers]}\n{report}")

    assert 1 <= compiles <= MAX_COMPILES and LEAST <= report.compiled_activation_budget < 1.0
    blocks = [g for g, row in enumerate(report.layers) if row.name.startswith("model.model.layers.")]
    assert len(blocks) == 4
    before, after = (sum(layers[g].saved_bytes for g in blocks) for layers in (seen[0], seen[-1]))
    assert after < 0.9 * before, (before, after)
    assert report.measured_peak_bytes <= 1.02 * budget
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert partitioner_budget() == found
