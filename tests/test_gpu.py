"""On a CUDA device: the real streams, pinned pool and events. Skipped without CUDA; run with ``-m gpu``."""

from __future__ import annotations

import gc
import os
import re

import lightning as L

import pytest
import torch
import torch.nn.functional as F

from lightning_vdnn import VDNNStrategy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BATCH = int(os.environ.get("VDNN_GPU_TEST_BATCH", "128"))


class VGGTask(L.LightningModule):
    def __init__(self, name: str = "vgg16", steps_log: list | None = None) -> None:
        super().__init__()
        from lightning_vdnn.examples.models import VGG, VGGConfig

        self.net = VGG(VGGConfig.from_name(name))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x.to(memory_format=torch.channels_last)), y)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def images(n: int, batch: int, size: int = 224, classes: int = 1000) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def train(strategy, steps: int, name: str = "vgg16", batch: int = BATCH, size: int = 224, callbacks=()):
    L.seed_everything(0, verbose=False)
    module = VGGTask(name).to(memory_format=torch.channels_last)
    trainer = L.Trainer(strategy=strategy, accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, images(batch * steps, batch, size))
    return module, trainer, torch.cuda.max_memory_allocated()


def test_vgg16_all_peak_and_same_losses():
    """The issue asked for <= 40% of "none"; VGG-16 cannot get there by offload alone: the fp32 weights, grads
    and momentum (1.7 GiB) stay, and conv1_2's backward needs its input, its output grad and its input grad
    (3 x 0.8 GiB at batch 128) at once, plus the next layer prefetched. Measured on an H200: 70%."""
    ref, _, peak_none = train(VDNNStrategy("none"), 3)
    got, trainer, peak_all = train(VDNNStrategy("all"), 3)
    print(f"\nVGG-16 batch {BATCH}: peak none {peak_none / 2**30:.2f} GiB, all {peak_all / 2**30:.2f} GiB "
          f"({peak_all / peak_none:.0%})\n{trainer.strategy.memory_report()}")
    torch.testing.assert_close(torch.stack(got.losses), torch.stack(ref.losses), rtol=2e-2, atol=2e-2)
    assert peak_all <= 0.75 * peak_none


def test_vgg16_all_with_a_chunked_trunk_reaches_the_issues_peak():
    """The issue's 40% (and 35% on the benchmark's batch 256): with the conv trunk in 8 batch chunks, conv1_2's
    working set is an eighth of the batch's, and the fp32 weights, grads and momentum are what stays."""
    ref, _, peak_none = train(VDNNStrategy("none"), 3)
    got, trainer, peak = train(VDNNStrategy("all", batch_chunks=8, chunk_layers="net.features"), 3)
    print(f"\nVGG-16 batch {BATCH}: peak none {peak_none / 2**30:.2f} GiB, all + 8 chunks {peak / 2**30:.2f} GiB "
          f"({peak / peak_none:.0%})\n{trainer.strategy.memory_report()}")
    torch.testing.assert_close(torch.stack(got.losses), torch.stack(ref.losses), rtol=2e-2, atol=2e-2)
    assert peak <= 0.40 * peak_none


def test_gpt_all_and_conv_match_plain():
    from conftest import TokenLM, token_loader

    def run(strategy):
        L.seed_everything(0, verbose=False)
        m = TokenLM()
        L.Trainer(strategy=strategy, accelerator="gpu", devices=1, max_steps=3, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(m, token_loader(batch=8, seq=128))
        return m

    ref = run("auto")
    for policy in ("all", "conv"):
        got = run(VDNNStrategy(policy, min_offload_bytes=0))
        torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-4, atol=1e-5)
        for p, q in zip(got.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


def test_no_host_buffer_growth_over_50_steps():
    strategy = VDNNStrategy("all", min_offload_bytes=0)
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            r = trainer.strategy.memory_report()
            seen.append((r.host_allocations, r.host_pool_bytes, torch.cuda.memory_allocated()))

    L.seed_everything(0, verbose=False)
    module = VGGTask("vgg_tiny")
    L.Trainer(strategy=strategy, accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=50, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[Probe()]).fit(module, images(64 * 50, 64, 32, classes=10))
    assert len(seen) == 50
    assert seen[5][:2] == seen[-1][:2]  # no new pinned buffers after warm-up
    assert seen[-1][2] <= seen[5][2] * 1.01  # no device memory creeping up
    assert strategy.memory_report().pinned


class PhasePeaks(L.Callback):
    """Peak device memory of forward, backward and optimizer step, separately (diagnostics)."""

    def __init__(self) -> None:
        self.peaks: list[tuple[float, float, float]] = []
        self._fwd = self._bwd = 0.0

    def on_train_batch_start(self, *args):
        torch.cuda.reset_peak_memory_stats()

    def on_before_backward(self, *args):
        self._fwd = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    def on_after_backward(self, *args):
        self._bwd = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, *args):
        self.peaks.append((self._fwd, self._bwd, torch.cuda.max_memory_allocated() / 2**30))


