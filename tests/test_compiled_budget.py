"""Compiled blocks that shed their own saves (``planning/compiled_budget.py``): where the ``"auto"`` planner's first
plan recomputes compiled blocks whole, torch's partitioner budget is lowered by what those recomputes shed, the
blocks compile again and save less, and the planner plans again; the training stays compiled plain's.

CPU tests compile with ``backend="aot_eager_decomp_partition"``: AOTAutograd's min-cut partitioner, which honours
the budget, with eager kernels (inductor's code generation would take minutes on two cores)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from conftest import fit, token_loader  # noqa: E402
from test_compile import CompiledLlama, assert_same_training, dynamo_watch, recompute_the_last_block  # noqa: E402

from lightning_vdnn import VDNNStrategy  # noqa: E402
from lightning_vdnn.config import VDNNConfig  # noqa: E402
from lightning_vdnn.integrations.adapters.torch import partitioner_budget, set_partitioner_budget  # noqa: E402
from lightning_vdnn.offload.trace import LayerProfile  # noqa: E402
from lightning_vdnn.planning import compiled_budget  # noqa: E402
from lightning_vdnn.planning.activation_solver import Plan  # noqa: E402
from lightning_vdnn.planning.compiled_budget import (LEAST, MAX_COMPILES, CompiledBudget, compiled_target,  # noqa: E402
                                                     next_budget)

PARTITIONING = "aot_eager_decomp_partition"
MB = 2**20


def plan_recomputing(*layers: int, selective: tuple[int, ...] = (), room: int = 0) -> Plan:
    return Plan(kept=frozenset(), offloaded_bytes=0, kept_bytes=0, predicted_peak=1000 * MB - room,
                budget=1000 * MB, recomputed=frozenset(layers), selective=frozenset(selective))


PROFILE = [LayerProfile(10 * MB), LayerProfile(100 * MB, recompute_bytes=10 * MB),
           LayerProfile(100 * MB, recompute_bytes=10 * MB), LayerProfile(40 * MB, recompute_bytes=40 * MB)]
COMPILED = [False, True, True, False]
#: the same layers compiled again under a lower budget: the compiled blocks save 40 MB each
LEANER = [PROFILE[0], LayerProfile(40 * MB, recompute_bytes=10 * MB), LayerProfile(40 * MB, recompute_bytes=10 * MB),
          PROFILE[3]]


def test_the_target_is_what_the_plan_can_hold_of_the_compiled_layers():
    # one of two compiled blocks recomputed whole sheds 90 of the 200 MB they save
    assert compiled_target(plan_recomputing(2), PROFILE, COMPILED) == 110 * MB
    assert compiled_target(plan_recomputing(2, room=30 * MB), PROFILE, COMPILED) == 140 * MB  # room under the budget
    assert compiled_target(plan_recomputing(3), PROFILE, COMPILED) == 200 * MB  # an eager layer's recompute
    assert compiled_target(plan_recomputing(2, selective=(2,)), PROFILE, COMPILED) == 200 * MB  # not whole
    unbounded = Plan(kept=frozenset(), offloaded_bytes=0, kept_bytes=0, predicted_peak=MB, budget=2**62)
    assert compiled_target(unbounded, PROFILE, COMPILED) == 200 * MB  # no budget: no room counted
    with pytest.raises(ValueError, match="3 compiled flags for 4 layers"):
        compiled_target(plan_recomputing(2), PROFILE, COMPILED[:3])


def test_the_next_budget_is_read_off_what_the_layers_saved():
    assert next_budget([(1.0, 200)], 110) == pytest.approx(0.55)  # through (0, 0) first
    assert next_budget([(1.0, 200)], 50) == LEAST  # never below LEAST
    assert next_budget([(0.8, 200)], 400) == 1.0  # nor above 1
    # then through the last two seen: 0.55 saved 80, so 110 lies 30/120 of the way back to 1.0
    assert next_budget([(1.0, 200), (0.55, 80)], 110) == pytest.approx(0.55 + 0.45 * 30 / 120)
    assert next_budget([(1.0, 200), (0.6, 200)], 110) == 0.6  # the budget changed nothing: stay
    with pytest.raises(ValueError, match="profile the compiled layers first"):
        next_budget([], 110)


@pytest.fixture
def torch_budget():
    """torch's partitioner budget as found, put back after the test whatever it did."""
    found = partitioner_budget()
    yield found
    set_partitioner_budget(found)


