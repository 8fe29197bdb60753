"""L2L layer streaming on two CPU ranks (torchrun, gloo), each rank keeping half of the blocks' host state,
against one process: same losses, same parameters, half the optimizer state and gradients per rank, a
checkpoint that resumes bit for bit on two ranks and loads in plain Lightning on one. Bad arguments fail at
construction, naming the values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn

import zero_streaming_worker as worker  # noqa: E402  (tests/ is on sys.path through conftest's rootdir)
from conftest import checkout_env
from lightning_vdnn import L2LZeroStrategy, VDNNConfig, VDNNStrategy, VDNNZeroStrategy, strategy_for
from lightning_vdnn.streaming.host_memory import required_host_bytes
from lightning_vdnn.streaming.partition import Partition
from lightning_vdnn.streaming.sharded import ShardedLayerStreamer
from lightning_vdnn.streaming.sharded_optimizer_state import state_numel

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2
STEPS = worker.EPOCHS * worker.BATCHES_PER_EPOCH  # batches; stage3 steps the optimizer every second one
LR = 1e-2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("l2l_zero")
    env = checkout_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           str(ROOT / "tests" / "zero_streaming_worker.py"), str(out), *worker.RUNS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return out


def ranks(out: Path, run: str) -> list[dict]:
    return [json.loads((out / f"{run}_rank{r}.json").read_text()) for r in range(RANKS)]


class Snapshots(L.Callback):
    """The parameters at the end of each epoch."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, module):
        self.params.append({k: v.detach().clone() for k, v in module.state_dict().items()})


def plain(run: str, epochs: int, **kwargs) -> tuple[worker.LM, list[dict[str, torch.Tensor]]]:
    """One process, plain Lightning, the global batch, the run's clipping and accumulation: the model (with its
    losses) and its parameters after each epoch."""
    cfg = worker.RUNS[run]
    model, snapshots = worker.LM(seed=0), Snapshots()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots],
                        gradient_clip_val=cfg["gradient_clip_val"],
                        accumulate_grad_batches=cfg["accumulate_grad_batches"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(model, torch.utils.data.DataLoader(worker.dataset(), batch_size=worker.GLOBAL_BATCH), **kwargs)
    finally:
        torch.set_num_threads(threads)
    return model, snapshots.params


@pytest.fixture(scope="module")
def reference() -> dict:
    return {run: plain(run, worker.EPOCHS + (run == "stage2")) for run in worker.RUNS}


@pytest.fixture(scope="module")
def one_device() -> dict:
    """One device's L2L, one step: its block optimizer state and the bytes it streams host -> device."""
    model = worker.LM()
    trainer = L.Trainer(strategy=VDNNStrategy("none", layer_streaming=True, layers="model.blocks"),
                        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(worker.dataset(), batch_size=worker.GLOBAL_BATCH))
    blocks = list(model.model.blocks.parameters())
    return {"state_numel": state_numel(trainer.optimizers[0], blocks), "numel": sum(p.numel() for p in blocks),
            "per_block": [sum(p.numel() for p in b.parameters()) for b in model.model.blocks],
            "h2d_bytes": trainer.strategy.memory_report().streamed_h2d_bytes}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ours, theirs = (torch.load(p, weights_only=False) for p in (a, b))
    for name, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], value), name
    mine, other = ours["optimizer_states"][0], theirs["optimizer_states"][0]
    assert mine["param_groups"] == other["param_groups"] and mine["state"].keys() == other["state"].keys()
    for i, state in other["state"].items():
        for key, value in state.items():
            assert torch.equal(mine["state"][i][key], value), (i, key)


# -- two ranks against one process ---------------------------------------------------------------------
@pytest.mark.parametrize("run", list(worker.RUNS))
def test_losses_match_one_process(runs, reference, run):
    """Each rank's loss is the mean over its half of the global batch: their mean is the batch's."""
    results = ranks(runs, run)
    assert [r["world_size"] for r in results] == [RANKS] * RANKS
    got = torch.tensor([r["losses"] for r in results], dtype=torch.float64).mean(0)
    assert len(got) == STEPS >= 4
    torch.testing.assert_close(got, torch.tensor(reference[run][0].losses[:STEPS], dtype=torch.float64),
                               rtol=1e-4, atol=0)
    assert results[0]["losses"] != results[1]["losses"]  # each rank saw its own half


