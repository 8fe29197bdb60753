"""Layer streaming's host buffers on 2 MiB pages (``streaming/huge_pages.py``, ``VDNNConfig.host_huge_pages``):
advised before their first touch, only where large enough, and nothing a run computes changes."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch

from conftest import RecordingGPT, fit, token_loader
from lightning_vdnn import VDNNConfig, VDNNStrategy
from lightning_vdnn.streaming import huge_pages
from lightning_vdnn.streaming.host_update import AdamPass

HUGE = huge_pages.HUGE_PAGE
needs_thp = pytest.mark.skipif(not sys.platform.startswith("linux") or huge_pages.thp_mode() == "never",
                               reason="the kernel offers no transparent huge pages")


@needs_thp
def test_a_large_buffer_starts_on_a_huge_page_and_is_advised_before_its_first_touch():
    t = huge_pages.empty(3 * HUGE // 4 + 5, torch.float32)  # three huge pages and 20 bytes
    assert t.data_ptr() % HUGE == 0 and t.numel() == 3 * HUGE // 4 + 5 and t.dtype == torch.float32
    advised, _ = huge_pages.mapping(t)
    assert advised
    t.fill_(1.5)
    assert torch.all(t == 1.5)


@needs_thp
def test_small_buffers_and_huge_false_are_ordinary_ones():
    small = huge_pages.empty(HUGE // 4 - 1, torch.float32)
    assert small.untyped_storage().nbytes() == small.nbytes  # not over-allocated
    off = huge_pages.zeros(4 * HUGE, torch.uint8, huge=False)
    assert off.untyped_storage().nbytes() == off.nbytes
    if huge_pages.thp_mode() == "madvise":  # in "always" mode every large mapping is eligible anyway
        assert huge_pages.mapping(off) == (False, 0)


@needs_thp
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_the_one_pass_keeps_its_moments_on_huge_pages_with_the_same_bits(state_dtype):
    n = HUGE // 2 + 7  # 4 MiB of fp32 moments, 2 MiB of bf16: both large enough
    torch.manual_seed(0)
    start, grads = torch.randn(n), [torch.randn(n).to(state_dtype) for _ in range(3)]
    got = {}
    for huge in (True, False):
        param = torch.nn.Parameter(start.clone())
        opt = torch.optim.AdamW([param], lr=1e-2, weight_decay=0.1)
        update, copy = AdamPass("torch", state_dtype, huge_pages=huge), torch.empty(n, dtype=torch.bfloat16)
        for g in grads:
            update.update(opt, opt.param_groups[0], param, param.detach(), g, opt.state[param], copy)
        state = opt.state[param]
        assert [huge_pages.mapping(state[k])[0] for k in ("exp_avg", "exp_avg_sq")] == [huge, huge] or (
            not huge and huge_pages.thp_mode() == "always")
        got[huge] = (param.detach().clone(), copy, state["exp_avg"], state["exp_avg_sq"])
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)


class Advised(L.Callback):
    """Mid-training: whether a block weight (a view of its block's host buffer) and its first moment are advised."""

    def on_train_batch_end(self, trainer, module, *_):
        weight = module.model.blocks[0].mlp.fc.weight
        moment = trainer.optimizers[0].state[weight].get("exp_avg")
        self.seen = (huge_pages.mapping(weight)[0], moment is not None and huge_pages.mapping(moment)[0])


class WideLM(RecordingGPT):
    def __init__(self) -> None:  # 512 wide: a block's host buffer and its MLP's moments pass a huge page
        super().__init__(max_steps=4, n_embd=512, n_head=4, n_layer=2)


def test_streaming_on_huge_pages_trains_exactly_as_on_ordinary_ones():
    """Losses, parameters and buffers of a streamed run equal with and without huge pages (the host update's one
    pass and the blocks' host buffers allocated either way)."""
    runs = {}
    for huge in (True, False):
        strategy = VDNNStrategy(config=VDNNConfig(activation_offload="none", layer_streaming=True,
                                                  host_optimizer="torch", host_huge_pages=huge))
        advised = Advised()
        runs[huge], _ = fit(WideLM, token_loader(n=12, batch=2, seq=32), strategy, max_steps=3, callbacks=[advised])
        if huge_pages.thp_mode() == "madvise":
            assert advised.seen == (huge, huge)
    on, off = runs[True], runs[False]
    assert on.losses == off.losses
    for (name, a), (_, b) in zip(on.state_dict().items(), off.state_dict().items()):
        assert torch.equal(a, b), name


def test_host_huge_pages_must_be_a_bool():
    with pytest.raises(TypeError, match="host_huge_pages='yes' must be True or False"):
        VDNNConfig(host_huge_pages="yes")
