"""Under layer-major microbatches, a Hugging Face causal LM's head and loss run a chunk of tokens at a time.

``LlamaForCausalLM(...)(input_ids, labels=labels)`` runs its head (``lm_head``) and its loss inside ``forward``,
after the last block: the logits of the whole batch exist at once (8 x 8 x 1024 tokens of a 32000-word vocabulary
are 16 GiB in bf16, again in fp32 for the loss, again for their gradient), while each streamed block sees 1/k of the
batch. :class:`ChunkedHead` makes that tail one more stage run chunk by chunk: in a training call that passes
``labels`` (or ``shift_labels``), the head only records its input, and the loss is the sum over ``k`` chunks of
tokens of ``head(chunk)`` and the model's own loss function on it, each under activation checkpointing (backward
rebuilds one chunk's logits at a time, as :func:`~lightning_vdnn.loss.chunked_cross_entropy` does).

The chunks' sum equals the model's mean: each chunk's loss is its summed cross-entropy divided by the token count of
the whole batch, which is ``num_items_in_batch`` when the caller gives it (the Trainer's gradient accumulation) and
otherwise the count of labels that are not ``ignore_index``, as ``ForCausalLMLoss``'s mean counts them.

What it needs, and what the caller gets:

- The model's loss is ``transformers``' causal LM loss (``ForCausalLMLoss``: the ``...ForCausalLM`` and
  ``...LMHeadModel`` classes), its head a module (``get_output_embeddings()``). What the model does to the head's
  output before the loss (Granite's and Cohere's scaling, Gemma's soft-capping, OPT's ``contiguous``, a cast) is
  recorded by the stand-in the head returns and done to each chunk's logits (``streaming/lazy_logits.py``); an op
  that does not act on each token alone raises ``RuntimeError`` naming it and the fix. In a model compiled whole
  (``torch.compile(model)``) the stand-in is a plain tensor Dynamo traces, which the loss must get unchanged. A
  custom ``model.loss_function`` is left alone (head whole).
- The output's ``logits`` is ``None`` in such a call: not materialised, that being the point. A call without
  labels (compute the loss yourself) or without autograd (validation, generation) runs the head whole and returns
  the logits, as before.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_vdnn.streaming.lazy_logits import LazyLogits

#: ``transformers``' causal LM loss, by name (the library is not imported here).
CAUSAL_LOSS = "ForCausalLMLoss"


def find_causal_lm(root: nn.Module, container: nn.Module) -> Optional[nn.Module]:
    """The ``transformers`` causal LM under ``root`` that holds the streamed ``container``, if its forward passes
    its head's output to the library's causal LM loss (``self.loss_function``) and that head is a module outside
    the blocks; else None (its tail then runs as before, whole)."""
    for module in root.modules():
        outputs = getattr(module, "get_output_embeddings", None)
        if outputs is None or not any(m is container for m in module.modules()):
            continue
        return module if _chunkable(module, outputs(), container) else None
    return None


def _chunkable(lm: nn.Module, head: Any, container: nn.Module) -> bool:
    name = type(lm).__name__
    if getattr(lm, "loss_type", None) != "ForCausalLM" and not name.endswith("LMHeadModel"):
        return False  # masked LMs, seq2seq, classifiers: other losses, or their own arithmetic
    if "_loss_function" in lm.__dict__ or getattr(getattr(lm, "loss_function", None), "__name__", "") != CAUSAL_LOSS:
        return False  # the user's own loss: what it computes is not known here
    if not isinstance(getattr(head, "weight", None), Tensor) or any(m is head for m in container.modules()):
        return False
    try:
        source = inspect.getsource(type(lm).forward)
    except (OSError, TypeError):
        return False
    return "self.loss_function(" in source


class _Call:
    """One call of the LM: whether it runs the tail in chunks, and the stand-in its head returned."""

    __slots__ = ("chunked", "proxy", "hidden")

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked
        self.proxy: Optional[Tensor] = None  # a LazyLogits, or a plain stand-in under compile
        self.hidden: Optional[Tensor] = None


class ChunkedHead:
    """Runs ``lm``'s head and causal LM loss in ``chunks`` pieces of the tokens in training calls with labels.

    Args:
        lm: a ``transformers`` causal LM (:func:`find_causal_lm`).
        chunks: pieces the tokens are split into (the streamer's ``microbatches``).

    Example::

        head = ChunkedHead(model, chunks=8)   # LayerStreamer does this under microbatches=8
        loss = model(input_ids=x, labels=x).loss   # .logits is None; the tail ran 8 chunks
        head.close()
    """

    def __init__(self, lm: nn.Module, chunks: int) -> None:
        self.lm, self.chunks = lm, chunks
        self.head: nn.Module = lm.get_output_embeddings()
        self._calls: list[_Call] = []
        self._loss = lm.loss_function
        self._own_forward = self.head.__dict__.get("forward")
        self._plain = self.head.forward
        self.head.forward = self._head_forward
        lm.loss_function = self._chunked_loss  # the library's setter: an instance attribute, removed at close
        self._hooks = [lm.register_forward_pre_hook(self._enter, with_kwargs=True),
                       lm.register_forward_hook(self._leave, always_call=True)]
        self._signature = _labels_position(lm)

    def close(self) -> None:
        """The head's and the model's own forward and loss back."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self._own_forward is None:
            self.head.__dict__.pop("forward", None)
        else:
            self.head.forward = self._own_forward
        self.lm.__dict__.pop("_loss_function", None)

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        labelled = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None or (
            self._signature is not None and len(args) > self._signature and args[self._signature] is not None)
        self._calls.append(_Call(labelled and torch.is_grad_enabled()))

    def _leave(self, module: nn.Module, args: tuple, out: Any) -> Any:
        call = self._calls.pop() if self._calls else None
        if call is None or call.proxy is None or out is None:  # None: the forward raised
            return None
        if call.hidden is not None:  # made its logits, never passed them to its loss
            raise RuntimeError(self._changed())
        if isinstance(out, tuple):
            return tuple(None if _stand_in_of(o, call) else o for o in out)
        if _stand_in_of(getattr(out, "logits", None), call):
            out["logits"] = None  # ModelOutput: the key and the attribute
        return None

    def _head_forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        call = self._calls[-1] if self._calls else None
        if call is None or not call.chunked or call.proxy is not None or args or kwargs:
            return self._plain(hidden, *args, **kwargs)
        call.hidden = hidden
        vocab = self.head.weight.shape[0]
        if torch.compiler.is_compiling():  # a model compiled whole: Dynamo traces a plain stand-in, not a subclass
            call.proxy = hidden.new_zeros(()).expand(*hidden.shape[:-1], vocab)  # (the loss must get it unchanged)
        else:  # what the library code holds as logits: no memory, never read; it records what the model does to them
            call.proxy = LazyLogits.start(hidden, vocab, call, type(self.lm).__name__)
        return call.proxy

    def _chunked_loss(self, logits: Tensor, labels: Optional[Tensor], vocab_size: int,
                      num_items_in_batch: Optional[Any] = None, ignore_index: int = -100,
                      shift_labels: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        call = next((c for c in reversed(self._calls) if c.proxy is not None), None)
        if call is None or call.hidden is None:
            return self._loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                              ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if not _stand_in_of(logits, call):
            raise RuntimeError(self._changed())
        hidden, call.hidden = call.hidden, None
        if shift_labels is None:  # what ForCausalLMLoss does: token t predicts label t+1, the last predicts nothing
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        if tuple(shift_labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"{type(self.lm).__name__}: labels of shape {tuple(shift_labels.shape)} do not match the "
                             f"{tuple(hidden.shape[:-1])} hidden states its head receives (logits_to_keep?); with "
                             "microbatches the loss runs in chunks of tokens and needs one label per token. Pass "
                             "logits_to_keep=0, or call without labels and compute the loss yourself.")
        targets = shift_labels.reshape(-1).to(hidden.device)
        count = num_items_in_batch if num_items_in_batch is not None else (targets != ignore_index).sum()
        flat = hidden.reshape(targets.numel(), hidden.shape[-1])
        part = functools.partial(self._summed, vocab_size=vocab_size, count=count, ignore_index=ignore_index,
                                 kwargs=kwargs, logits=logits)
        total = None
        for h, t in zip(flat.tensor_split(self.chunks), targets.tensor_split(self.chunks)):
            piece = checkpoint(part, h, t, use_reentrant=False, preserve_rng_state=False)
            total = piece if total is None else total + piece
        return total

    def _summed(self, h: Tensor, t: Tensor, vocab_size: int, count: Any, ignore_index: int, kwargs: dict,
                logits: Tensor) -> Tensor:
        """One chunk's loss as a share of the batch's: its summed cross-entropy over the batch's token count, from
        its logits with what the model did to the batch's done to them."""
        chunk = self.head(h).reshape(*(1,) * (logits.dim() - 2), *h.shape[:-1], -1)  # the batch's logits' rank
        if isinstance(logits, LazyLogits):
            chunk = logits.replay(chunk)
        return self._loss(chunk.reshape(1, t.numel(), -1), t[None], vocab_size,
                          num_items_in_batch=count, ignore_index=ignore_index, shift_labels=t[None], **kwargs)

    def _changed(self) -> str:
        return (f"{type(self.lm).__name__} passed its loss other logits than its head's, or made them without "
                "computing its loss: with microbatches the head and loss of a call with labels run together, a "
                "chunk of tokens at a time, and cannot follow that. Call the model without labels and compute the "
                "loss from .logits yourself (the head then runs whole), or use microbatches=1.")


def _stand_in_of(value: Any, call: _Call) -> bool:
    """Whether ``value`` is ``call``'s head's stand-in, or one the model derived from it."""
    return value is call.proxy or (isinstance(value, LazyLogits) and value.origin is call)


def _labels_position(lm: nn.Module) -> Optional[int]:
    """Where ``labels`` sits among the forward's positional parameters (None: not one of them)."""
    try:
        params = list(inspect.signature(lm.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index("labels") if "labels" in positional else None
