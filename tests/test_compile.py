"""Compiled models: a tiny Hugging Face Llama, compiled as a whole (``torch.compile(model)``) or block by block
(``block.compile()``), trains under ``vdnn_all``, ``vdnn`` and ``l2l`` exactly as compiled plain training does, our
hooks leave no graph break in it, and no step after the first compiles anything.

Compiled with ``backend="aot_eager"``: Dynamo and AOTAutograd run as with inductor (the graphs, the guards, the
saved-tensor hooks at run time); inductor's code generation, which these tests do not touch, would take minutes on
two CPU cores.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

pytest.importorskip("transformers")

from conftest import fit, token_loader  # noqa: E402
import lightning_vdnn  # noqa: E402
from lightning_vdnn import VDNNStrategy  # noqa: E402
from lightning_vdnn.compiled import CallBoundary, compiled_leaves, register_call_hooks  # noqa: E402
from lightning_vdnn.examples.hf_tasks import build_causal_lm  # noqa: E402

PACKAGE = str(Path(lightning_vdnn.__file__).parent)
BACKEND = "aot_eager"


class CompiledLlama(L.LightningModule):
    """A 2-block Llama (``shape``: other config values), compiled ``"whole"`` (the training step calls
    ``torch.compile(model)``) or ``"regional"`` (each decoder layer ``.compile()``d, the module tree unchanged), or
    not at all (``"eager"``); records its losses and the graphs compiled by the end of each step."""

    def __init__(self, how: str, backend: str = BACKEND, lr: float = 1e-2, **shape) -> None:
        super().__init__()
        self.lr = lr
        self.model = build_causal_lm("llama_tiny", **{**dict(num_hidden_layers=2, hidden_size=64,
                                                              intermediate_size=128), **shape})
        self.run = self.model
        if how == "whole":
            self.run = torch.compile(self.model, backend=backend)
        elif how == "regional":
            for block in self.model.model.layers:
                block.compile(backend=backend)
        self.losses: list[float] = []
        self.graphs: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.run(input_ids=x).logits.flatten(0, 1), y.flatten())
        self.losses.append(loss.item())
        return loss

    def on_train_batch_end(self, *args) -> None:
        self.graphs.append(counters["stats"]["unique_graphs"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class GraphBreaks(logging.Handler):
    """The graph breaks Dynamo reports while it is installed: (file:line of the break, the log message)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.breaks: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        where = re.search(r"Graph break.* in user code at (\S+)", message)
        if where:
            self.breaks.append((where.group(1), message))

    def ours(self) -> list[str]:
        """Breaks in this package's code: the ones a test wants at zero."""
        return [m for where, m in self.breaks if where.startswith(PACKAGE)]


@contextlib.contextmanager
def dynamo_watch():
    """Fresh Dynamo caches and counters; yields the graph breaks seen meanwhile."""
    torch._dynamo.reset()
    counters.clear()
    handler = GraphBreaks()
    torch._logging.set_logs(graph_breaks=True)
    # the artifact's loggers (``<module>.__graph_breaks``) do not propagate: the handler goes on each
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.endswith(".__graph_breaks")]
    assert loggers, "no graph_breaks logger: torch._logging has changed"
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()


_plain: dict[str, tuple] = {}


def train(how: str, strategy, steps: int = 2):
    with dynamo_watch() as breaks:
        module, trainer = fit(lambda: CompiledLlama(how), token_loader(n=8, batch=4, seq=16), strategy=strategy,
                              max_steps=steps)
    return module, breaks, trainer


def plain(how: str):
    if how not in _plain:
        _plain[how] = train(how, "auto")[:2]
    return _plain[how]


def assert_same_training(a: CompiledLlama, b: CompiledLlama) -> None:
    assert a.losses == pytest.approx(b.losses, rel=1e-5, abs=1e-6)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, p), q in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("how, policy", [("whole", "all"), ("regional", "all"), ("regional", "auto")])