def test_a_number_holds_for_the_run_and_the_setting_found_comes_back(torch_budget):
    budget = CompiledBudget(0.3)
    budget.start()
    assert partitioner_budget() == 0.3 and budget.applied == 0.3
    assert not budget.adjust_for(plan_recomputing(1, 2), PROFILE, COMPILED)  # a number is not adjusted
    budget.stop()
    assert partitioner_budget() == torch_budget


def test_auto_sets_a_budget_then_corrects_it_once_from_what_the_blocks_saved(torch_budget, monkeypatch):
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    budget = CompiledBudget("auto")
    budget.start()
    assert partitioner_budget() == torch_budget and budget.applied is None
    assert not budget.adjust_for(plan_recomputing(3), PROFILE, COMPILED)  # recomputes no compiled layer
    assert not budget.adjust_for(plan_recomputing(2), PROFILE, [False] * 4)  # no compiled layer
    assert budget.adjust_for(plan_recomputing(2), PROFILE, COMPILED) and resets == [1]
    assert partitioner_budget() == pytest.approx(0.55) == budget.applied
    # compiled again, the blocks save 80 MB and the plan keeps them with 30 MB to spare: 110 MB may be saved
    assert budget.adjust_for(plan_recomputing(room=30 * MB), LEANER, COMPILED) and resets == [1, 1]
    assert partitioner_budget() == pytest.approx(0.55 + 0.45 * 30 / 120) and budget.compiles == MAX_COMPILES == 2
    assert not budget.adjust_for(plan_recomputing(1, 2), LEANER, COMPILED) and len(resets) == 2  # no more
    budget.stop()
    assert partitioner_budget() == torch_budget


def test_the_correction_reads_the_room_off_the_measured_peak(torch_budget, monkeypatch):
    """The planner's predicted peak errs high: once a plan has run its checked steps, its measured peak says how much
    room the compiled layers have."""
    monkeypatch.setattr(torch.compiler, "reset", lambda: None)
    budget = CompiledBudget("auto")
    budget.start()
    assert budget.adjust_for(plan_recomputing(2), PROFILE, COMPILED)  # 0.55
    tight = plan_recomputing(room=2 * MB)  # predicted 2 MB under its budget: not worth compiling again for ...
    assert not budget.adjust_for(tight, LEANER, COMPILED)
    assert budget.adjust_for(tight, LEANER, COMPILED, peak=tight.budget - 30 * MB)  # ... measured 30 MB under
    assert partitioner_budget() == pytest.approx(0.55 + 0.45 * 30 / 120)
    budget.stop()


def test_auto_leaves_a_budget_that_is_close_enough(torch_budget, monkeypatch):
    monkeypatch.setattr(torch.compiler, "reset", lambda: None)
    budget = CompiledBudget("auto")
    budget.start()
    assert budget.adjust_for(plan_recomputing(2), PROFILE, COMPILED)
    assert not budget.adjust_for(plan_recomputing(room=2 * MB), LEANER, COMPILED)  # 0.55 -> 0.56: not worth it
    assert budget.compiles == 1 and partitioner_budget() == pytest.approx(0.55)
    budget.stop()


def test_none_leaves_torch_alone(torch_budget, monkeypatch):
    monkeypatch.setattr(torch.compiler, "reset", lambda: pytest.fail("None must not drop compiled code"))
    budget = CompiledBudget(None)
    budget.start()
    assert not budget.adjust_for(plan_recomputing(1, 2), PROFILE, COMPILED)
    set_partitioner_budget(0.7)  # the user's own change while it ran stays
    budget.stop()
    assert partitioner_budget() == 0.7