@pytest.mark.parametrize("inflight", [2**28])
def test_vgg16_phase_peaks(inflight):
    """Where the peak of 'all' sits: forward (copies in flight), backward (a layer's working set) or the step."""
    for strategy in (VDNNStrategy("none"), VDNNStrategy("all", max_inflight_bytes=inflight)):
        probe = PhasePeaks()
        L.seed_everything(0, verbose=False)
        module = VGGTask("vgg16").to(memory_format=torch.channels_last)
        L.Trainer(strategy=strategy, accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=3,
                  logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[probe]).fit(module, images(BATCH * 3, BATCH))
        print(f"\n{strategy.config.activation_offload} inflight={inflight >> 20} MiB: peaks fwd/bwd/step GiB "
              + " ".join(f"{a:.2f}/{b:.2f}/{c:.2f}" for a, b, c in probe.peaks))
        assert len(probe.peaks) == 3


class DeepMLP(L.LightningModule):
    """Sixteen 4096-wide Linear-GELU-Dropout blocks at batch 4096: ~2.3 GiB of saved activations (fp32)."""

    def __init__(self, width: int = 4096, depth: int = 16) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(),
                                                             torch.nn.Dropout(0.1)) for _ in range(depth)])
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss = self.net(batch[0]).pow(2).mean()
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


def train_mlp(strategy, steps: int = 4, **kwargs):
    L.seed_everything(0, verbose=False)
    module = DeepMLP()
    data = torch.utils.data.TensorDataset(torch.randn(4096 * steps, 4096, generator=torch.Generator().manual_seed(0)))
    trainer = L.Trainer(strategy=strategy, accelerator="gpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4096))
    peak = torch.cuda.max_memory_allocated()
    for optimizer in trainer.optimizers:  # the trainer (kept alive by module.trainer) holds the momentum
        optimizer.state.clear()
    module.losses = [loss.cpu() for loss in module.losses]
    return module.cpu(), trainer, peak  # off the device: the next run's memory is its own


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_real_oom_lowers_the_budget_and_training_matches_plain(precision):
    """A budget above what the device can give (a per-process cap): the plan keeps too much, CUDA runs out of
    memory, the budget is lowered and the batch runs again; the run ends where plain training ends. Under
    ``16-mixed`` a backward OOM is retried from the precision plugin's ``backward``, on the scaled loss."""
    import warnings

    from lightning_vdnn.planning.oom_retry import BudgetLowered

    tol = dict(rtol=1e-4, atol=1e-6) if precision == "32-true" else dict(rtol=1e-3, atol=1e-5)
    ref, _, _ = train_mlp(VDNNStrategy("none"), precision=precision)
    _, _, floor = train_mlp(VDNNStrategy("all", min_offload_bytes=0), steps=1, precision=precision)
    gc.collect()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction((floor + 2**30) / total)  # 1 GiB above the all-offloaded peak
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, trainer, peak = train_mlp(VDNNStrategy("auto", min_offload_bytes=0, memory_budget=floor + 4 * 2**30),
                                           precision=precision)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    lowered = [str(w.message) for w in caught if issubclass(w.category, BudgetLowered)]
    report = trainer.strategy.memory_report()
    print(f"\nfloor {floor / 2**30:.2f} GiB, cap {(floor + 2**30) / 2**30:.2f} GiB, peak {peak / 2**30:.2f} GiB\n"
          + "\n".join(lowered) + f"\n{report}")
    # a batch whose backward ran out of memory ran training_step twice, with the same loss both times
    losses = [x for i, x in enumerate(got.losses) if i == 0 or not torch.equal(x, got.losses[i - 1])]
    assert lowered and len(losses) == len(ref.losses) == 4
    assert report.budget_bytes < floor + 2**30  # below the cap: lowered from where the device gave out
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref.losses), **tol)
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol)