def test_offload_trains_a_compiled_model_exactly_without_breaks_or_recompiles(one_thread, how, policy):
    """Saved-tensor hooks run at run time on what the compiled graphs save; the layer marks run around each
    compiled block (regional: backward still prefetches block by block) and do nothing inside a compiled region."""
    ref, ref_breaks = plain(how)
    module, breaks, trainer = train(how, VDNNStrategy(activation_offload=policy, min_offload_bytes=0))
    assert_same_training(module, ref)
    assert breaks.ours() == [], breaks.ours()[0]
    assert len(breaks.breaks) == len(ref_breaks.breaks) == 0
    assert module.graphs == ref.graphs  # no more graphs than plain, none after the first step
    report = trainer.strategy.memory_report()
    names = [row.name for row in report.layers]
    if how == "regional":  # each compiled block is one layer, nothing inside it is
        assert [n for n in names if n.startswith("model.model.layers.")] == ["model.model.layers.0",
                                                                            "model.model.layers.1"], names
    if policy == "all":
        assert report.offloaded_bytes > 0


def recompute_the_last_block(layers, floor, budget, granule=1, forward_peak=None):
    """A solver that recomputes the last recomputable layer (the last compiled block: the first one saves the
    rotary tables the second takes, ``offload/recompute_probe.py``) and keeps the rest."""
    from lightning_vdnn.planning.activation_solver import _plan

    fit_ = [i for i, layer in enumerate(layers) if layer.recompute_bytes is not None]
    assert fit_, "no compiled block may be recomputed"
    base = floor if forward_peak is None else min(forward_peak, floor)
    chosen = frozenset(fit_[-1:])
    return _plan(layers, frozenset(range(len(layers))) - chosen, chosen, floor, base, budget, ())


def test_a_compiled_block_is_recomputed_around_its_compiled_call(one_thread, monkeypatch):
    """A plan that recomputes a block compiled by itself runs the checkpoint around the compiled call: the same
    training as compiled plain, no graph break, no graph beyond plain's, the user's compiled call back after fit."""
    from lightning_vdnn.planning import activation_plan

    monkeypatch.setattr(activation_plan, "solve_layers", recompute_the_last_block)
    ref, _ = plain("regional")
    # torch's partitioner budget left alone: this test is about the recompute around the compiled call
    module, breaks, trainer = train("regional", VDNNStrategy("auto", min_offload_bytes=0, memory_budget=2**40,
                                                             compiled_activation_budget=None))
    assert_same_training(module, ref)
    assert breaks.breaks == [] and module.graphs == ref.graphs
    report = trainer.strategy.memory_report()
    assert report.recomputed_forwards >= 1, report
    for block in module.model.model.layers:
        assert not isinstance(block._compiled_call_impl, CallBoundary) and "forward" not in vars(block)


def test_a_compiled_block_is_one_leaf():
    module = CompiledLlama("regional")
    leaves, blocks = compiled_leaves(module), list(module.model.model.layers)
    assert all(any(b is m for m in leaves) for b in blocks)
    assert not any(m is inner for m in leaves for b in blocks for inner in b.modules() if inner is not b)


#: one streamed block saves its activations (a compiled forward with autograd, under the slot's and the
#: offloader's saved-tensor hooks), the other recomputes
SAVING = dict(layer_streaming=True, activation_offload="all", min_offload_bytes=0, saved_blocks=1)


@pytest.mark.parametrize("how, options", [("whole", None), ("regional", None), ("regional", SAVING)],
                         ids=["whole", "regional", "regional-saving-offloaded"])