@pytest.mark.parametrize("run", list(worker.RUNS))
def test_parameters_match_one_process_and_ddp(runs, reference, run):
    """Against one process to rtol 1e-4, with an absolute slack of 1% of the learning rate: averaging
    gradients over ranks sums them in another order, and AdamW divides a near-zero gradient by its own RMS,
    which turns that rounding into up to ~0.5% of lr on a few entries. Lightning's DDP on the same two ranks
    shows the same; the run without microbatches equals it to 1e-6."""
    got = weights(runs / f"{run}.ckpt")
    ref = reference[run][1][worker.EPOCHS - 1]
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=0.01 * LR, msg=lambda m: f"{name}: {m}")
    flat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    assert (flat(got) - flat(ref)).norm() <= 1e-4 * flat(got).norm()
    if run == "stage2":
        for name, value in weights(runs / f"{run}_ddp.ckpt").items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("run", list(worker.RUNS))
def test_each_rank_holds_half_the_block_gradients_and_optimizer_state(runs, one_device, run):
    """One device's L2L holds the AdamW state and gradients of every block element; each rank half of them
    (a range per block, rounded up). Block ``p.grad`` stays None (the gradients live in the rank's range
    buffer), and each rank copies half of what one device copies from its host per step."""
    numel, halves = one_device["numel"], sum(-(-n // RANKS) for n in one_device["per_block"])
    assert one_device["state_numel"] == 2 * numel  # AdamW: two moments per element
    results = ranks(runs, run)
    assert sum(r["state_numel"] for r in results) == one_device["state_numel"]
    for r in results:
        assert r["state_numel"] <= 2 * halves and r["grad_numel"] == halves <= numel / RANKS + RANKS
        assert r["grads_none"]
        if run == "stage2":  # the same loads per step as the one-device run: no accumulation, no microbatches
            assert r["h2d_bytes"] * RANKS == one_device["h2d_bytes"]


# -- checkpoints ---------------------------------------------------------------------------------------
def test_resume_on_two_ranks_equals_the_uninterrupted_run_bit_for_bit(runs, reference):
    """The resumed model was seeded differently and AdamW restarts its moments unless restored: only the
    checkpoint brings the third epoch in line, here exactly, weights and optimizer state included."""
    for rank in ranks(runs, "stage2"):
        assert rank["losses"] == rank["straight_losses"][:STEPS]
        assert rank["resumed_losses"] == rank["straight_losses"][STEPS:]
        assert len(rank["resumed_losses"]) == worker.BATCHES_PER_EPOCH
    assert_same_checkpoint(runs / "stage2_resumed.ckpt", runs / "stage2_straight.ckpt")
    resumed = torch.tensor([r["resumed_losses"] for r in ranks(runs, "stage2")], dtype=torch.float64).mean(0)
    torch.testing.assert_close(resumed, torch.tensor(reference["stage2"][0].losses[STEPS:], dtype=torch.float64),
                               rtol=1e-4, atol=0)


def test_checkpoint_is_one_process_format_and_resumes_in_plain_lightning(runs, reference):
    """Whole weights and whole optimizer state: ``load_from_checkpoint`` and plain Lightning's resume on one
    process take it as their own, and the third epoch continues one process's run."""
    ckpt = runs / "stage2.ckpt"
    assert not ckpt.is_dir()
    state = torch.load(ckpt, weights_only=False)
    loaded = worker.LM.load_from_checkpoint(ckpt)
    params = [p for g in loaded.configure_optimizers()["optimizer"].param_groups for p in g["params"]]
    for i, p in enumerate(params):
        assert state["optimizer_states"][0]["state"][i]["exp_avg"].shape == p.shape
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state["state_dict"][name]), name
    resumed, _ = plain("stage2", worker.EPOCHS + 1, ckpt_path=ckpt)
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(reference["stage2"][0].losses[STEPS:]),
                               rtol=1e-4, atol=0)


