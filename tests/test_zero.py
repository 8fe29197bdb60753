"""VDNNZeroStrategy on two CPU ranks (torchrun, gloo) against one process: same losses, same parameters, a
checkpoint that resumes on two ranks and consolidates on one, and each rank offloading exactly what one
device offloads for its share of the batch. Bad arguments fail at construction, naming the values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import StrategyRegistry

pytest.importorskip("deepspeed")

import zero_worker as worker  # noqa: E402  (tests/ is on sys.path through conftest's rootdir)
from conftest import checkout_env  # noqa: E402
from lightning_vdnn import VDNNConfig, VDNNStrategy, VDNNZeroStrategy  # noqa: E402
from lightning_vdnn.integrations.deepspeed_strategy import deepspeed_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = [2, 3]
POLICIES = ["all", "conv", "none", "auto"]
RANKS = 2


def torchrun(out: Path, *args: str) -> subprocess.Popen:
    env = checkout_env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           str(ROOT / "tests" / "zero_worker.py"), str(out), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both two-rank jobs, side by side: ZeRO-2 and -3 with save and resume; every policy under ZeRO-3."""
    out = tmp_path_factory.mktemp("zero")
    procs = [torchrun(out, "resume", *map(str, STAGES)), torchrun(out, "policies", "3", *POLICIES)]
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{proc.args}\n{output[-6000:]}"
    return out


def ranks(out: Path, run: str) -> list[dict]:
    return [json.loads((out / f"{run}_rank{r}.json").read_text()) for r in range(RANKS)]


