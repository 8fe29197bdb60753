"""Microbatches at small device memory: under ``microbatches=k`` the head and loss run a chunk of tokens at a time
(``streaming/chunked_head.py`` for an unmodified Hugging Face causal LM, ``loss_chunks`` for the project GPT), the
blocks' inputs go to the host (``activation_offload="all"``), and training still equals plain training."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from conftest import RecordingGPT, assert_same_params, fit
from lightning_vdnn import VDNNStrategy
from lightning_vdnn.streaming.streamer import LayerStreamer

tf = pytest.importorskip("transformers")
tf.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ, BATCH = 64, 12, 6


def llama_config(**kw) -> "tf.LlamaConfig":
    return tf.LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    use_cache=False), **kw})


def labelled_batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token ids and labels with ``-100`` holes: a span in one row, a whole row, scattered tokens."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        y = x.clone()
        y[0, 2:7] = -100
        y[3] = -100
        y[torch.rand(BATCH, SEQ, generator=g) < 0.2] = -100
        out.append((x, y))
    return out


class HFTask(L.LightningModule):
    """An unmodified ``LlamaForCausalLM`` (or ``build()``'s model) trained on its own loss (``labels=``); records losses
    and the most tokens whose logits existed at once (the bytes the head's outputs hold)."""

    def __init__(self, model_class=None, build=None, **call) -> None:
        super().__init__()
        self.model = build() if build is not None else (model_class or tf.LlamaForCausalLM)(llama_config())
        self.call = call
        self.losses: list[float] = []
        self.head_tokens = 0
        self.logits: list = []
        self.model.lm_head.register_forward_hook(self._made)

    def _made(self, module, args, out) -> None:
        self.head_tokens = max(self.head_tokens, out.untyped_storage().nbytes() // (VOCAB * out.itemsize))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.model(input_ids=x, labels=y, **self.call)
        self.logits.append(out.logits)
        self.losses.append(out.loss.item())
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def l2l(**kw) -> VDNNStrategy:
    return VDNNStrategy(kw.pop("activation_offload", "none"), layer_streaming=True, **kw)


def train_hf(strategy="auto", steps: int = 3, **task):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = torch.utils.data.DataLoader(labelled_batches(steps), batch_size=None)
        return fit(lambda: HFTask(**task), data, strategy, max_steps=steps)[0]


def assert_same_training(got: nn.Module, ref: nn.Module, tol: float = 2e-5) -> None:
    """The tolerance of the library models' microbatch tests: chunks sum gradients in another order."""
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=tol, atol=tol)
    want = ref.model.state_dict()
    for key, value in got.model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("offload", ["none", "all"])
def test_hf_llama_head_and_loss_run_in_chunks_and_train_like_plain(offload):
    """``-100`` labels: the chunks' summed losses over the batch's token count are the model's mean."""
    ref = train_hf()
    got = train_hf(l2l(microbatches=3, activation_offload=offload, min_offload_bytes=0))
    assert_same_training(got, ref)
    assert ref.head_tokens == BATCH * SEQ and got.head_tokens == BATCH * SEQ // 3
    assert all(logits is None for logits in got.logits)  # not materialised
    assert all(logits.shape == (BATCH, SEQ, VOCAB) for logits in ref.logits)


class CompiledHFTask(HFTask):
    """``HFTask`` whose training step calls ``torch.compile(model)`` (``aot_eager``); the model itself stays in the
    module tree, as ``self.run = torch.compile(self.model)`` leaves it."""

    def __init__(self) -> None:
        super().__init__()
        torch._dynamo.reset()
        self.run = torch.compile(self.model, backend="aot_eager")

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.run(input_ids=x, labels=y)
        self.losses.append(out.loss.item())
        return out.loss


def test_hf_llama_compiled_whole_with_labels_trains_like_compiled_plain():
    """A model compiled whole, called with labels under microbatches: Dynamo traces the head's stand-in as a plain
    tensor (the op-recording one is a subclass it cannot trace), and the training is compiled plain's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = lambda: torch.utils.data.DataLoader(labelled_batches(3), batch_size=None)  # noqa: E731
        ref, _ = fit(CompiledHFTask, data(), max_steps=3)
        got, _ = fit(CompiledHFTask, data(), l2l(microbatches=3), max_steps=3)
    torch._dynamo.reset()
    assert_same_training(got, ref)


def test_hf_llama_num_items_in_batch_is_the_divisor_as_in_plain():
    """The Trainer's gradient accumulation passes the token count of all accumulated batches."""
    ref = train_hf(num_items_in_batch=torch.tensor(500))
    got = train_hf(l2l(microbatches=2), num_items_in_batch=torch.tensor(500))
    assert_same_training(got, ref)
    assert got.head_tokens == BATCH * SEQ // 2


def test_hf_llama_without_labels_or_autograd_gets_its_logits_whole():
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama_config())
    x = torch.randint(0, VOCAB, (BATCH, SEQ))
    with torch.no_grad():
        want = model(input_ids=x).logits
    streamer = LayerStreamer(model, "model.layers", torch.device("cpu"), microbatches=3)
    try:
        torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-5, atol=1e-6)  # loss is the caller's
        with torch.no_grad():
            out = model(input_ids=x, labels=x)
        torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-6)
        out = model(input_ids=x, labels=x, return_dict=False)  # tuples: the logits' place holds None
        assert out[1] is None and out[0].requires_grad
    finally:
        streamer.close()
    assert "forward" not in model.lm_head.__dict__ and "_loss_function" not in model.__dict__