def test_timeline_samples_device_memory_and_is_plotted(tmp_path, capsys):
    from lightning_vdnn.report.end_of_fit import TABLE_TITLE, TIMELINE_FILE

    # no logger here (train_mlp), so the PNG goes only where report_dir says
    _, trainer, peak = train_mlp(VDNNStrategy("auto", min_offload_bytes=0, memory_budget="6GiB", fit_report=True,
                                              report_dir=str(tmp_path)), default_root_dir=tmp_path)
    report = trainer.strategy.memory_report()
    phases = [s.phase for s in report.timeline]
    assert phases[0] == "forward" and "backward" in phases and phases == sorted(phases, key="forward".__ne__)
    assert max(s.allocated_bytes for s in report.timeline) <= peak
    assert all(r.forward_ms is not None and r.forward_ms >= 0 for r in report.layers)
    assert sum(r.forward_ms for r in report.layers) > 0
    out = capsys.readouterr().out
    print(out)
    assert TABLE_TITLE in out and (tmp_path / TIMELINE_FILE).read_bytes()[:4] == b"\x89PNG"


def test_auto_recomputes_on_cuda_exactly_and_keeps_the_budget(monkeypatch, caplog):
    """The three-way plan on the real streams: copies made expensive (injected times), a budget between the
    all-offloaded peak and plain's, so a plan recomputes a block; fp32 training equals plain, and the step the
    planner settles on stays within the budget, predicted on the safe side.

    Run 9 (with the warm-up pass): the plan kept 2 layers and recomputed 3, predicted 102.0 MiB and measured
    91.8 MiB within 105.9 MiB: over by 11% on this 100 MiB step, whose allocator rounding is a larger share than
    on the benchmark's models (gpt_1b at 75%: 0.8%; VGG-16 at 75%: 8.5%). Run 8 (profiled on the first step) had
    the recompute plan overshoot and fall back to the profiled plan."""
    import dataclasses

    from conftest import TokenLM, auto_against_plain, fit_on_gpu, token_loader
    from lightning_vdnn.offload.offloader import ActivationOffloader

    measured = ActivationOffloader.layer_profile
    monkeypatch.setattr(ActivationOffloader, "layer_profile", lambda self: [
        dataclasses.replace(p, transfer_ms=10 * p.forward_ms + 1.0, overlap_ms=0.0) for p in measured(self)])

    def run(strategy, steps=4):
        return fit_on_gpu(lambda: TokenLM(dropout=0.1), token_loader(batch=8, seq=128), strategy, steps)

    trainer, budget = auto_against_plain(run, 0.75, lambda: caplog.text)
    report = trainer.strategy.memory_report()
    assert re.search(r"auto plan: .*, [1-9]\d* are recomputed in backward", caplog.text)  # a recompute plan ran
    assert report.measured_peak_bytes <= budget
    assert report.measured_peak_bytes <= report.predicted_peak_bytes <= 1.15 * report.measured_peak_bytes


def test_the_profiled_layer_times_are_the_layers_compute():
    """The planner plans from layer times of a warmed-up step, with compute's waits for copies and for the host
    pinning its buffers left out (run 9: gpt_1b's first-step layers took 0.6-2 s each, so offloading looked free
    and no layer was recomputed). Here the profiled times must be close to the same layers' times once the pool
    is warm and the plan keeps them (VGG-16 at 75% of its plain peak: offload, keep and recompute all in play)."""
    class Profiled(L.Callback):
        def on_train_end(self, trainer, module):  # before teardown lets the planner go
            self.layers = list(trainer.strategy._planner._layers)

    _, _, plain_peak = train(VDNNStrategy("none"), steps=2)
    seen = Profiled()
    _, trainer, _ = train(VDNNStrategy("auto", memory_budget=int(0.75 * plain_peak)), steps=6, callbacks=[seen])
    profiled = seen.layers
    steady = trainer.strategy.memory_report().layers
    print("\nprofiled", [round(p.forward_ms, 2) for p in profiled], "\nsteady", [r.forward_ms for r in steady])
    assert len(profiled) == len(steady)
    for p, row in zip(profiled[1:], steady[1:]):
        assert row.forward_ms is not None
        assert p.forward_ms <= 2 * row.forward_ms + 2.0, (row.name, p.forward_ms, row.forward_ms)
    assert sum(p.forward_ms for p in profiled) < 1000.0  # the whole forward: ~25 ms of compute on an H200