@pytest.mark.parametrize("bad, error, message", [
    (1.5, ValueError, r"must be in \[0, 1\]"), (-0.1, ValueError, r"must be in \[0, 1\]"),
    ("half", TypeError, "a number in \\[0, 1\\], 'auto' or None"), (True, TypeError, "'auto' or None")])
def test_bad_settings_are_refused(bad, error, message):
    with pytest.raises(error, match=message):
        VDNNConfig(compiled_activation_budget=bad)
    with pytest.raises(error, match=message):
        VDNNStrategy(compiled_activation_budget=bad)


class MLP(torch.nn.Module):
    """A block of the user's own class (Dynamo runs ``torch.nn`` containers' own calls eagerly)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(64), torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def test_a_lower_budget_makes_a_compiled_block_save_less(torch_budget):
    """What the mechanism rests on (``adapters/torch.py``): torch's setting changes what a compiled graph saves. If
    this fails, torch has renamed or dropped ``activation_memory_budget``."""
    def saved_bytes(budget: float) -> int:
        torch.compiler.reset()
        set_partitioner_budget(budget)
        torch.manual_seed(0)
        block = MLP()
        block.compile(backend=PARTITIONING)
        weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(torch.randn(512, 64, requires_grad=True)).sum().backward()
        return sum(seen.values())

    full, least = saved_bytes(1.0), saved_bytes(0.0)
    torch.compiler.reset()
    assert least < 0.5 * full, (least, full)


def test_a_plan_recomputing_compiled_blocks_gives_way_to_the_partitioner(one_thread, torch_budget, monkeypatch):
    """A plan that recomputes a compiled block whole (every plan, from the solver below) makes the fit lower torch's
    budget, compile the blocks again and profile again, at most ``MAX_COMPILES`` times: the blocks then save less,
    the strategy reports the budget it set, and the training is compiled plain's (the partitioner's recompute runs
    the same eager kernels). torch's setting is back after fit."""
    from lightning_vdnn.planning import activation_plan

    seen: list[list[LayerProfile]] = []

    def solver(layers, *args, **kwargs):  # a plan that needs its recompute: predicted at its budget, no room
        seen.append(list(layers))
        plan = recompute_the_last_block(layers, *args, **kwargs)
        return dataclasses.replace(plan, predicted_peak=plan.budget)

    monkeypatch.setattr(activation_plan, "solve_layers", solver)
    with dynamo_watch() as ref_breaks:
        ref, _ = fit(lambda: CompiledLlama("regional", PARTITIONING), token_loader(n=8, batch=4, seq=16),
                     max_steps=6)
    with dynamo_watch() as breaks:
        module, trainer = fit(lambda: CompiledLlama("regional", PARTITIONING), token_loader(n=8, batch=4, seq=16),
                              strategy=VDNNStrategy("auto", min_offload_bytes=0, memory_budget=2**40), max_steps=6)
    assert_same_training(module, ref)
    assert breaks.ours() == [] and len(breaks.breaks) == len(ref_breaks.breaks) == 0
    report = trainer.strategy.memory_report()
    assert LEAST <= report.compiled_activation_budget < 1.0
    compiles = trainer.strategy._compiled_budget.compiles
    assert 1 <= compiles <= MAX_COMPILES and len(seen) == compiles + 1, "a plan before each compile, one after"
    blocks = [g for g, row in enumerate(report.layers) if row.name.startswith("model.model.layers.")]
    assert len(blocks) == 2
    before, after = (sum(layers[g].saved_bytes for g in blocks) for layers in (seen[0], seen[1]))
    assert after < before, (before, after)
    assert partitioner_budget() == torch_budget
    assert "compiled modules       saved under torch's partitioner budget" in str(report)


