"""Frozen parameters under layer streaming (``HostBlock``'s gradient layout): LoRA's base weights, frozen layers.
A parameter with ``requires_grad=False`` gets no host gradient buffer and no bytes copied back over PCIe; the
training is plain Lightning's (losses, parameters, buffers), and freezing or unfreezing mid-run is followed."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from conftest import fit
from lightning_vdnn import VDNNConfig, VDNNStrategy
from lightning_vdnn.streaming import host_memory

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ, BATCH, STEPS = 64, 12, 4, 4
#: lean host state (bf16 gradients and moments) against exact fp32 states: every loss within this (test_bf16_grads)
TOLERANCE = 1e-3


def llama() -> "tf.LlamaForCausalLM":
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False))


def lora(model: torch.nn.Module) -> torch.nn.Module:
    """``peft``'s LoRA on the attention's q and v and the MLP's down projection (its base weights frozen)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def frozen_but_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight frozen but the norms' (a block keeps a few trained parameters beside frozen ones)."""
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)
    return model


def frozen_first_block(model: torch.nn.Module) -> torch.nn.Module:
    """Block 0 frozen whole (its gradients: none at all), the rest trained."""
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    return model


class Task(L.LightningModule):
    """An HF Llama on its own loss, built by ``make``; AdamW over the parameters that train at the start (or all of
    them, ``everything``, for runs that unfreeze some later); ``unfreeze``: {step: block} unfrozen at that step."""

    def __init__(self, make, everything: bool = False, unfreeze: dict | None = None) -> None:
        super().__init__()
        self.model = make(llama())
        self.everything, self.unfreeze = everything, unfreeze or {}
        self.losses: list[float] = []

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx in self.unfreeze:
            for p in self.blocks()[self.unfreeze[batch_idx]].parameters():
                p.requires_grad_(True)

    def blocks(self) -> torch.nn.ModuleList:
        return self.model.get_base_model().model.layers if hasattr(self.model, "get_base_model") else \
            self.model.model.layers

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad or self.everything]
        return torch.optim.AdamW(params, lr=1e-2)


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(7)
    return torch.utils.data.DataLoader([torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(STEPS)],
                                       batch_size=None)


def train(strategy="auto", **task) -> tuple[Task, L.Trainer]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(lambda: Task(**task), loader(), strategy, max_steps=STEPS)


def l2l(**kw) -> VDNNStrategy:
    return VDNNStrategy(config=VDNNConfig(activation_offload="none", layer_streaming=True, **kw))


def assert_same_training(got: Task, ref: Task, tol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=tol, atol=tol)
    want = ref.model.state_dict()
    for key, value in got.model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


def trained_numel(task: Task) -> list[int]:
    return [sum(p.numel() for p in block.parameters() if p.requires_grad) for block in task.blocks()]


@pytest.mark.parametrize("make", [lora, frozen_but_norms, frozen_first_block],
                         ids=["peft LoRA", "all but norms frozen", "block 0 frozen"])
@pytest.mark.parametrize("microbatches", [1, 2])
def test_frozen_weights_train_like_plain_and_cost_no_gradient_memory_or_copies(make, microbatches):
    """The blocks' host gradient buffers hold their trained parameters only, and the step copies back just
    those (4 bytes each, fp32 gradients): a block frozen whole copies nothing."""
    ref, _ = train(make=make)
    got, trainer = train(l2l(microbatches=microbatches), make=make)
    assert_same_training(got, ref, tol=1e-5 if microbatches == 1 else 2e-5)
    trained = trained_numel(got)
    assert trainer.strategy.memory_report().streamed_d2h_bytes == 4 * sum(trained)
    assert sum(trained) < sum(p.numel() for p in got.blocks().parameters())


def test_the_host_state_holds_gradients_of_the_trained_parameters_only():
    seen = {}

    class Look(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            streamer = trainer.strategy._streamer
            streamer.wait_grads()
            seen["grads"] = [b.grad_flat.numel() for b in streamer.blocks]
            seen["frozen"] = [p.grad for b in streamer.blocks for p in b.params if not p.requires_grad]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, _ = fit(lambda: Task(lora), loader(), l2l(), max_steps=1, callbacks=[Look()])
    assert seen["grads"] == trained_numel(got)
    assert all(g is None for g in seen["frozen"]) and seen["frozen"]


def test_unfreezing_a_block_mid_training_is_followed():
    """Block 1 frozen for two steps, then trained: its gradient buffers are laid out again, and the training is
    plain's (the optimizer held every parameter from the start, as gradual unfreezing does)."""
    ref, _ = train(make=frozen_but_norms, everything=True, unfreeze={2: 1})
    got, trainer = train(l2l(), make=frozen_but_norms, everything=True, unfreeze={2: 1})
    assert_same_training(got, ref)
    assert trainer.strategy.memory_report().streamed_d2h_bytes == 4 * sum(trained_numel(got))