def _lm(config: str, model: str, **kw):
    """A tiny ``transformers`` causal LM of the library's own classes, built on the training's seed."""
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    return lambda: getattr(tf, model)(getattr(tf, config)(**{**base, **kw}))


#: Causal LMs that change the head's output before their loss: what each does there.
CHANGED_LOGITS = {
    "granite (logits / logits_scaling)": _lm("GraniteConfig", "GraniteForCausalLM", logits_scaling=4.0),
    "cohere (logits * logit_scale)": _lm("CohereConfig", "CohereForCausalLM", logit_scale=0.5),
    "gemma2 (final soft-capping)": _lm("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=4,
                                       final_logit_softcapping=2.0),
    "opt (.contiguous())": lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
        word_embed_proj_dim=32, max_position_embeddings=64, dropout=0.0, use_cache=False)),
}


@pytest.mark.parametrize("name", list(CHANGED_LOGITS))
def test_hf_models_that_change_their_logits_before_the_loss_chunk_them_like_plain(name):
    """What the model does to its head's output on the way to its loss is done to each chunk's logits
    (``streaming/lazy_logits.py``): the training is plain's, and no more than a chunk's logits ever exist."""
    build = CHANGED_LOGITS[name]
    ref = train_hf(build=build)
    got = train_hf(l2l(microbatches=3), build=build)
    assert_same_training(got, ref)
    assert ref.head_tokens == BATCH * SEQ and got.head_tokens == BATCH * SEQ // 3
    assert all(logits is None for logits in got.logits)


class NormalisedLlamaForCausalLM(tf.LlamaForCausalLM):
    """Divides its logits by their spread over the whole batch before its loss: not an op of each token alone."""

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        logits = logits / logits.std()
        loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
        return tf.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def test_logits_changed_before_the_loss_other_than_token_by_token_are_refused_with_the_fix():
    """Refused before anything is computed of the batch's logits, the op named."""
    with pytest.raises(RuntimeError, match=r"NormalisedLlamaForCausalLM applies 'std' to its head's logits before its "
                                           r"loss.*each token alone.*without labels.*microbatches=1"):
        train_hf(l2l(microbatches=2), model_class=NormalisedLlamaForCausalLM)


def test_labels_not_matching_the_heads_tokens_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"labels of shape \(6, 12\) do not match the \(6, 1\) hidden states.*"
                                         r"logits_to_keep=0"):
        train_hf(l2l(microbatches=2), logits_to_keep=1)