def test_checkpoint_during_fit_equals_the_one_after(runs):
    """``ModelCheckpoint`` at the last epoch's end saves while the blocks stream (weights gathered, state
    consolidated from the live partition); after ``fit`` the same comes from the partitions kept."""
    assert_same_checkpoint(runs / "stage3_epoch=1.ckpt", runs / "stage3.ckpt")


# -- behaviour on the ranks ----------------------------------------------------------------------------
def test_block_updates_run_during_backward_unless_clipping(runs):
    assert all(r["eager_updates"] > 0 for r in ranks(runs, "stage3"))
    assert all(r["eager_updates"] == 0 for r in ranks(runs, "stage2"))  # clipping: queued at the step


def test_reading_blocks_between_steps_needs_synchronize(runs):
    for rank in ranks(runs, "stage3"):
        assert rank["stale_read"].startswith("Block 0 at 'model.blocks' keeps its host weights partitioned over "
                                             "2 ranks") and "trainer.strategy.synchronize()" in rank["stale_read"]
        assert rank["synchronized_read"] == sorted(worker.LM().model.blocks[0].state_dict())


def test_validate_after_fit_streams_on_both_ranks(runs, reference):
    """A fresh streamer from the weights gathered at the end of fit, forward only; the loss is the mean over
    both ranks' halves (``sync_dist``), the global batch's."""
    model = worker.LM()
    model.load_state_dict(reference["stage3"][1][-1])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    loader = torch.utils.data.DataLoader(worker.dataset(), batch_size=worker.GLOBAL_BATCH)
    want = trainer.validate(model, loader, verbose=False)[0]["val/loss"]
    for rank in ranks(runs, "stage3"):
        assert rank["val_loss"] == pytest.approx(want, rel=1e-4)


def test_a_failed_run_tears_down_without_collectives_and_refuses_to_save(runs):
    """Both ranks raise in ``training_step``: each tears down on its own (a rank alone must not wait in a
    gather for the others), and a checkpoint of the ungathered state is refused rather than written wrong."""
    for rank in ranks(runs, "stage2"):
        assert rank["failure"] == "boom" and rank["released"]
        assert rank["save_after_failure"].startswith("The last run of L2LZeroStrategy failed while the blocks "
                                                     "streamed")
    assert not (runs / "failed.ckpt").exists()


def test_predict_on_two_ranks_is_refused(runs):
    for rank in ranks(runs, "stage3"):
        assert rank["predict"].startswith("predict with L2LZeroStrategy on 2 ranks")


# -- partitions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, world", [([3, 4, 1], 2), ([3, 4, 1], 3), ([5], 4), ([2, 2], 8)])
def test_partition_covers_every_element_once(sizes, world):
    params = [nn.Parameter(torch.zeros(n)) for n in sizes]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    parts = [Partition(params, offsets, rank, world) for rank in range(world)]
    assert parts[0].padded % world == 0 and parts[0].padded - offsets[-1] < world
    seen = torch.zeros(offsets[-1])
    for part in parts:
        assert part.hi - part.lo <= part.size
        for k, (a, b) in part.pieces.items():
            assert offsets[k] <= a < b <= offsets[k + 1] and part.lo <= a and b <= part.hi
            assert part.local(k).stop - part.local(k).start == part.within(k).stop - part.within(k).start == b - a
            seen[a:b] += 1
    assert torch.equal(seen, torch.ones(offsets[-1]))


def test_host_memory_estimate_counts_one_range_of_gradients_and_state():
    blocks = [nn.Linear(8, 8) for _ in range(3)]
    one, two = required_host_bytes(blocks), required_host_bytes(blocks, shards=2)
    assert two.weights == one.weights and two.grads * 2 == one.grads and two.optimizer * 2 == one.optimizer