def test_l2l_trains_a_compiled_model_exactly(one_thread, how, options):
    """Layer streaming runs each compiled block's compiled call from its slot: no break, one graph per block class
    (forward runs with autograd as plain training does, its saves dropped, and the recompute runs the same graph),
    none after the first step. A model compiled as a whole breaks
    at each streamed block call, by design (the call is ``torch.compiler.disable``d), and at nothing of ours."""
    ref, _ = plain(how)
    module, breaks, trainer = train(how, "l2l" if options is None else VDNNStrategy(**options))
    assert_same_training(module, ref)
    assert breaks.ours() == [], breaks.ours()[0]
    assert module.graphs[0] == module.graphs[-1]
    if options is not None:
        assert trainer.strategy.memory_report().offloaded_bytes > 0
    if how == "regional":
        assert breaks.breaks == [] and module.graphs[-1] == 1
        for block in module.model.model.layers:  # the user's compiled call back after fit
            assert block._compiled_call_impl is not None and not isinstance(block._compiled_call_impl, CallBoundary)
            assert "forward" not in vars(block)
    else:
        assert any("torch.compiler.disable" in m for _, m in breaks.breaks)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_compiled_blocks_with_hooked_modules_inside_stream_eagerly_like_compiled_plain(one_thread, microbatches):
    """A Mixtral trained with its load-balancing loss: transformers records the router logits with hooks inside
    each compiled layer. Layer streaming runs such blocks eagerly (one warning), so that the logits reach
    backward and are one tensor per layer under microbatches; the gradients are compiled plain training's."""
    from transformers import MixtralConfig, MixtralForCausalLM

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        model = MixtralForCausalLM(MixtralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True))
        for layer in model.model.layers:
            layer.compile(backend=BACKEND)
        return model

    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    ref, got = build(), build()
    streamer = lightning_vdnn.stream_layers(got, torch.optim.SGD(got.parameters(), lr=0.1), device="cpu",
                                            pin_memory=False, microbatches=microbatches)
    with pytest.warns(UserWarning, match=r"MixtralDecoderLayer is compiled by itself, and modules inside it have "
                                         r"forward hooks"):
        out = got(input_ids=ids, labels=ids)
    theirs = ref(input_ids=ids, labels=ids)
    assert len(out.router_logits) == len(theirs.router_logits) == 2
    torch.testing.assert_close(out.aux_loss, theirs.aux_loss)
    out.loss.backward()
    theirs.loss.backward()
    streamer.close()
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy, rel", [("vdnn_all", 1e-4), ("l2l", 2e-2)])
def test_gpu_compiled_blocks_with_inductor(strategy, rel):
    """On a GPU, inductor, bf16: compiled blocks train as compiled plain (l2l's slots hold bf16 weights, plain
    casts them under autocast: rounding apart), with no graph break of ours."""
    def run(name):
        with dynamo_watch() as breaks:
            module, _ = fit(lambda: CompiledLlama("regional", "inductor"), token_loader(n=16, batch=4, seq=64),
                            strategy=name if name == "auto" else VDNNStrategy(
                                **{"vdnn_all": dict(activation_offload="all", min_offload_bytes=0),
                                   "l2l": dict(layer_streaming=True, activation_offload="none")}[name]),
                            accelerator="gpu", precision="bf16-mixed", max_steps=4)
        return module, breaks

    ref, _ = run("auto")
    module, breaks = run(strategy)
    assert module.losses == pytest.approx(ref.losses, rel=rel)
    assert breaks.ours() == [] and module.graphs[1] == module.graphs[-1]


def test_call_hooks_run_around_a_compiled_call_and_come_off():
    layer = torch.nn.Linear(4, 4)
    layer.compile(backend="eager")
    compiled = layer._compiled_call_impl
    seen = []
    first = register_call_hooks(layer, lambda m, a, k: seen.append(("pre", torch.compiler.is_compiling())),
                                lambda m, a, out: seen.append(("post", torch.compiler.is_compiling())))
    second = register_call_hooks(layer, lambda m, a, k: seen.append(("pre2", False)))
    with dynamo_watch():
        out = layer(torch.ones(2, 4))
    assert seen == [("pre", False), ("pre2", False), ("post", False)]  # eagerly, once, outside the compiled region
    torch.testing.assert_close(out, torch.nn.functional.linear(torch.ones(2, 4), layer.weight, layer.bias))
    first.remove()
    assert isinstance(layer._compiled_call_impl, CallBoundary)
    second.remove()
    assert layer._compiled_call_impl is compiled