def test_a_fit_without_a_compiled_block_never_drops_compiled_code(one_thread, monkeypatch):
    from lightning_vdnn.planning import activation_plan

    monkeypatch.setattr(activation_plan, "solve_layers", recompute_the_last_block)
    monkeypatch.setattr(compiled_budget.torch.compiler, "reset", lambda: pytest.fail("nothing compiled to drop"))
    _, trainer = fit(lambda: CompiledLlama("eager"), token_loader(n=8, batch=4, seq=16),
                     strategy=VDNNStrategy("auto", min_offload_bytes=0, memory_budget=2**40), max_steps=3)
    assert trainer.strategy.memory_report().compiled_activation_budget is None


class ConvBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


class Stack(torch.nn.Module):
    """Three compiled blocks of the user's own class (``MLP``, or ``ConvBlock`` with BatchNorm, whose running
    statistics must be updated once a step, not again by the partitioner's recompute): the repeated layers the plain
    loop's planner plans by."""

    def __init__(self, block: type = MLP) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(block() for _ in range(3))
        for b in self.blocks:
            b.compile(backend=PARTITIONING)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=3, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    for block in model.transformer.h:
        block.compile(backend=PARTITIONING)
    return model


#: model, a batch for step ``i``, its loss, the setting. A layer holding running statistics is never recomputed
#: whole (``offload/recompute_probe.py``), so ``"auto"`` has nothing to replace in the CNN: it runs at a fixed budget,
#: the partitioner recomputing inside its BatchNorm blocks from the first step.
MODELS = {
    "own MLP blocks": (Stack, lambda g: torch.randn(64, 64, generator=g), lambda m, x: m(x).square().mean(), "auto"),
    "BatchNorm CNN": (lambda: Stack(ConvBlock), lambda g: torch.randn(8, 8, 12, 12, generator=g),
                      lambda m, x: m(x).square().mean(), 0.5),
    "transformers GPT-2": (_gpt2, lambda g: torch.randint(128, (4, 16), generator=g),
                           lambda m, x: m(input_ids=x, labels=x).loss, "auto"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_plain_loop_gives_way_to_the_partitioner_too(one_thread, torch_budget, monkeypatch, name):
    """``offload_activations`` (Fabric and Accelerate run it) drives the same budget, on models of the user's own
    and a library's: losses, parameters and buffers (BatchNorm's running statistics) are the plain loop's, bit for
    bit; the handle reports the budget it set, and closing it puts torch's setting back."""
    from lightning_vdnn import offload_activations
    from lightning_vdnn.planning import activation_plan

    build, batch, loss_of, setting = MODELS[name]

    def solver(layers, *args, **kwargs):
        plan = recompute_the_last_block(layers, *args, **kwargs)
        return dataclasses.replace(plan, predicted_peak=plan.budget)

    if setting == "auto":  # plans that need their recompute of a compiled block
        monkeypatch.setattr(activation_plan, "solve_layers", solver)

    def train(offload: bool) -> tuple[torch.nn.Module, list, list]:
        torch.compiler.reset()
        torch.manual_seed(0)
        model, reports, losses = build(), [], []
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(6):
            x = batch(torch.Generator().manual_seed(step))
            opt.zero_grad()
            off = offload_activations(model, "auto", min_offload_bytes=0, memory_budget=2**40,
                                      compiled_activation_budget=setting) if offload else contextlib.nullcontext()
            with off:
                loss = loss_of(model, x)
            loss.backward()
            losses.append(loss.item())
            if offload:
                off.step_done()
                reports.append(off.report())
            opt.step()
        if offload:
            off.close()
        return model, reports, losses

    ref, _, ref_losses = train(False)
    model, reports, losses = train(True)
    assert losses == ref_losses
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
    buffers = list(zip(model.named_buffers(), ref.buffers()))
    for (n, b), c in buffers:
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
    if name == "BatchNorm CNN":
        assert any(n.endswith("num_batches_tracked") and int(b) == 6 for (n, b), _ in buffers)
    if setting == "auto":
        assert LEAST <= reports[-1].compiled_activation_budget < 1.0
    else:
        assert reports[-1].compiled_activation_budget == setting
    assert partitioner_budget() == torch_budget