def test_lean_host_state_with_lora_stays_within_its_tolerance_and_copies_bf16_gradients_of_the_adapters():
    ref, _ = train(l2l(host_optimizer="torch"), make=lora)
    got, trainer = train(l2l(host_state_dtype="bf16"), make=lora)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=TOLERANCE, atol=0)
    assert trainer.strategy.memory_report().streamed_d2h_bytes == 2 * sum(trained_numel(got))


def test_unfreezing_under_the_lean_host_state_is_followed_too():
    ref, _ = train(l2l(host_optimizer="torch"), make=frozen_but_norms, everything=True, unfreeze={2: 1})
    got, trainer = train(l2l(host_state_dtype="bf16"), make=frozen_but_norms, everything=True, unfreeze={2: 1})
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=TOLERANCE, atol=0)
    assert trainer.strategy.memory_report().streamed_d2h_bytes == 2 * sum(trained_numel(got))


def test_the_host_memory_check_counts_no_gradient_or_optimizer_state_for_frozen_weights():
    model = lora(llama())
    blocks = list(model.get_base_model().model.layers)
    weights = sum(p.numel() * 4 for b in blocks for p in b.parameters())
    trained = sum(p.numel() * 4 for b in blocks for p in b.parameters() if p.requires_grad)
    largest = max(sum(p.numel() * 4 for p in b.parameters() if p.requires_grad) for b in blocks)
    need = host_memory.required_host_bytes(blocks)
    assert (need.weights, need.grads, need.optimizer, need.staging) == (weights, trained, 2 * trained, 2 * largest)
    # partitioned over ranks, each rank keeps its range of every gradient, frozen ones' too (zero)
    assert host_memory.required_host_bytes(blocks, shards=2).grads == weights // 2


@pytest.mark.parametrize("strategy", [lambda: "auto", lambda: l2l(), lambda: l2l(host_state_dtype="bf16")],
                         ids=["plain", "l2l", "l2l lean host state"])
def test_lora_resumes_bit_for_bit(tmp_path, strategy):
    """Save after an epoch of two steps, resume into a differently seeded model: the adapters' weights and AdamW
    state come from the file, and the resumed steps are the straight run's exactly."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def two_steps() -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(7)
        return torch.utils.data.DataLoader([torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(2)],
                                           batch_size=None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight, _ = fit(lambda: Task(lora), two_steps(), strategy(), max_steps=-1, max_epochs=2,
                          enable_checkpointing=True, callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1)])
        L.seed_everything(1, verbose=False)
        resumed = Task(lora)
        L.Trainer(strategy=strategy(), accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(
            resumed, two_steps(), ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert len(straight.losses) == 4 and resumed.losses == straight.losses[2:]
    for (name, p), q in zip(resumed.named_parameters(), straight.parameters()):
        assert torch.equal(p, q), name


def test_lora_in_bf16_true_streams_like_plain_and_holds_bf16_weights_on_the_host():
    """The usual LoRA recipe (``precision="bf16-true"``): the host keeps the base weights in bf16 (2 bytes each, no
    fp32 master, no copy), gradients and AdamW state for the adapters only; the run is plain bf16-true's."""
    seen = {}

    class Look(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            blocks = trainer.strategy._streamer.blocks
            seen["weights"] = {b.flat.dtype for b in blocks}
            seen["copies"] = [b.copy for b in blocks]
            seen["report"] = trainer.strategy.memory_report()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = fit(lambda: Task(lora), loader(), max_steps=STEPS, precision="bf16-true")
        got, _ = fit(lambda: Task(lora), loader(), l2l(), max_steps=STEPS, precision="bf16-true", callbacks=[Look()])
    assert got.losses == ref.losses
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), name
    assert seen["weights"] == {torch.bfloat16} and seen["copies"] == [None] * len(seen["copies"])
    report = seen["report"]
    assert report.streamed_d2h_bytes == 2 * sum(trained_numel(got))  # bf16 gradients of the adapters


def test_the_one_pass_update_over_half_precision_weights_is_refused_with_the_fix():
    for kw in ({"host_state_dtype": "bf16"}, {"host_optimizer": "native"}):
        with pytest.raises(ValueError, match=r"updates fp32 master weights, and the blocks' weights are bf16.*"
                                             r"host_optimizer='auto' and host_state_dtype='fp32'"):
            fit(lambda: Task(lora), loader(), l2l(**kw), max_steps=1, precision="bf16-true")