def test_a_custom_loss_function_is_left_alone():
    """Its arithmetic is not known: the head runs whole, the loss is the user's, as without microbatches."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama_config())
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().square().mean()
    streamer = LayerStreamer(model, "model.layers", torch.device("cpu"), microbatches=2)
    try:
        assert streamer._head is None
        x = torch.randint(0, VOCAB, (BATCH, SEQ))
        assert model(input_ids=x, labels=x).logits.shape == (BATCH, SEQ, VOCAB)
    finally:
        streamer.close()


LM = functools.partial(RecordingGPT, max_steps=4)


def gpt_batches(n: int = 4, batch: int = 4, seq: int = 32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(n):
        x = torch.randint(0, 256, (batch, seq + 1), generator=g)
        y = x[:, 1:].clone()
        y[1, :10] = -100
        data.append((x[:, :-1], y))
    return torch.utils.data.DataLoader(data, batch_size=None)


def test_gpt_loss_in_chunks_under_microbatches_and_offload_trains_like_plain():
    """The project GPT: its loss in ``loss_chunks`` pieces (``-100`` targets left out of the mean) under
    ``microbatches`` and block inputs on the host, against plain training on the whole batch at once; the
    tolerance of ``test_microbatches_equal_unchunked_plain_training``."""
    ref, _ = fit(lambda: LM(), gpt_batches(), max_steps=4)
    got, _ = fit(lambda: LM(loss_chunks=4), gpt_batches(),
                 l2l(microbatches=4, activation_offload="all", min_offload_bytes=0, saved_blocks=0), max_steps=4)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=1e-5, atol=0)
    assert_same_params(got, ref, rtol=1e-5, atol=0.02 * got.hparams.lr)


def _saved_bytes(n_layer: int, offload: str) -> tuple[int, int]:
    """(bytes of saved activations left on the device, bytes moved to the host) of a step of a GPT of ``n_layer``
    blocks under the lean settings (block inputs to the host)."""
    _, trainer = fit(lambda: LM(loss_chunks=4, n_layer=n_layer), gpt_batches(n=2),
                     l2l(microbatches=4, activation_offload=offload, min_offload_bytes=0, saved_blocks=0), max_steps=2)
    report = trainer.strategy.memory_report()
    return report.kept_bytes, report.offloaded_bytes


def test_device_resident_saved_bytes_do_not_grow_with_depth():
    """Item 4 on the CPU: with block inputs kept (``"none"``), what stays on the device from forward to backward
    grows by one block input (4 x 32 x 128 fp32) per block; with ``"all"`` it is the same for 2 and 8 blocks, and
    exactly that growth is on the host."""
    block_input = 4 * 32 * 128 * 4
    kept_2, _ = _saved_bytes(2, "none")
    kept_8, _ = _saved_bytes(8, "none")
    assert kept_8 - kept_2 == 6 * block_input
    lean_2, moved_2 = _saved_bytes(2, "all")
    lean_8, moved_8 = _saved_bytes(8, "all")
    assert lean_8 == lean_2
    assert moved_8 - moved_2 == 6 * block_input


def _bench(tmp_path, model: str, cases: str) -> dict[str, dict]:
    from conftest import ROOT, checkout_env

    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--tiny", "--model", model, "--cases", cases,
           "--steps", "2", "--warmup", "0", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    return {row["case"]: row for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt_1b", "hf_llama_1b"])
def test_lean_microbatch_case_runs_against_plain_accumulation(tmp_path, model):
    """``l2l_mb8_lean`` at ``--tiny``: the GPT's loss in chunks, the HF Llama's through ``labels=``."""
    rows = _bench(tmp_path, model, "plain_accum8,l2l_mb8_lean")
    for case in ("plain_accum8", "l2l_mb8_lean"):
        assert rows[case]["status"] == "ok", rows[case].get("traceback", rows[case]["status"])
    assert rows["l2l_mb8_lean"]["memory_report"]["microbatches"] == 8
    if model == "gpt_1b":  # the same loss (the HF case's labels drop each row's last target)
        assert rows["l2l_mb8_lean"]["losses"] == pytest.approx(rows["plain_accum8"]["losses"], rel=1e-4)


@pytest.mark.slow
def test_largest_model_script_trains_on_the_cpu_with_a_falling_loss(tmp_path):
    from conftest import ROOT, checkout_env

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "largest.py"), "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, env=checkout_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    row = json.loads((tmp_path / "largest.json").read_text())
    assert row["blocks"] > 4 and row["params"] > 1e6 and len(row["losses"]) == 5
    assert row["losses"][-1] < row["losses"][0] and row["host_rss_bytes"] > 0 and row["tokens_per_s"] > 0
    assert row["device_peak_bytes"] is None  # the CPU: nothing to measure


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_hf_llama_chunked_head_bf16_matches_plain_and_never_holds_the_batch_logits():
    """On a GPU under bf16-mixed: the losses of plain training within bf16's tolerance (as the GPU streaming tests),
    and the head never made more than a chunk's logits."""
    kw = dict(accelerator="gpu", devices=1, precision="bf16-mixed")
    data = lambda: torch.utils.data.DataLoader(labelled_batches(4), batch_size=None)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fit(HFTask, data(), max_steps=4, **kw)[0]
        got = fit(HFTask, data(), l2l(microbatches=3, activation_offload="all", min_offload_bytes=0), max_steps=4,
                  **kw)[0]
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=2e-2, atol=2e-2)
    assert got.head_tokens == BATCH * SEQ // 3 and ref.head_tokens == BATCH * SEQ
