"""``chunked_cross_entropy``: the plain loss and gradients, with the logits made a chunk of tokens at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_params, fit, token_loader
from lightning_vdnn import VDNNStrategy, chunked_cross_entropy
from test_streaming import LM, l2l


def _inputs(seed: int = 0, vocab: int = 50, ignore: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 10, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, vocab)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, 16, generator=g))
        head.bias.copy_(torch.randn(vocab, generator=g))
    targets = torch.randint(vocab, (3, 10), generator=g)
    if ignore:
        targets[0, :4] = -100
    return hidden, head, targets


@pytest.mark.parametrize("chunks", [1, 3, 7, 30, 64])  # 7: uneven pieces; 64: more pieces than tokens
@pytest.mark.parametrize("ignore", [False, True])
def test_equals_the_plain_loss_and_its_gradients(chunks, ignore):
    hidden, head, targets = _inputs(ignore=ignore)
    ref = F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten())
    ref_grads = torch.autograd.grad(ref, (hidden, head.weight, head.bias))
    got = chunked_cross_entropy(hidden, head, targets, chunks)
    grads = torch.autograd.grad(got, (hidden, head.weight, head.bias))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_keeps_no_logits_for_backward():
    """What autograd saves over the whole loss: with chunks, no tensor of vocabulary width (the logits, their
    softmax) is kept between forward and backward; without, the logits are."""
    hidden, head, targets = _inputs(vocab=97)

    def widths(chunks: int) -> set[int]:
        seen: set[int] = set()

        def pack(t):
            seen.add(t.shape[-1] if t.dim() else 0)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = chunked_cross_entropy(hidden, head, targets, chunks)
        loss.backward()
        return seen

    assert 97 in widths(1)
    assert 97 not in widths(5)  # the head's weight [97, 16] has width 16


@pytest.mark.parametrize("chunks, pattern", [(0, r"chunks=0 must be a positive integer"),
                                             (2.5, r"chunks=2.5 must be"), (True, r"chunks=True must be")])
def test_bad_chunks_are_named(chunks, pattern):
    hidden, head, targets = _inputs()
    with pytest.raises(ValueError, match=pattern):
        chunked_cross_entropy(hidden, head, targets, chunks)


def test_mismatched_shapes_are_named():
    hidden, head, targets = _inputs()
    with pytest.raises(ValueError, match=r"targets \(3, 9\) do not match: hidden is \[\.\.\., d\]"):
        chunked_cross_entropy(hidden, head, targets[:, :9])


def test_language_model_with_loss_chunks_trains_like_plain_under_layer_streaming():
    """``LanguageModel(loss_chunks=4)`` under ``l2l`` with ``activation_offload="all"`` equals the same model
    trained plainly (tied embeddings: the head's weight is the embedding's), and its losses equal those of the
    whole loss at once. (Parameters are compared against the chunked plain run: the sum over chunks rounds
    differently from one mean, and AdamW turns the attention key bias's zero-in-theory gradients, pure rounding
    noise, into steps of the learning rate's size.)"""
    data = lambda: token_loader(n=40, batch=4, seq=32)  # noqa: E731
    whole, _ = fit(lambda: LM(), data(), max_steps=5)
    ref, _ = fit(lambda: LM(loss_chunks=4), data(), max_steps=5)
    got, _ = fit(lambda: LM(loss_chunks=4), data(), max_steps=5, strategy=l2l(activation_offload="all"))
    torch.testing.assert_close(torch.tensor(ref.losses), torch.tensor(whole.losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref)
    assert got.model.lm_head.weight is got.model.wte.weight


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_language_model_refuses_bad_loss_chunks(bad):
    with pytest.raises(ValueError, match=rf"loss_chunks={bad!r} must be a positive integer"):
        LM(loss_chunks=bad)
