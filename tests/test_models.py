"""Models, data modules and tasks: shapes, sizes, validation, determinism, and that training learns."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_vdnn.examples.data import SyntheticImageDataModule, TextDataModule, synthetic_text_bytes
from lightning_vdnn.examples.models import GPT, VGG, Block, GPTConfig, VGGConfig
from lightning_vdnn.examples.tasks import ImageClassifier, LanguageModel


pytestmark = pytest.mark.usefixtures("one_thread")


def meta_gpt(name: str, **overrides) -> GPT:
    with torch.device("meta"):
        return GPT(GPTConfig.from_name(name, **overrides))


@pytest.mark.parametrize("name", ["gpt_tiny", "llama_tiny"])
def test_gpt_logits_shape_and_causality(name: str) -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(name)).eval()
    idx = torch.randint(0, 256, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 256)
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :8], logits[:, :8])  # the future does not leak back


def test_sequence_longer_than_block_size_raises() -> None:
    with pytest.raises(ValueError, match="block_size"):
        GPT(GPTConfig(block_size=8))(torch.zeros(1, 9, dtype=torch.long))


def test_tied_and_untied_embeddings() -> None:
    model = GPT(GPTConfig())
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.bias is None
    assert meta_gpt("gpt_tiny", tie_embeddings=False).lm_head.weight is not model.wte.weight


def test_llama_blocks_run_alone() -> None:
    model = GPT(GPTConfig.from_name("llama_tiny"))
    assert model.wpe is None and isinstance(model.ln_f, torch.nn.RMSNorm)
    block = model.blocks[0]
    assert isinstance(block, Block) and hasattr(block.mlp, "fc1") and block.attn.qkv.bias is None
    assert all(type(b) is Block for b in model.blocks)
    x = torch.randn(2, 10, model.config.n_embd)
    for block in model.blocks:
        y = block(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
    assert model.config.mlp_hidden == 384  # 8/3 * 128 = 341 -> next multiple of 64


def test_gpt_tiny_loss_falls_on_text() -> None:
    torch.manual_seed(0)
    task = LanguageModel("gpt_tiny", warmup_steps=5, max_steps=30)
    opt = task.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    data = TextDataModule(seq_len=32, batch_size=8, max_bytes=100_000)
    batches = iter(data.train_dataloader())
    losses = []
    for _ in range(30):
        x, y = next(batches)
        loss = F.cross_entropy(task(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(256) at init
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5


def test_optimizer_groups_count_tied_weight_once() -> None:
    task = LanguageModel("gpt_tiny", n_layer=1)
    optimizer = task.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    listed = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(task.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])


def test_named_big_configs_on_meta() -> None:
    gpt_1b = meta_gpt("gpt_1b")
    assert gpt_1b.wte.weight.is_meta and len(gpt_1b.blocks) == 24
    assert 1.3e9 < gpt_1b.num_params() < 1.4e9
    deep = meta_gpt("gpt_deep")
    assert len(deep.blocks) == 96 and 4.7e9 < deep.num_params() < 5.1e9
    assert 6 * 1.2e9 < gpt_1b.flops_per_token() < 6 * 1.4e9 + 12 * 24 * 2048 * 1024


@pytest.mark.parametrize(
    ("overrides", "bad"),
    [
        (dict(n_embd=130, n_head=4), "130"),
        (dict(norm="foo"), "foo"),
        (dict(mlp="relu"), "relu"),
        (dict(pos="alibi"), "alibi"),
        (dict(n_layer=0), "n_layer=0"),
        (dict(dropout=1.5), "1.5"),
    ],
)
def test_bad_gpt_config_raises(overrides: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        GPTConfig(**overrides)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="gpt_tiny.*llama_tiny"):
        GPTConfig.from_name("gpt_huge")
    with pytest.raises(ValueError, match="vgg16_bn"):
        VGGConfig.from_name("vgg19")
    with pytest.raises(ValueError, match="not_a_field"):
        GPTConfig.from_name("gpt_tiny", not_a_field=1)
    with pytest.raises(ValueError, match="'X'"):
        VGGConfig(layers=(64, "X"))


def test_vgg16_on_meta() -> None:
    with torch.device("meta"):
        vgg16, vgg16_bn = VGG(VGGConfig.from_name("vgg16")), VGG(VGGConfig.from_name("vgg16_bn"))
    assert vgg16.num_params() == 138_357_544  # torchvision's vgg16
    assert vgg16_bn.num_params() == 138_365_992
    assert sum(isinstance(m, torch.nn.Conv2d) for m in vgg16.features) == 13
    assert vgg16.classifier[0].in_features == 512 * 7 * 7
    assert vgg16.flops_per_image(training=False) == pytest.approx(2 * 15.47e9, rel=0.01)  # 15.5 GMACs
    assert vgg16.flops_per_image() == 3 * vgg16.flops_per_image(training=False)


def test_vgg_tiny_trains_on_synthetic_images() -> None:
    torch.manual_seed(0)
    task = ImageClassifier("vgg_tiny", lr=0.02)  # the 0.05 default is for BatchNorm; plain VGG can stall at it
    optimizer = task.configure_optimizers()
    data = SyntheticImageDataModule(batch_size=32, length=256)
    losses = []
    for _ in range(4):
        for x, y in data.train_dataloader():
            loss = F.cross_entropy(task(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.3


def test_text_datamodule_is_deterministic() -> None:
    def first_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = TextDataModule(seq_len=16, batch_size=4, max_bytes=50_000, seed=seed)
        return next(iter(data.train_dataloader()))

    (x, y), (x2, y2) = first_batch(0), first_batch(0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, first_batch(1)[0])
    assert x.dtype == y.dtype == torch.int64 and x.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])

    data = TextDataModule(seq_len=16, max_bytes=50_000, val_fraction=0.1)
    data.setup()
    assert len(data.train_set) == 45_000 // 16
    val_x, val_y = data.val_set[0]
    torch.testing.assert_close(data.val_set[1][0][0], val_y[-1])  # consecutive windows
    assert synthetic_text_bytes(1000) == synthetic_text_bytes(1000) and len(synthetic_text_bytes(1000)) == 1000


def test_synthetic_images_are_fixed_per_index() -> None:
    a, b = SyntheticImageDataModule(length=8), SyntheticImageDataModule(length=8)
    x, y = a.train_set[3]
    assert torch.equal(x, b.train_set[3][0]) and int(y) == int(b.train_set[3][1])
    assert x.shape == (3, 32, 32) and 0 <= int(y) < 10
    batch, _ = next(iter(SyntheticImageDataModule(length=8, batch_size=4, channels_last=True).train_dataloader()))
    assert batch.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("task", "data"),
    [
        (lambda: LanguageModel(n_layer=1), lambda: TextDataModule(seq_len=16, batch_size=4, max_bytes=20_000)),
        (lambda: ImageClassifier(channels_last=True), lambda: SyntheticImageDataModule(batch_size=4, length=16)),
    ],
    ids=["language_model", "image_classifier"],
)
def test_tasks_run_in_trainer(task, data, tmp_path) -> None:
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_predict_batches=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    module, datamodule = task(), data()
    trainer.fit(module, datamodule=datamodule)
    assert {"train/loss", "val/loss"} <= set(trainer.callback_metrics)
    predictions = trainer.predict(module, datamodule=datamodule)
    assert predictions[0].dtype == torch.int64


def test_text_falls_back_to_synthetic_text_without_stdlib(monkeypatch) -> None:
    monkeypatch.setattr("lightning_vdnn.examples.data.stdlib_source_bytes", lambda max_bytes: b"")
    data = TextDataModule(seq_len=16, max_bytes=10_000)
    data.setup()
    assert bytes(data.train_set.tokens[:4].tolist()) == synthetic_text_bytes(4)