def rank_mean(results: list[dict], key: str) -> torch.Tensor:
    """Each rank's loss is the mean over its equal share of the global batch: their mean is the batch's."""
    return torch.tensor([r[key] for r in results], dtype=torch.float64).mean(0)


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, plain PyTorch, the global batch: losses of 3 epochs, parameters after 2 and after 3."""
    model = worker.MLP(seed=0)
    opt = model.configure_optimizers()
    batches = list(torch.utils.data.DataLoader(worker.dataset(), batch_size=worker.GLOBAL_BATCH))
    losses, params = [], {}
    for epoch in range(worker.EPOCHS + 1):
        for x, y in batches:
            loss = F.cross_entropy(model.net(x), y)
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        params[epoch + 1] = {k: v.clone() for k, v in model.state_dict().items()}
    return {"losses": torch.tensor(losses, dtype=torch.float64), "params": params}


def one_device_report(policy: str) -> dict:
    """What VDNNStrategy on one device offloads for rank 0's share of the batch."""
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(strategy=VDNNStrategy(policy, min_offload_bytes=0), accelerator="cpu", devices=1,
                        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(worker.MLP(seed=0), worker.rank_loader(0, RANKS))
    return trainer.strategy.memory_report().as_dict()


OFFLOAD_FIELDS = ("offloaded_bytes", "offloaded_tensors", "kept_bytes", "layers_kept", "policy")


# -- two ranks against one process ---------------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_losses_match_one_process(runs, reference, stage):
    results = ranks(runs, f"stage{stage}")
    assert [r["world_size"] for r in results] == [RANKS] * RANKS
    steps = worker.EPOCHS * worker.STEPS_PER_EPOCH
    got = rank_mean(results, "losses")
    assert len(got) == steps >= 4
    torch.testing.assert_close(got, reference["losses"][:steps], rtol=1e-4, atol=0)
    assert results[0]["losses"] != results[1]["losses"]  # each rank saw its own half of the batch


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_resumes_on_two_ranks(runs, reference, stage):
    """The resumed model was seeded differently and AdamW restarts its moments unless restored: only the
    checkpoint (weights and optimizer state) brings the third epoch's losses back in line."""
    steps = worker.EPOCHS * worker.STEPS_PER_EPOCH
    got = rank_mean(ranks(runs, f"stage{stage}"), "resumed_losses")
    assert len(got) == worker.STEPS_PER_EPOCH
    torch.testing.assert_close(got, reference["losses"][steps:], rtol=1e-4, atol=0)


@pytest.mark.parametrize("stage", STAGES)
def test_resume_equals_the_uninterrupted_two_rank_run_bit_for_bit(runs, stage, tmp_path):
    """On each rank, the resumed third epoch's losses are exactly those of the same two ranks training the
    three epochs without a break, and so are the weights after it (consolidated from both checkpoints)."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    steps = worker.EPOCHS * worker.STEPS_PER_EPOCH
    for rank in ranks(runs, f"stage{stage}"):
        assert len(rank["straight_losses"]) == steps + worker.STEPS_PER_EPOCH
        assert rank["losses"] == rank["straight_losses"][:steps]
        assert rank["resumed_losses"] == rank["straight_losses"][steps:]
    weights = {}
    for run in ("resumed", "straight"):
        convert_zero_checkpoint_to_fp32_state_dict(runs / f"stage{stage}_{run}.ckpt", tmp_path / f"{run}.pt")
        weights[run] = torch.load(tmp_path / f"{run}.pt", weights_only=False)["state_dict"]
    assert weights["resumed"].keys() == weights["straight"].keys()
    for name, value in weights["straight"].items():
        assert torch.equal(weights["resumed"][name], value), name


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_consolidates_and_loads_on_one_process(runs, reference, stage, tmp_path):
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    for ckpt, epochs in [(f"stage{stage}.ckpt", worker.EPOCHS), (f"stage{stage}_resumed.ckpt", worker.EPOCHS + 1)]:
        assert (runs / ckpt).is_symlink()  # published atomically: a link to the complete shard directory
        single = tmp_path / f"{ckpt}.pt"
        convert_zero_checkpoint_to_fp32_state_dict(runs / ckpt, single)
        model = worker.MLP(seed=7)
        model.load_state_dict(torch.load(single, weights_only=False)["state_dict"])
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, reference["params"][epochs][name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{ckpt} {name}: {m}")


# -- activation offload inside the engine --------------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_each_rank_offloads_what_one_device_offloads(runs, stage):
    """ZeRO-3 gathers weights into fresh memory per layer; they must stay parameters, not count as
    activations: with them the numbers would exceed one device's."""
    want = one_device_report("all")
    assert want["offloaded_bytes"] > 0
    for rank in ranks(runs, f"stage{stage}"):
        assert {k: rank["report"][k] for k in OFFLOAD_FIELDS} == {k: want[k] for k in OFFLOAD_FIELDS}
        assert rank["report"]["step"] == worker.EPOCHS * worker.STEPS_PER_EPOCH


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_runs_inside_zero3(runs, reference, policy):
    """The model is built under ``deepspeed.zero.Init`` (partitioned at birth, DeepSpeed's own linear)."""
    results = ranks(runs, f"{policy}_stage3")
    torch.testing.assert_close(rank_mean(results, "losses"), reference["losses"][:worker.STEPS_PER_EPOCH],
                               rtol=1e-4, atol=0)
    want = one_device_report(policy)
    assert {k: results[0]["report"][k] for k in OFFLOAD_FIELDS} == {k: want[k] for k in OFFLOAD_FIELDS}


# -- names, configs, errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_registered_names_and_hydra_configs(stage):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    name = f"vdnn_zero{stage}"
    assert name in StrategyRegistry
    trainer = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
    with initialize_config_module(config_module="lightning_vdnn.conf", version_base="1.3"):  # typed by its schema
        from_yaml = instantiate(compose(config_name="config", overrides=[f"strategy={name}"]).strategy)
    for strategy in (trainer.strategy, from_yaml):
        assert isinstance(strategy, VDNNZeroStrategy)
        assert strategy.vdnn_config.zero_stage == strategy.config["zero_optimization"]["stage"] == stage
        assert strategy.vdnn_config.activation_offload == "auto"
    assert trainer.strategy.world_size == 2


def test_deepspeed_config_merges_the_users(tmp_path):
    user = {"zero_optimization": {"reduce_bucket_size": 5, "offload_param": {"device": "cpu", "buffer_count": 9}},
            "gradient_clipping": 1.0}
    cfg = deepspeed_config(VDNNConfig(zero_stage=3, offload_params=True, offload_optimizer=True, pin_memory=False),
                           user)
    assert cfg["zero_optimization"] == {
        "stage": 3, "reduce_bucket_size": 5, "offload_param": {"device": "cpu", "buffer_count": 9},
        "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_allow_untested_optimizer"] is True
    assert "stage" not in user["zero_optimization"]  # the user's dict is not modified
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "steps_per_print": 7}))
    strategy = VDNNZeroStrategy(config=str(path))  # zero_stage=None: the config's stage
    assert strategy.vdnn_config.zero_stage == 3 and strategy.config["steps_per_print"] == 7
    assert VDNNZeroStrategy().vdnn_config.zero_stage == 2


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(zero_stage=5), ValueError, r"zero_stage=5 is not a ZeRO stage; choose one of \[0, 1, 2, 3\]"),
    (dict(zero_stage=2, offload_params=True), ValueError,
     r"offload_params=True needs zero_stage=3 .* not zero_stage=2\. Use zero_stage=3"),
    (dict(zero_stage=2, config={"zero_optimization": {"stage": 3}}), ValueError,
     r"config sets zero_optimization\.stage=3, but the strategy was given zero_stage=2"),
    (dict(zero_stage=3, offload_params=True, config={"zero_optimization": {"offload_param": {"device": "nvme"}}}),
     ValueError, r"offload_param\.device='nvme', but the strategy was given offload_params=True.*'cpu'"),
    (dict(zero_stage=0), ValueError, r"VDNNZeroStrategy needs zero_stage=1, 2 or 3, not zero_stage=0.*VDNNStrategy"),
    (dict(zero_stage=0, layer_streaming=True), ValueError,
     r"VDNNZeroStrategy needs zero_stage=1, 2 or 3, not zero_stage=0.*layer streaming on one device.*'l2l'"),
])
def test_bad_arguments_name_the_values(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        VDNNZeroStrategy("all", **kwargs)


def test_one_device_strategy_points_to_zero():
    with pytest.raises(ValueError, match=r"zero_stage=3 needs DeepSpeed.*strategy='vdnn_zero3'"):
        VDNNStrategy(zero_stage=3)
    with pytest.raises(ValueError, match=r"offload_optimizer=True .* needs zero_stage=1, 2 or 3"):
        VDNNStrategy(offload_optimizer=True)
    with pytest.raises(ValueError, match=r"devices=1, or .* strategy='vdnn_zero2' \(or 'vdnn_zero3'"):
        L.Trainer(strategy="vdnn_all", accelerator="cpu", devices=2, logger=False)
