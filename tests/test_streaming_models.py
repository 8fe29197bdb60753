"""Layer streaming on models we did not write: Hugging Face Llama, Mistral, Mixtral, Qwen2-MoE, Gemma 2, GPT-NeoX,
Bloom, GPT-2, BERT, DeBERTa-v2, T5, ViT, Swin, ResNet, Jamba, Mamba and ``torch.nn.TransformerEncoder``, built from tiny
configs and left untouched. Each trains under ``l2l`` exactly as under plain Lightning: losses, parameters and
buffers (BatchNorm's running statistics and count)."""

from __future__ import annotations

import functools
import tempfile
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import fit
from lightning_vdnn import VDNNStrategy, stream_layers

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ, BATCH = 64, 12, 4


def _lm_kwargs(dropout: float) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, attention_dropout=dropout)


#: name -> (build(dropout) -> model, kind of batch, blocks' path)
MODELS = {
    "llama": (lambda d: tf.LlamaForCausalLM(tf.LlamaConfig(**_lm_kwargs(d))), "tokens", "model.layers"),
    "mistral": (lambda d: tf.MistralForCausalLM(tf.MistralConfig(**_lm_kwargs(d))), "tokens", "model.layers"),
    "mixtral": (lambda d: tf.MixtralForCausalLM(tf.MixtralConfig(**_lm_kwargs(d), num_local_experts=4,
                                                                 num_experts_per_tok=2)), "tokens", "model.layers"),
    "gpt2": (lambda d: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                                        resid_pdrop=d, embd_pdrop=d, attn_pdrop=d)),
             "tokens", "transformer.h"),
    "bert": (lambda d: tf.BertForMaskedLM(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                                        num_attention_heads=4, intermediate_size=48,
                                                        hidden_dropout_prob=d, attention_probs_dropout_prob=d)),
             "masked", "bert.encoder.layer"),
    "t5": (lambda d: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3,
                                                               num_heads=4, decoder_start_token_id=0, dropout_rate=d)),
           "tokens", ["encoder.block", "decoder.block"]),
    "vit": (lambda d: tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                                intermediate_size=48, image_size=16, patch_size=4,
                                                                num_labels=3, hidden_dropout_prob=d)),
            "images", "vit.layers"),
    "resnet": (lambda d: tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16],
                                                                         depths=[1, 1, 1], num_labels=3)),
               "images", "resnet.encoder.stages"),
    "torch_encoder": (lambda d: TorchEncoder(d), "sequences", "encoder.layers"),
    # shared experts beside the routed ones
    "qwen2_moe": (lambda d: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        **_lm_kwargs(d), moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2)), "tokens", "model.layers"),
    # sliding-window layers between global ones, soft-capped attention and logits
    "gemma2": (lambda d: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_lm_kwargs(d), head_dim=8, sliding_window=4)),
               "tokens", "model.layers"),
    # attention and MLP side by side from one input (parallel residual), partial rotary
    "gpt_neox": (lambda d: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout=d, attention_dropout=d)), "tokens", "gpt_neox.layers"),
    # ALiBi bias passed to each block with the batch folded into dim 0 with the heads
    "bloom": (lambda d: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=3, n_head=4,
                                                           hidden_dropout=d, attention_dropout=d)),
              "tokens", "transformer.h"),
    # disentangled relative attention: a position embedding table every layer reads
    "deberta_v2": (lambda d: tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, relative_attention=True, position_buckets=8, hidden_dropout_prob=d,
        attention_probs_dropout_prob=d)), "masked", "deberta.encoder.layer"),
    # windowed attention in stages of different widths (patch merging between them)
    "swin": (lambda d: tf.SwinForImageClassification(tf.SwinConfig(
        image_size=16, patch_size=2, embed_dim=8, depths=[1, 1, 1], num_heads=[2, 2, 2], window_size=2, num_labels=3,
        hidden_dropout_prob=d, attention_probs_dropout_prob=d)), "images", "swin.encoder.layers"),
    # a state-space model: no attention, a causal convolution and a selective scan per block
    # attention and Mamba layers of two classes in one list, MoE every other layer (a hybrid model)
    "jamba": (lambda d: tf.JambaForCausalLM(tf.JambaConfig(
        **_lm_kwargs(d), attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=2, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False)),
        "tokens", "model.layers"),
    "mamba": (lambda d: tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                                           state_size=4, expand=2, conv_kernel=4)),
              "tokens", "backbone.layers"),
}
BATCHNORM = {"resnet"}


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` (batch first), called with a causal mask and ``is_causal``, as people do."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 48, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.encoder(self.proj(x), mask=mask, is_causal=True)[:, -1])


def batches(kind: str, n: int = 3) -> list:
    g = torch.Generator().manual_seed(7)
    if kind in ("tokens", "masked"):
        return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]
    if kind == "images":
        return [(torch.randn(BATCH, 3, 16, 16, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
                for _ in range(n)]
    return [(torch.randn(BATCH, SEQ, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(n)]


class Task(L.LightningModule):
    """The model's own loss where it has one (``labels=``), SGD with momentum; records the losses."""

    def __init__(self, name: str, dropout: float = 0.0) -> None:
        super().__init__()
        build, self.kind, _ = MODELS[name]
        self.model = build(dropout)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        if self.kind == "tokens":
            loss = self.model(input_ids=batch, labels=batch).loss
        elif self.kind == "masked":
            loss = self.model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        elif self.kind == "images":
            loss = self.model(pixel_values=batch[0], labels=batch[1]).loss
        else:
            loss = F.cross_entropy(self.model(batch[0]), batch[1])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return sgd(self)


def l2l(**kw) -> VDNNStrategy:
    return VDNNStrategy(kw.pop("activation_offload", "none"), layer_streaming=True, **kw)


def train(name: str, strategy="auto", dropout: float = 0.0, steps: int = 3) -> Task:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = torch.utils.data.DataLoader(batches(MODELS[name][1], steps), batch_size=None)
        task, _ = fit(lambda: Task(name, dropout), loader, strategy, max_steps=steps)
    return task


@functools.lru_cache(maxsize=None)
def plain(name: str, dropout: float = 0.0) -> Task:
    return train(name, dropout=dropout)


def assert_same_training(got: Task, ref: Task, tol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=tol, atol=tol)
    want = ref.model.state_dict()
    for key, value in got.model.state_dict().items():  # parameters and buffers
        torch.testing.assert_close(value, want[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


SETTINGS = {
    "auto-detected": {},
    "named layers": "layers",
    "resident_blocks=1": {"resident_blocks": 1},
    "saved_blocks=1": {"saved_blocks": 1},
    "offload_optimizer": {"offload_optimizer": True},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_library_model_streams_like_plain_training(name, setting):
    kwargs = SETTINGS[setting]
    if kwargs == "layers":
        path = MODELS[name][2]  # under the LightningModule's ``model``
        kwargs = {"layers": f"model.{path}" if isinstance(path, str) else [f"model.{p}" for p in path]}
    dropout = 0.0 if name in BATCHNORM else 0.1  # dropout: each recompute replays the forward's draws
    got = train(name, l2l(**kwargs), dropout=dropout)
    assert_same_training(got, plain(name, dropout))


@pytest.mark.parametrize("name", list(MODELS))
def test_library_model_streams_like_plain_training_under_bf16_autocast(name):
    """``bf16-mixed``: forward runs each block with autograd on, as plain training does, so kernels that choose by
    whether a gradient is wanted (attention with a mask: T5, Swin) compute plain training's bits. No dropout:
    attention with dropout takes the same kernel either way."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = lambda: torch.utils.data.DataLoader(batches(MODELS[name][1]), batch_size=None)  # noqa: E731
        ref, _ = fit(lambda: Task(name), loader(), precision="bf16-mixed")
        got, _ = fit(lambda: Task(name), loader(), l2l(), precision="bf16-mixed")
    assert_same_training(got, ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_library_model_streams_like_plain_training_in_bf16_true(name):
    """``bf16-true``: the host keeps the model's bf16 weights as plain training keeps them on the device, and the
    user's optimizer steps them there; losses equal, weights and buffers too but for T5, whose shared embedding
    sums its gradient in another order when its blocks stream (one bf16 step apart at most)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = lambda: torch.utils.data.DataLoader(batches(MODELS[name][1]), batch_size=None)  # noqa: E731
        ref, _ = fit(lambda: Task(name), loader(), precision="bf16-true")
        got, _ = fit(lambda: Task(name), loader(), l2l(), precision="bf16-true")
    assert got.losses == ref.losses
    want = ref.model.state_dict()
    for key, value in got.model.state_dict().items():
        assert value.dtype == want[key].dtype
        tol = (2**-7, 2**-10) if name == "t5" else (0, 0)  # T5: one bf16 step of its weights' scale (below 0.25)
        torch.testing.assert_close(value, want[key], rtol=tol[0], atol=tol[1], msg=key)


@pytest.mark.parametrize("name", sorted(set(MODELS) - BATCHNORM))
def test_library_model_microbatches_like_plain_training(name):
    """Masks, rotary tables, position biases and padding masks reach every chunk; dropout is off, as chunks draw
    their own masks. 2e-5: the chunks' weight gradients add up in another order than the whole batch's."""
    got = train(name, l2l(microbatches=2))
    assert_same_training(got, plain(name), tol=2e-5)


def test_bloom_microbatches_split_its_folded_alibi_by_sample_under_padding():
    """Bloom hands each block its ALiBi bias as ``(batch * heads, 1, keys)``, built from the attention mask: with
    left padding each sample's differs, and each chunk must get its own samples' rows
    (``hf_conventions.folded_batch``)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :4] = mask[2, :7] = 0  # left padding of different lengths
    labels = ids.masked_fill(mask == 0, -100)

    def grads(model: nn.Module) -> list[torch.Tensor]:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return [p.grad for p in model.parameters()]

    from lightning_vdnn.streaming.streamer import LayerStreamer

    torch.manual_seed(0)
    ref = MODELS["bloom"][0](0.0)
    got = MODELS["bloom"][0](0.0)
    got.load_state_dict(ref.state_dict())
    streamer = LayerStreamer(got, "transformer.h", torch.device("cpu"), microbatches=2)
    try:
        mine = grads(got)
    finally:
        streamer.close()
    for (name, _), a, b in zip(got.named_parameters(), mine, grads(ref)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=name)


def test_batchnorm_blocks_refuse_microbatches_with_the_alternative():
    with pytest.raises(ValueError, match=r"microbatches=2 .*BatchNorm2d.* microbatches=1"):
        train("resnet", l2l(microbatches=2))


def test_batchnorm_statistics_change_once_per_step_under_recompute():
    """The recompute in backward runs each block's forward again in training mode; its BatchNorm must not count
    the batch twice: ``num_batches_tracked`` is the step count, the running statistics plain training's."""
    got = train("resnet", l2l(), steps=3)
    counts = {k: int(v) for k, v in got.model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {3}
    got.model.eval()
    ref = plain("resnet").model.eval()
    x = batches("images")[0][0]
    torch.testing.assert_close(got.model(pixel_values=x).logits, ref(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


def test_resident_blocks_that_recompute_keep_batchnorm_exact():
    """Resident blocks under activation checkpointing (``offload/recompute.py``) replay their forward the same way."""
    from lightning_vdnn.streaming.streamer import LayerStreamer

    torch.manual_seed(0)
    ref, got = Task("resnet"), Task("resnet")
    got.load_state_dict(ref.state_dict())
    streamer = LayerStreamer(got.model, None, torch.device("cpu"), resident=2, recompute_resident_from=0)
    for x, y in batches("images"):
        for task in (ref, got):
            task.model(pixel_values=x, labels=y).loss.backward()
    streamer.close()
    for key, value in got.model.state_dict().items():
        torch.testing.assert_close(value, ref.model.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key)


class BuiltInConfigureModel(Task):
    """The model created in ``configure_model``, as Lightning advises for big ones."""

    def __init__(self, name: str) -> None:
        L.LightningModule.__init__(self)
        self.name, self.kind, self.model, self.losses = name, MODELS[name][1], None, []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = MODELS[self.name][0](0.0)


@pytest.mark.parametrize("strategy", ["l2l", "vdnn"])
def test_a_model_built_in_configure_model_streams_like_plain_training(strategy):
    def run(strategy) -> Task:
        loader = torch.utils.data.DataLoader(batches("tokens"), batch_size=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task, _ = fit(lambda: BuiltInConfigureModel("llama"), loader, strategy, max_steps=3)
        return task

    got = run(strategy)
    assert_same_training(got, run("auto"))
    assert len(got.losses) == 3


def llama(dropout: float = 0.0, **config) -> nn.Module:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**_lm_kwargs(dropout), **config}))


def test_blocks_that_share_a_module_are_refused_with_the_alternative():
    """Zamba 2 calls one shared transformer from several of its layers: they cannot each have their own host
    weights. The error names the shared weight and what trains the model instead."""
    model = tf.Zamba2ForCausalLM(tf.Zamba2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, mamba_d_state=4, mamba_headdim=8, n_mamba_heads=8, attention_head_dim=8,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], hybrid_layer_ids=[1, 3], use_mem_eff_path=False))
    with pytest.raises(ValueError, match=r"Blocks 1 and 3 at layers='model\.layers' share a parameter \(block 3's "
                                         r"shared_transformer\..*strategy='vdnn_all'"):
        stream_layers(model, sgd(model), device="cpu", pin_memory=False)


class RouterLoss(Task):
    """An MoE model trained with its load-balancing loss (``output_router_logits=True``), on padded batches:
    ``transformers`` records each layer's router logits with forward hooks on the routers inside the layers."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.model.config.output_router_logits = True

    def training_step(self, batch, batch_idx):
        mask = torch.ones_like(batch)
        mask[0, -3:] = 0
        loss = self.model(input_ids=batch, attention_mask=mask, labels=batch).loss
        self.losses.append(loss.item())
        return loss


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("setting", [{}, {"microbatches": 2}, {"saved_blocks": 1}, {"resident_blocks": 1}],
                         ids=["streamed", "microbatches", "saved_blocks", "resident_blocks"])
def test_moe_load_balancing_loss_streams_like_plain_training(name, setting):
    """The router logits come from inside the streamed blocks, whose forward graph is dropped: they failed in
    backward (RuntimeError), and under microbatches the loss saw one tensor per chunk (mis-sized with a mask). The
    routers' hooks now run once per layer, on the whole batch's logits, which reach backward through the block."""
    def run(strategy) -> Task:
        loader = torch.utils.data.DataLoader(batches("tokens"), batch_size=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task, _ = fit(lambda: RouterLoss(name), loader, strategy, max_steps=3)
        return task

    assert_same_training(run(l2l(**setting)), run("auto"))


@pytest.mark.parametrize("microbatches", [1, 2])
def test_attention_weights_are_one_per_layer_and_differentiable(microbatches):
    """``output_attentions=True`` records each layer's attention weights from inside it: one tensor per layer,
    the whole batch's, also under microbatches, and a loss on them trains the blocks as in plain training."""
    ref, got = llama(attn_implementation="eager"), llama(attn_implementation="eager")
    ids = batches("tokens")[0]
    streamer = stream_layers(got, sgd(got), device="cpu", pin_memory=False, microbatches=microbatches)
    outs = [m(input_ids=ids, labels=ids, output_attentions=True) for m in (got, ref)]
    assert len(outs[0].attentions) == len(outs[1].attentions) == 3
    for a, b in zip(outs[0].attentions, outs[1].attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for out in outs:
        (out.loss + out.attentions[1].square().mean()).backward()
    streamer.close()
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_offloaders_layer_hooks_inside_a_block_are_not_set_aside():
    """Activation offload over leaf modules (Accelerate's and a plain loop's default) hooks every leaf inside the
    blocks: those run in place, per chunk; only other hooks are run once per call."""
    from lightning_vdnn import offload_activations
    from lightning_vdnn.streaming.inner_hooks import hooked_modules

    model = llama()
    block = model.model.layers[0]
    handle = offload_activations(model, policy="all", device="cpu")
    assert any(m._forward_hooks for m in block.modules()) and hooked_modules(block) == []
    block.mlp.register_forward_hook(lambda *_: None)
    assert hooked_modules(block) == [block.mlp]
    handle.close()


def test_a_hook_inside_a_block_that_replaces_its_output_is_refused():
    model = llama()
    model.model.layers[1].mlp.register_forward_hook(lambda m, args, out: out * 2)
    streamer = stream_layers(model, sgd(model), device="cpu", pin_memory=False)
    ids = batches("tokens")[0]
    with pytest.raises(RuntimeError, match=r"forward hook on LlamaMLP inside a streamed block returned a new output"):
        model(input_ids=ids, labels=ids)
    streamer.close()


def test_cache_is_dropped_from_training_calls_with_one_warning():
    """``use_cache=True`` in a training forward: the layers get no cache (a recompute would write it twice), one
    warning says so, as transformers does under gradient checkpointing; the run is plain's."""
    from lightning_vdnn.streaming.streamer import LayerStreamer

    ref, got = llama(use_cache=True), llama(use_cache=True)
    ids = batches("tokens")[0]
    streamer = LayerStreamer(got, None, torch.device("cpu"))
    with pytest.warns(UserWarning, match=r"write its key/value cache twice.*use_cache=False, cache=None") as caught:
        for _ in range(2):
            got(input_ids=ids, labels=ids).loss.backward()
    assert sum("cache twice" in str(w.message) for w in caught) == 1
    for _ in range(2):
        ref(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():  # no graph, no recompute: the cache is filled as usual
        assert got(input_ids=ids, use_cache=True).past_key_values.get_seq_length() == SEQ
    streamer.close()
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("name", ["llama", "gemma2", "bloom", "qwen2_moe", "t5", "mamba"])
def test_generation_through_streamed_blocks_is_plain_generation(name, microbatches):
    """``model.generate`` (greedy, with the key/value cache) while the blocks stream gives plain generation's
    tokens; under microbatches a call carrying a cache runs as one chunk (the chunks would write their keys into
    the one cache in turn)."""
    from lightning_vdnn.streaming.streamer import LayerStreamer

    torch.manual_seed(0)
    ref = MODELS[name][0](0.0).eval()
    got = MODELS[name][0](0.0).eval()
    got.load_state_dict(ref.state_dict())
    ids = batches("tokens")[0][:2, :5]
    want = ref.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    streamer = LayerStreamer(got, None, torch.device("cpu"), microbatches=microbatches)
    try:
        assert torch.equal(got.generate(input_ids=ids, max_new_tokens=6, do_sample=False), want)
    finally:
        streamer.close()


def test_attentions_and_hidden_states_are_returned_and_differentiable():
    from lightning_vdnn.streaming.streamer import LayerStreamer

    ref, got = llama(attn_implementation="eager"), llama(attn_implementation="eager")
    ids = batches("tokens")[0]
    streamer = LayerStreamer(got, None, torch.device("cpu"))
    outs = [m(input_ids=ids, labels=ids, output_attentions=True, output_hidden_states=True) for m in (got, ref)]
    for a, b in zip(outs[0].hidden_states + outs[0].attentions, outs[1].hidden_states + outs[1].attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for out in outs:  # a loss on an inner block's output reaches the blocks below it
        (out.loss + out.hidden_states[2].square().mean()).backward()
    streamer.close()
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_enable_composes(when):
    """``model.gradient_checkpointing_enable()`` (transformers' ``GradientCheckpointingLayer``) before or after
    streaming starts: streamed blocks, which recompute anyway, run without it (one warning), the resident block
    keeps it; the gradients are plain checkpointed training's."""
    from lightning_vdnn.streaming.streamer import LayerStreamer

    ref, got = llama(0.1), llama(0.1)
    ref.gradient_checkpointing_enable()
    if when == "before":
        got.gradient_checkpointing_enable()
    with pytest.warns(UserWarning, match="gradient checkpointing is on for"):
        streamer = LayerStreamer(got, None, torch.device("cpu"), resident=1)
        if when == "after":
            got.gradient_checkpointing_enable()
        ids = batches("tokens")[0]
        torch.manual_seed(1)
        got(input_ids=ids, labels=ids).loss.backward()
    torch.manual_seed(1)
    ref(input_ids=ids, labels=ids).loss.backward()
    assert got.model.layers[0].gradient_checkpointing and not got.model.layers[1].gradient_checkpointing
    streamer.close()
    assert all(layer.gradient_checkpointing for layer in got.model.layers)  # as the user left it
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_batch_dimension_that_cannot_be_told_is_named():
    """A sequence-first tensor beside batch-first hidden states: microbatches cannot split it safely."""
    from lightning_vdnn.streaming.streamer import LayerStreamer

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x, memory):
            return self.proj(x) + memory.transpose(0, 1).mean(1, keepdim=True)

    root = nn.ModuleDict({"blocks": nn.ModuleList(Block() for _ in range(2))})
    streamer = LayerStreamer(root, "blocks", torch.device("cpu"), microbatches=2)
    x = torch.randn(4, 6, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"memory has shape \(6, 4, 8\): its batch dimension cannot be told.*"
                                         r"microbatches=1"):
        root["blocks"][0](x, memory=torch.randn(6, 4, 8))
    streamer.close()


def test_a_table_whose_rows_are_a_multiple_of_the_batch_goes_whole_to_every_chunk():
    """Only arguments known to fold the batch (Bloom's ``alibi``) split in runs: a table of 12 positions beside a
    batch of 4 is every chunk's whole, and the gradients are the unchunked call's."""
    from lightning_vdnn.streaming.streamer import LayerStreamer

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x, table):
            return self.proj(x) + table  # (4, 12, 8) + (12, 8)

    torch.manual_seed(0)
    ref = nn.ModuleDict({"blocks": nn.ModuleList(Block() for _ in range(2))})
    got = nn.ModuleDict({"blocks": nn.ModuleList(Block() for _ in range(2))})
    got.load_state_dict(ref.state_dict())
    x, table = torch.randn(4, 12, 8), torch.randn(12, 8)
    streamer = LayerStreamer(got, "blocks", torch.device("cpu"), microbatches=2)
    try:
        for root in (got, ref):
            h = x
            for block in root["blocks"]:
                h = block(h, table)
            h.square().mean().backward()
    finally:
        streamer.close()
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_sequence_first_blocks_refuse_microbatches():
    layer = nn.TransformerEncoderLayer(16, 2, 32)  # batch_first=False
    root = nn.ModuleDict({"enc": nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)})
    from lightning_vdnn.streaming.streamer import LayerStreamer

    with pytest.raises(ValueError, match=r"batch_first=False .* Build the model with batch_first=True"):
        LayerStreamer(root, None, torch.device("cpu"), microbatches=2)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_nested_tensors_of_the_encoders_fast_path_run_through_streamed_blocks(microbatches):
    """``nn.TransformerEncoder`` in eval with a padding mask (its default ``enable_nested_tensor=True``, as in a
    validation loop) packs the batch into a nested tensor, which has no ``shape``: its layers stream as one chunk."""
    def build():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(32, 4, 48, dropout=0.0, batch_first=True)
        return nn.ModuleDict({"enc": nn.TransformerEncoder(layer, 3)}).eval()

    x = torch.randn(4, 10, 32)
    padding = torch.arange(10)[None] >= torch.tensor([10, 7, 3, 5])[:, None]
    ref, model = build(), build()
    streamer = stream_layers(model, sgd(model), device="cpu", pin_memory=False, microbatches=microbatches)
    try:
        with torch.no_grad():
            want = ref["enc"](x, src_key_padding_mask=padding)
            got = model["enc"](x, src_key_padding_mask=padding)
    finally:
        streamer.close()
    assert want.is_nested is False and want[1, 7:].abs().sum() == 0  # the fast path ran: padded rows zeroed
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def loop(model: nn.Module, opt: torch.optim.Optimizer, backward) -> list[float]:
    """A user's own training loop over an HF causal LM (dropout on: the recompute replays its draws)."""
    losses = []
    torch.manual_seed(3)
    for ids in batches("tokens"):
        loss = model(input_ids=ids, labels=ids).loss
        backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def assert_same_loop(got: nn.Module, losses: list[float], ref: nn.Module, ref_losses: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-6, atol=0)
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_fabric_streams_a_library_model_like_plain_fabric():
    from lightning.fabric import Fabric

    def run(strategy):
        fabric = Fabric(strategy=strategy, accelerator="cpu", devices=1)
        model = llama(0.1)
        model, opt = fabric.setup(model, sgd(model))
        losses = loop(model, opt, fabric.backward)
        if strategy != "auto":
            fabric.strategy.synchronize()
        return model, losses, fabric

    (ref, ref_losses, _), (got, losses, fabric) = run("auto"), run("l2l")
    assert fabric.strategy._streamers[0].path == "model.layers"
    assert_same_loop(got, losses, ref, ref_losses)
    fabric.strategy.teardown()


def test_accelerate_streams_a_library_model_like_plain_accelerate():
    from accelerate import Accelerator

    import lightning_vdnn.integrations.accelerate as vdnn_accelerate

    def run(stream: bool):
        accelerator = Accelerator(cpu=True)
        model = llama(0.1)
        opt = sgd(model)
        if stream:
            model, opt = vdnn_accelerate.prepare(accelerator, model, opt, policy="none", layer_streaming=True)
        else:
            model, opt = accelerator.prepare(model, opt)
        losses = loop(model, opt, accelerator.backward)
        if stream:
            vdnn_accelerate.synchronize(model)
            assert vdnn_accelerate.memory_report(model).streamed_h2d_bytes > 0
        return model, losses

    (ref, ref_losses), (got, losses) = run(False), run(True)
    assert_same_loop(got, losses, ref, ref_losses)
    vdnn_accelerate.release(got)


def test_accelerate_save_state_and_load_state_resume_streamed_blocks_like_plain(tmp_path):
    """``accelerator.save_state`` writes safetensors, which keeps one name per storage: the blocks' weights, views
    of one host buffer per block, were dropped from the file (then ``load_state`` refused it). Saved mid-run and
    loaded into a fresh process's model, the run goes on as the uninterrupted plain one."""
    from accelerate import Accelerator

    import lightning_vdnn.integrations.accelerate as vdnn_accelerate

    data = batches("tokens", 4)

    def run(stream: bool, steps: list, save=None, load=None) -> tuple[list[float], dict, dict]:
        accelerator = Accelerator(cpu=True)
        model = llama()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        if stream:
            model, opt = vdnn_accelerate.prepare(accelerator, model, opt, policy="none", layer_streaming=True)
        else:
            model, opt = accelerator.prepare(model, opt)
        if load:
            accelerator.load_state(load)
        losses = []
        for ids in steps:
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        if save:
            accelerator.save_state(save)  # safetensors, Accelerate's default
        state = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        moments = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
        if stream:
            vdnn_accelerate.release(model)
        return losses, state, moments

    ref_losses, ref_state, ref_moments = run(False, data)
    first, _, _ = run(True, data[:2], save=tmp_path / "state")
    second, state, moments = run(True, data[2:], load=tmp_path / "state")
    assert first + second == ref_losses
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(state[key], value), key
    for index, entry in ref_moments.items():
        for name, value in entry.items():
            assert torch.equal(moments[index][name], value), (index, name)


def test_a_streamed_models_state_dict_saves_to_safetensors_whole():
    """Each weight of a streamed block gets a storage of its own in ``state_dict()`` (the same memory, no copy):
    ``safetensors.torch.save_file`` takes it as it takes a plain model's, and the file loads into one."""
    from safetensors.torch import load_file, save_file

    model = llama()
    streamer = stream_layers(model, sgd(model), device="cpu", pin_memory=False)
    state = model.state_dict()
    weight = state["model.layers.1.mlp.up_proj.weight"]
    assert weight.untyped_storage().nbytes() == weight.nbytes
    assert weight.data_ptr() == model.model.layers[1].mlp.up_proj.weight.data_ptr()  # an alias, not a copy
    assert model.state_dict(keep_vars=True)["model.layers.1.mlp.up_proj.weight"] is model.model.layers[1].mlp.up_proj.weight
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, f"{tmp}/model.safetensors")
        plain = llama()
        for p in plain.parameters():
            p.data.zero_()
        plain.load_state_dict(load_file(f"{tmp}/model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    streamer.close()


@pytest.fixture
def in_process_ddp():
    """A one-rank DDP fit in this process (``l2l_zero``) leaves its process group and Lightning's environment
    variables (``MASTER_PORT``, ``LOCAL_RANK``, ``OMP_NUM_THREADS``...) behind: later tests' subprocesses would
    inherit them. Both are undone after the test."""
    import os

    found = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(found)


@pytest.mark.usefixtures("in_process_ddp")
@pytest.mark.parametrize("zero", [False, True], ids=["l2l", "l2l_zero"])
@pytest.mark.parametrize("callback", ["StochasticWeightAveraging", "EMAWeightAveraging"])
def test_weight_averaging_callbacks_read_the_updated_weights(callback, zero, monkeypatch):
    """Lightning's weight averaging reads the weights right after each step, while the blocks' host updates may
    still run (they are waited for as the next forward reaches each block): with such a callback the strategy
    (either that streams, ``integrations/trainer_settings.py``) waits for them at the step. The updates are slowed
    here, so that reading early would read stale weights."""
    from lightning_vdnn import L2LZeroStrategy

    import time

    from lightning.pytorch import callbacks

    from lightning_vdnn.streaming.host_optimizer import HostStepper

    if not hasattr(callbacks, callback):
        pytest.skip(f"this Lightning has no {callback}")
    make = {"StochasticWeightAveraging": lambda: callbacks.StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1),
            "EMAWeightAveraging": lambda: callbacks.EMAWeightAveraging()}[callback]
    update = HostStepper._update

    def slow(self, *args):
        time.sleep(0.02)
        return update(self, *args)

    monkeypatch.setattr(HostStepper, "_update", slow)
    class Probe(L.Callback):
        def on_train_start(self, trainer, module):
            self.waits = trainer.strategy._streamer.wait_after_step

    loader = lambda: torch.utils.data.DataLoader(batches("tokens", 2), batch_size=None)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # l2l_zero's reference is DDP on its one rank: Lightning's distributed sampler orders the later epochs
        ref, _ = fit(lambda: Task("llama"), loader(), "ddp" if zero else "auto", max_steps=-1, max_epochs=3,
                     callbacks=[make()])
        probe, alone = Probe(), Probe()
        streaming = (lambda: L2LZeroStrategy("none", zero_stage=2)) if zero else l2l
        got, _ = fit(lambda: Task("llama"), loader(), streaming(), max_steps=-1, max_epochs=3,
                     callbacks=[make(), probe])
        fit(lambda: Task("llama"), loader(), streaming(), max_steps=1, callbacks=[alone])
    assert_same_training(got, ref)
    assert probe.waits and not alone.waits  # without one, the updates still overlap the next forward


@pytest.mark.parametrize("saved_blocks", [0, None])
def test_blocks_whose_forward_writes_buffers_refuse_microbatches_and_the_step_changes_nothing(saved_blocks):
    """Spectral norm's power iteration writes its buffers in every training forward: split into chunks, the block
    would write them once per chunk. Refused at the first chunk, whose writes are undone, whether the blocks
    recompute or save; the weights untouched."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Sequential(spectral_norm(nn.Linear(8, 8)), nn.Tanh()) for _ in range(2)])
    root = nn.ModuleDict({"blocks": blocks})
    before = {k: v.clone() for k, v in root.state_dict().items()}
    streamer = stream_layers(root, sgd(root), device="cpu", pin_memory=False, microbatches=2,
                             saved_blocks=saved_blocks)
    try:
        with pytest.raises(ValueError, match=r"microbatches=2 .* writes buffers in its forward "
                                             r"\(0\.parametrizations\.weight\.0\._u, 0\.parametrizations\.weight\.0\._v.*"
                                             r"Use microbatches=1"):
            h = torch.randn(4, 8)
            for block in blocks:
                h = block(h)
    finally:
        streamer.close()
    for key, value in root.state_dict().items():
        assert torch.equal(value, before[key]), key


def _adversarial_step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """Adversarial training on the embeddings (FGSM, FreeLB): ``torch.autograd.grad`` for the input's gradient,
    which leaves the parameters' ``.grad`` alone, then the loss at the perturbed input, whose backward fills it."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    push, = torch.autograd.grad(model(inputs_embeds=embeds, labels=ids).loss, embeds)
    loss = model(inputs_embeds=(embeds + 0.05 * push.sign()).detach(), labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("microbatches, saved_blocks", [(1, 0), (2, 0), (1, None)])
def test_input_gradients_by_autograd_grad_leave_the_weights_gradients_as_plain(microbatches, saved_blocks):
    """``torch.autograd.grad(loss, inputs)`` through streamed blocks wrote the blocks' weight gradients as
    ``loss.backward()`` does, so the step that followed trained on both losses' gradients."""
    ref = llama()
    ref_opt = sgd(ref)
    want = [_adversarial_step(ref, ref_opt, ids) for ids in batches("tokens")]
    got = llama()
    opt = sgd(got)
    streamer = stream_layers(got, opt, device="cpu", pin_memory=False, microbatches=microbatches,
                             saved_blocks=saved_blocks)
    try:
        losses = [_adversarial_step(got, opt, ids) for ids in batches("tokens")]
        streamer.synchronize()
    finally:
        streamer.close()
    assert_same_loop(got, losses, ref, want)


def test_a_double_backward_through_streamed_blocks_is_refused_with_the_alternative():
    """A gradient penalty differentiates the gradient (``create_graph=True``); a streamed block's recompute gives
    gradients without a graph, so the penalty's part through the blocks would be lost: refused."""
    model = llama()
    streamer = stream_layers(model, sgd(model), device="cpu", pin_memory=False)
    ids = batches("tokens")[0]
    try:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        with pytest.raises(RuntimeError, match=r"create_graph=True .* reached LlamaDecoderLayer .*"
                                               r"layer_streaming=False"):
            torch.autograd.grad(model(inputs_embeds=embeds, labels=ids).loss, embeds, create_graph=True)
    finally:
        streamer.close()
