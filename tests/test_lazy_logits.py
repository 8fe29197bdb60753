"""The chunked head's stand-in for a causal LM's logits (``streaming/lazy_logits.py``): it answers shape questions
without memory, records the per-token ops a model applies on the way to its loss and replays them on a chunk exactly,
and refuses any other op by name before computing it."""

from __future__ import annotations

import pytest
import torch

from lightning_vdnn.streaming.lazy_logits import LazyLogits, NotLogitsPerToken

B, S, H, V = 2, 5, 8, 11


def stand_in(dtype=torch.float32) -> LazyLogits:
    return LazyLogits.start(torch.randn(B, S, H, dtype=dtype), V, origin="call", model="TinyLM")


def test_shape_questions_are_answered_without_memory():
    lazy = stand_in()
    assert lazy.shape == (B, S, V) and lazy.size(-1) == V and lazy.dim() == 3 and lazy.dtype == torch.float32
    assert lazy.untyped_storage().nbytes() == 4  # one broadcast zero, whatever the vocabulary
    assert repr(lazy) == "LazyLogits(shape=(2, 5, 11), dtype=torch.float32, ops=[])"


def test_per_token_ops_are_recorded_and_replayed_on_a_chunk_as_on_the_batch():
    """Gemma's soft-capping, Granite's and Cohere's scaling, OPT's contiguous, a cast, a bias per word."""
    bias = torch.randn(V)
    lazy = stand_in(torch.bfloat16)
    out = (torch.tanh(lazy / 3.0) * 3.0).contiguous().float() * 0.5 + bias
    assert out.dtype == torch.float32 and out.shape == (B, S, V) and out.origin == "call"
    assert out.ops == ("div", "tanh", "mul", "contiguous", "float", "mul", "add")
    assert lazy.ops == ()  # each op a new stand-in: the head's own is unchanged
    x = torch.randn(B, S, V, dtype=torch.bfloat16)
    want = (torch.tanh(x / 3.0) * 3.0).float() * 0.5 + bias
    assert torch.equal(out.replay(x), want)
    assert torch.equal(out.replay(x[:1, 2:4]), want[:1, 2:4])  # a chunk of tokens: its share, bit for bit


def test_in_place_ops_are_recorded_on_the_same_stand_in():
    lazy = stand_in()
    same = lazy.mul_(2.0)
    lazy.add_(1.0)
    assert same is lazy and lazy.ops == ("mul_", "add_")
    x = torch.randn(B, S, V)
    assert torch.equal(lazy.replay(x.clone()), x * 2.0 + 1.0)


def test_a_learned_scale_gets_its_gradient_through_the_replay():
    scale = torch.nn.Parameter(torch.tensor(0.5))
    out = stand_in() * scale
    x = torch.randn(B, S, V)
    out.replay(x).sum().backward()
    torch.testing.assert_close(scale.grad, x.sum())


@pytest.mark.parametrize("op, name", [
    (lambda t: t / t.std(), "std"),  # a statistic of the whole batch
    (lambda t: t + torch.ones(B, S, V), "add"),  # an operand of the batch's shape
    (lambda t: t[:, :3], "__getitem__"),  # an index over the tokens
    (lambda t: t.view(-1, V), "view"),
    (lambda t: torch.cat([t, t]), "cat"),
    (lambda t: t.log_softmax(-1), "log_softmax"),
])
def test_other_ops_are_refused_by_name_with_the_fix(op, name):
    with pytest.raises(NotLogitsPerToken, match=rf"TinyLM applies '{name}' to its head's logits before its loss.*"
                                               r"without labels.*microbatches=1") as err:
        op(stand_in())
    assert err.value.op == name and isinstance(err.value, RuntimeError)
