"""``batch_chunks``: a module runs its batch in dim-0 chunks; training equals plain, backward takes one chunk at a
time, the offloader moves the same bytes, bad input is refused with the fix."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from conftest import Classifier, fit, image_loader
from lightning_vdnn import VDNNConfig, VDNNStrategy
from lightning_vdnn.examples.models.vgg import VGG, VGGConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNKS = 4


def vgg() -> Classifier:
    """A small VGG without BatchNorm, dropout off in its classifier: every sample computed on its own."""
    config = VGGConfig(layers=(8, "M", 16, 16, "M"), num_classes=10, image_size=16, hidden=32, dropout=0.0)
    return Classifier(VGG(config))


def chunked(policy: str = "all", **kw) -> VDNNStrategy:
    return VDNNStrategy(policy, min_offload_bytes=0, batch_chunks=CHUNKS, chunk_layers="net.features", **kw)


@pytest.mark.parametrize("policy", ["all", "none"])
def test_chunked_trunk_trains_as_plain(policy):
    ref, _ = fit(vgg, image_loader(), max_steps=3)
    got, trainer = fit(vgg, image_loader(), chunked(policy), max_steps=3)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(got.net.features)  # its own forward back after fit


def test_offloads_the_same_bytes_in_a_call_per_chunk():
    """The bytes saved for backward do not change; each layer of the trunk is called (and planned) per chunk."""
    _, whole = fit(vgg, image_loader(), VDNNStrategy("all", min_offload_bytes=0), max_steps=1)
    _, split = fit(vgg, image_loader(), chunked(), max_steps=1)
    a, b = whole.strategy.memory_report(), split.strategy.memory_report()
    assert b.offloaded_bytes == a.offloaded_bytes > 0
    trunk = sum(1 for m in vgg().net.features.modules() if not list(m.children()))
    assert len(b.layers) == len(a.layers) + (CHUNKS - 1) * trunk


def test_backward_runs_one_chunk_to_the_end_before_the_next():
    """What bounds the peak: autograd finishes the last chunk's graph before it starts the one before."""
    order: list[tuple[str, int]] = []
    seen: dict[str, int] = {}

    def tagged(name):
        def forward_hook(module, args, out):
            seen[name] = seen.get(name, -1) + 1
            chunk = seen[name]
            out.register_hook(lambda grad: order.append((name, chunk)))
        return forward_hook

    def make():
        module = vgg()
        for name, m in module.net.features.named_children():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(tagged(name))
        return module

    fit(make, image_loader(n=16), chunked("none"), max_steps=1)
    convs = sorted({name for name, _ in order})
    assert len(convs) == 3 and len(order) == 3 * CHUNKS
    assert [c for _, c in order] == [c for c in reversed(range(CHUNKS)) for _ in convs]


def test_predict_runs_chunked_too():
    ref, _ = fit(vgg, image_loader(), max_steps=1)
    got, trainer = fit(vgg, image_loader(), chunked("all"), max_steps=1)
    plain = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(ref, image_loader())
    calls = []
    got.net.features[0].register_forward_hook(lambda *_: calls.append(1))
    ours = trainer.predict(got, image_loader())
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))
    assert len(calls) == 3 * CHUNKS  # three batches of 16, four chunks each


@pytest.mark.parametrize("kw, error, match", [
    (dict(batch_chunks=0), ValueError, r"batch_chunks=0 must be a positive integer"),
    (dict(batch_chunks=4), ValueError, r"batch_chunks=4 and chunk_layers=None go together"),
    (dict(batch_chunks=1, chunk_layers="net.features"), ValueError,
     r"batch_chunks=1 and chunk_layers='net.features' go together"),
    (dict(batch_chunks=4, chunk_layers="net features"), ValueError, r"chunk_layers='net features' is not a dotted"),
    (dict(batch_chunks=2.0, chunk_layers="net.features"), TypeError, r"batch_chunks=2.0 must be an int"),
    (dict(batch_chunks=4, chunk_layers="model.blocks", layer_streaming=True), ValueError,
     r"batch_chunks=4 with layer streaming: .* microbatches=4 instead"),
])
def test_bad_chunk_settings_are_refused(kw, error, match):
    with pytest.raises(error, match=match):
        VDNNConfig(**kw)


def test_a_missing_module_or_batchnorm_in_it_is_refused_at_setup(cnn):
    with pytest.raises(ValueError, match=r"chunk_layers='net.trunk' does not exist in Classifier\. Modules: "):
        fit(vgg, image_loader(), VDNNStrategy("all", batch_chunks=2, chunk_layers="net.trunk"), max_steps=1)
    with pytest.raises(ValueError, match=r"net\.stem\.1 is a BatchNorm2d, whose statistics would then cover a "
                                         r"chunk.*batch_chunks=1"):
        fit(cnn, image_loader(), VDNNStrategy("all", batch_chunks=2, chunk_layers="net.stem"), max_steps=1)


def test_a_module_that_does_not_return_the_batch_first_is_refused():
    class Summed(nn.Module):
        def forward(self, x):
            return x.sum(0)

    module = vgg()
    module.net.features.append(Summed())
    with pytest.raises(ValueError, match=r"returned \(16, 4, 4\) for a chunk of shape \(4, 3, 16, 16\).*batch-first"):
        fit(lambda: module, image_loader(), VDNNStrategy("all", batch_chunks=4, chunk_layers="net.features"),
            max_steps=1)


def test_entry_points_without_chunking_refuse_it_rather_than_ignore_it():
    from lightning_vdnn import VDNNZeroStrategy
    from lightning_vdnn.integrations.torch_loop import ActivationOffload
    from lightning_vdnn.integrations.fabric import VDNNFabricStrategy

    config = VDNNConfig(batch_chunks=2, chunk_layers="features")
    for build, entry in [(lambda: VDNNZeroStrategy(zero_stage=2, vdnn_config=config), "VDNNZeroStrategy"),
                         (lambda: VDNNFabricStrategy(config=config), "VDNNFabricStrategy"),
                         (lambda: ActivationOffload(vgg().net, config), "offload_activations")]:
        with pytest.raises(NotImplementedError, match=rf"batch_chunks=2 is built for VDNNStrategy .* not for {entry}"):
            build()


def test_a_copy_of_a_chunked_module_runs_its_own_weights():
    """EMA or SWA callbacks deepcopy the model while it is chunked: the copy computes with its own weights."""
    import copy

    from lightning_vdnn.offload.batch_chunks import BatchChunks

    module = vgg()
    chunks = BatchChunks(module, "net.features", 4)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for p in twin.net.features.parameters():
            p.mul_(2)
    x = torch.randn(8, 3, 16, 16)
    assert not torch.allclose(twin.net.features(x), module.net.features(x))
    chunks.close()
    assert "forward" not in vars(module.net.features)
