"""VDNNStrategy against plain Lightning training: same losses, same parameters, and the hooks really moved data."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

from conftest import Classifier, ResidualCNN, assert_same_params, fit, image_loader, token_loader
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.offload.offloader import is_expensive

POLICIES = ["all", "conv", "none"]


def strategy(policy: str, **kw) -> VDNNStrategy:
    return VDNNStrategy(policy, min_offload_bytes=kw.pop("min_offload_bytes", 0), **kw)


@pytest.mark.parametrize("policy", POLICIES)
def test_cnn_matches_plain(cnn, policy):
    ref, _ = fit(cnn, image_loader())
    got, trainer = fit(cnn, image_loader(), strategy(policy))
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)
    assert len(got.losses) == 3


@pytest.mark.parametrize("policy", POLICIES)
def test_transformer_matches_plain(lm, policy):
    ref, _ = fit(lm, token_loader())
    got, trainer = fit(lm, token_loader(), strategy(policy))
    assert got.model.lm_head.weight is got.model.wte.weight
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)


def test_registered_names_resolve_to_policies():
    for name, policy in [("vdnn", "auto"), ("vdnn_all", "all"), ("vdnn_conv", "conv"), ("vdnn_none", "none")]:
        assert name in StrategyRegistry
        trainer = L.Trainer(strategy=name, accelerator="cpu", devices=1, logger=False)
        assert isinstance(trainer.strategy, VDNNStrategy)
        assert trainer.strategy.config.activation_offload == policy
        assert trainer.strategy.root_device == torch.device("cpu")


def test_all_offloads_everything_none_offloads_nothing(cnn):
    _, t_all = fit(cnn, image_loader(), strategy("all"))
    _, t_none = fit(cnn, image_loader(), strategy("none"))
    r_all, r_none = t_all.strategy.memory_report(), t_none.strategy.memory_report()
    assert r_all.offloaded_bytes > 0 and r_all.offloaded_tensors > 0 and r_all.prefetched_bytes > 0
    assert r_none.offloaded_bytes == 0 and r_none.offloaded_tensors == 0
    # "none" keeps exactly what "all" moves (same saved activations, nothing above threshold is dropped)
    assert r_none.kept_bytes == r_all.offloaded_bytes + r_all.kept_bytes
    assert r_all.step == 3


def test_conv_offloads_exactly_the_inputs_of_expensive_layers():
    """Count the distinct input storages of Conv/Linear layers in one forward: 'conv' moves those, no more."""
    net = ResidualCNN()
    inputs = set()
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.add(a[0].untyped_storage().data_ptr()))
             for m in net.modules() if is_expensive(m)]
    net(next(iter(image_loader()))[0])
    for h in hooks:
        h.remove()
    _, trainer = fit(lambda: Classifier(ResidualCNN()), image_loader(), strategy("conv"))
    report = trainer.strategy.memory_report()
    assert report.offloaded_tensors == len(inputs) == 4  # stem conv, two residual convs, head
    assert 0 < report.offloaded_bytes < fit(lambda: Classifier(ResidualCNN()), image_loader(),
                                             strategy("all"))[1].strategy.memory_report().offloaded_bytes


def test_threshold_keeps_small_tensors(cnn):
    _, trainer = fit(cnn, image_loader(), strategy("all", min_offload_bytes=2**30))
    report = trainer.strategy.memory_report()
    assert report.offloaded_bytes == 0 and report.kept_bytes > 0


def test_host_buffers_are_reused_across_steps(cnn):
    _, trainer = fit(cnn, image_loader(n=160), strategy("all"), max_steps=10)
    report = trainer.strategy.memory_report()
    # every pass saves the same shapes: the pool allocates in the first pass and reuses afterwards
    assert report.host_allocations <= report.offloaded_tensors
    assert report.host_pool_bytes < 2 * report.offloaded_bytes


def test_accumulation_and_bf16_match_plain(cnn):
    kw = dict(accumulate_grad_batches=2, precision="bf16-mixed", max_steps=2)
    ref, _ = fit(cnn, image_loader(n=64), **kw)
    got, _ = fit(cnn, image_loader(n=64), strategy("all"), **kw)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)


class ManualClassifier(Classifier):
    def __init__(self) -> None:
        super().__init__(ResidualCNN())
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.manual_backward(loss)
        loss2 = torch.nn.functional.cross_entropy(self.net(x.flip(0)), y.flip(0))  # second pass, same step
        self.manual_backward(loss2)
        opt.step()
        self.losses.append(loss.item() + loss2.item())


def test_manual_optimization_matches_plain():
    ref, _ = fit(ManualClassifier, image_loader())
    got, trainer = fit(ManualClassifier, image_loader(), strategy("all"))
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)
    assert trainer.strategy.memory_report().step == 6


def test_validate_test_predict_work_and_offload_nothing(cnn):
    module, trainer = fit(cnn, image_loader(), strategy("all"))
    trainer.validate(module, image_loader(), verbose=False)
    trainer.test(module, image_loader(), verbose=False)
    preds = trainer.predict(module, image_loader())
    assert sum(p.numel() for p in preds) == 48
    trainer = L.Trainer(strategy=strategy("all"), accelerator="cpu", logger=False, enable_progress_bar=False)
    out = trainer.validate(Classifier(ResidualCNN()), image_loader(), verbose=False)
    assert out[0]["val_loss"] > 0
    assert trainer.strategy.memory_report().offloaded_bytes == 0


class Exploding(Classifier):
    def __init__(self) -> None:
        super().__init__(ResidualCNN())
        self.explode_at = 1

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.explode_at:
            raise RuntimeError("boom")
        return loss


def test_exception_in_training_step_leaves_strategy_clean():
    s = strategy("all")
    L.seed_everything(0)
    model = Exploding()
    trainer = L.Trainer(strategy=s, accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, image_loader())
    assert s._offloader is None  # hooks removed, buffers released
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert trainer.validate(model, image_loader(), verbose=False)[0]["val_loss"] > 0
    model.explode_at, model.losses = -1, []
    trainer.fit(model, image_loader())
    assert len(model.losses) >= 2 and trainer.strategy.memory_report().offloaded_bytes > 0


def test_layers_path_groups_prefetch_by_block(lm):
    ref, _ = fit(lm, token_loader())
    got, trainer = fit(lm, token_loader(), strategy("all", layers="model.blocks"))
    assert_same_params(got, ref)


def test_wrong_layers_path_fails_before_training(lm):
    with pytest.raises(ValueError, match=r"layers='model\.layers' does not exist.*'model\.blocks'"):
        fit(lm, token_loader(), strategy("all", layers="model.layers"))


def test_memory_report_is_logged_by_the_memory_monitor(cnn, tmp_path):
    """``MemoryMonitor`` logs the per-step numbers; a Trainer without it logs only what plain Lightning does."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_vdnn import MemoryMonitor

    fit(cnn, image_loader(), strategy("all"), logger=CSVLogger(tmp_path / "monitored"), log_every_n_steps=1,
        callbacks=[MemoryMonitor()])
    text = next((tmp_path / "monitored").rglob("metrics.csv")).read_text()
    assert "vdnn/offloaded_GiB" in text and "vdnn/exposed_copy_ms" in text
    fit(cnn, image_loader(), strategy("all"), logger=CSVLogger(tmp_path / "plain"), log_every_n_steps=1)
    assert not list((tmp_path / "plain").rglob("metrics.csv"))  # the module logs nothing, and neither do we


@pytest.mark.parametrize("callback", ["MemoryMonitor", "MemorySummary"])
def test_memory_callbacks_refuse_a_strategy_that_is_not_ours(cnn, callback, tmp_path):
    import lightning_vdnn
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.loggers import CSVLogger

    with pytest.raises(MisconfigurationException, match=rf"{callback} shows .* trainer.strategy is "
                       r"SingleDeviceStrategy\. Use one of them"):
        fit(cnn, image_loader(), callbacks=[getattr(lightning_vdnn, callback)()], logger=CSVLogger(tmp_path))


def test_memory_monitor_without_a_logger_is_refused(cnn):
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_vdnn import MemoryMonitor

    with pytest.raises(MisconfigurationException, match=r"MemoryMonitor with Trainer\(logger=False\)"):
        fit(cnn, image_loader(), strategy("all"), callbacks=[MemoryMonitor()])


def test_more_than_one_device_is_refused():
    with pytest.raises(ValueError, match="trains on one device"):
        L.Trainer(strategy="vdnn_all", accelerator="cpu", devices=2, logger=False)