def test_model_free_offload_matches_plain_and_frees_forward_memory():
    """``with offload_activations(policy="all"):`` without a model, on the real streams: the gradients of plain
    autograd, far less device memory held after forward, and backward's copies prefetched."""
    from torch import nn

    from lightning_vdnn import offload_activations

    def run(around):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(2048, 2048), nn.GELU()) for _ in range(8)]).cuda()
        x = torch.randn(4096, 2048, device="cuda")
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with around():
            loss = model(x).square().mean()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        loss.backward()
        return [p.grad for p in model.parameters()], held

    ref, plain = run(lambda: torch.enable_grad())
    off = offload_activations(policy="all", max_inflight_bytes=2**26)
    got, offloaded = run(lambda: off)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    off.step_done()
    report = off.report()
    off.close()
    print(f"held after forward: plain {plain / 2**20:.0f} MiB, offloaded {offloaded / 2**20:.0f} MiB; {report}")
    assert offloaded < 0.4 * plain and report.offloaded_bytes > 0.5 * plain and report.prefetched_bytes > 0


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda")])
def test_a_device_given_without_its_index_still_offloads(device):
    """``ActivationOffloader(torch.device("cuda"))`` (its docstring's example) and ``offload_activations(model,
    device="cuda")``: saved tensors say ``cuda:0``, and a device compared without its index moved nothing."""
    from torch import nn

    from lightning_vdnn import offload_activations
    from lightning_vdnn.offload.offloader import ActivationOffloader

    model = nn.Sequential(*[nn.Sequential(nn.Linear(1024, 1024), nn.GELU()) for _ in range(4)]).cuda()
    x = torch.randn(2048, 1024, device="cuda")
    offloader = ActivationOffloader(device, policy="all")
    offloader.attach(model)
    with offloader.capture():
        loss = model(x).square().mean()
    loss.backward()
    offloader.finish_pass()
    assert offloader.report().offloaded_bytes > 4 * 2048 * 1024 * 4
    offloader.close()
    handle = offload_activations(model, device=device, policy="all")
    with handle:
        loss = model(x).square().mean()
    loss.backward()
    handle.step_done()
    assert handle.report().offloaded_bytes > 4 * 2048 * 1024 * 4
    handle.close()


def test_lean_layers_on_cuda_are_exact_and_hold_less_after_forward():
    """``offload/pointwise.py`` on the real kernels: GELU's output made again in backward is bitwise what forward
    made (bf16 autocast), and what forward leaves on the device is less by those outputs."""
    from lightning_vdnn.examples.models import GPT, GPTConfig
    from lightning_vdnn.offload.offloader import ActivationOffloader

    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=512, block_size=256, n_layer=4, n_head=8, n_embd=512, dropout=0.0)).cuda()
    x = torch.randint(0, 512, (8, 256), device="cuda")
    off = ActivationOffloader(torch.device("cuda"), "all", min_offload_bytes=0, watch_pointwise=True)
    off.attach(net, net.blocks)
    every = frozenset(range(len(net.blocks) + 1))

    def step(lean, keep=every):
        net.zero_grad(set_to_none=True)
        off.set_plan(keep, lean=lean)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with off.capture(), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(x).float().square().mean()
        held = torch.cuda.memory_allocated() - base
        loss.backward()
        off.finish_pass()
        return [p.grad.clone() for p in net.parameters()], held

    off.watch = True
    step((), keep=None)  # as the planner's profile: all offloaded (freed storages' addresses are reused)
    off.watch = False
    outputs = 8 * 256 * net.config.mlp_hidden * 2  # a block's bf16 GELU output
    assert [p.pointwise_bytes for p in off.layer_profile()] == [0] + [outputs] * len(net.blocks)
    ref, full = step(())
    got, lean = step(every)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    # the caching allocator's blocks: what else forward holds may land a block apart
    assert abs(full - lean - len(net.blocks) * outputs) <= 2 * 2**20, (full, lean, outputs)
    off.close()