# -- names, configs, errors ----------------------------------------------------------------------------
def compose_strategy(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="lightning_vdnn.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides)).strategy


def test_registered_name_hydra_config_and_strategy_for_build_it():
    assert "l2l_zero" in StrategyRegistry
    trainer = L.Trainer(strategy="l2l_zero", accelerator="cpu", devices=2, logger=False)
    built = [trainer.strategy, instantiate(compose_strategy("strategy=l2l_zero")),
             instantiate(compose_strategy("strategy=l2l_zero", "strategy.zero_stage=3")),
             strategy_for(VDNNConfig("all", zero_stage=3, layer_streaming=True, layers="model.blocks")),
             L2LZeroStrategy("all", zero_stage=1, microbatches=2)]
    for strategy in built:
        assert isinstance(strategy, L2LZeroStrategy) and strategy.config.layer_streaming
    assert trainer.strategy.world_size == 2 and trainer.strategy.config.zero_stage == 2
    assert [s.config.zero_stage for s in built[1:]] == [2, 3, 3, 1]
    assert built[3].config.layers == "model.blocks" and built[4].config.microbatches == 2
    assert isinstance(instantiate(compose_strategy("strategy=vdnn_zero3")), VDNNZeroStrategy)


@pytest.mark.parametrize("build", [
    lambda: VDNNZeroStrategy("all", zero_stage=3, layer_streaming=True),
    lambda: VDNNStrategy("all", layer_streaming=True, zero_stage=1),
    lambda: instantiate(compose_strategy("strategy=vdnn_zero2", "strategy.layer_streaming=true")),
])
def test_the_other_classes_name_the_class_that_streams_across_ranks(build):
    """No class call returns another class: layer streaming with a ZeRO stage names ``L2LZeroStrategy``."""
    with pytest.raises(Exception, match=r"is L2LZeroStrategy \(strategy='l2l_zero'\).*strategy_for"):
        build()


@pytest.mark.parametrize("build, error, pattern", [
    (lambda: VDNNZeroStrategy(layer_streaming=True, zero_stage=3, offload_params=True), NotImplementedError,
     r"offload_params=True with layer_streaming=True and zero_stage=3: the streamed blocks' .* Drop offload_params"),
    (lambda: VDNNConfig(layer_streaming=True, zero_stage=1, offload_optimizer=True), NotImplementedError,
     r"offload_optimizer=True with layer_streaming=True and zero_stage=1.*Drop offload_optimizer=True"),
    (lambda: L2LZeroStrategy(vdnn_config=VDNNConfig(layer_streaming=True)), ValueError,
     r"needs layer_streaming=True and zero_stage=1, 2 or 3, not layer_streaming=True, zero_stage=0.*'l2l'"),
    (lambda: L2LZeroStrategy(zero_stage=4), ValueError, r"zero_stage=4 is not a ZeRO stage"),
    (lambda: L2LZeroStrategy(layer_streaming=True), TypeError, r"L2LZeroStrategy always runs with layer_streaming"),
    (lambda: L.Trainer(strategy="l2l", accelerator="cpu", devices=2, logger=False), ValueError,
     r"VDNNStrategy trains on one device.*For layer streaming on several devices.*strategy='l2l_zero'"),
    (lambda: ShardedLayerStreamer(nn.Module(), None, torch.device("cpu"), None, precision="16-mixed"), ValueError,
     r"precision='16-mixed' with layer streaming across ranks.*Use precision='bf16-mixed'"),
])
def test_bad_arguments_name_the_values(build, error, pattern):
    with pytest.raises(error, match=pattern):
        build()


ADAGRAD = """
import torch, lightning as L
import zero_streaming_worker as worker
from lightning_vdnn import L2LZeroStrategy

class LM(worker.LM):
    def configure_optimizers(self):  # Adagrad makes its 'sum' state whole-shaped at construction
        return torch.optim.Adagrad(self.parameters(), lr=1e-2)

def run(strategy):
    model = LM(seed=0)
    L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(model, worker.rank_loader(0, 1))
    return model

ref, got = run("auto"), run(L2LZeroStrategy("all", zero_stage=2, layers="model.blocks", min_offload_bytes=0))
torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
for p, q in zip(got.parameters(), ref.parameters()):
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
print("same")
"""


def test_state_made_at_construction_is_cut_to_the_rank_range():
    """Adagrad creates its ``sum`` whole when it is built; the rank's block optimizer steps 1-D pieces, so that
    state must be cut like loaded state (one rank, in a process of its own: it initialises torch.distributed)."""
    proc = subprocess.run([sys.executable, "-c", ADAGRAD], cwd=ROOT / "tests", stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300,
                          env=checkout_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("same"), proc.stdout[-4000:]
