"""Hugging Face causal LMs in the recipes (``model=hf_causal_lm``): built from a shipped or local config, never
downloaded, trained by the strategies exactly as plain training trains them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch

pytest.importorskip("transformers")

from hydra import compose, initialize_config_module  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from conftest import ROOT, assert_same_params, checkout_env, fit, token_loader  # noqa: E402
from lightning_vdnn import VDNNStrategy  # noqa: E402
from lightning_vdnn.examples.data import TextDataModule  # noqa: E402
from lightning_vdnn.examples.hf_tasks import HFCausalLM, build_causal_lm, load_config  # noqa: E402

#: Small enough for seconds per run: 2 blocks, a short window, few batches, no validation.
SMALL = ["+model.num_hidden_layers=2", "data.max_bytes=100000", "data.seq_len=64", "data.batch_size=4",
         "trainer.max_steps=3", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
         "trainer.accelerator=cpu", "trainer.enable_checkpointing=false"]


def compose_run(*overrides: str):
    with initialize_config_module(config_module="lightning_vdnn.conf", version_base="1.3"):
        return compose(config_name="config", overrides=["model=hf_causal_lm", *overrides])


@pytest.mark.parametrize("strategy, expect", [
    ("l2l", r"layer streaming\s+[0-9.]+ GiB weights in"),
    ("vdnn", r"lightning_vdnn auto plan: \d+ layers"),
])
def test_train_recipe_runs_a_hf_model(tmp_path, strategy, expect):
    """The README's command, a few steps: the recipe composes, builds the Llama, and the strategy trains it."""
    cmd = [sys.executable, str(ROOT / "recipes/train.py"), "model=hf_causal_lm", f"strategy={strategy}", *SMALL,
           f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=checkout_env(OMP_NUM_THREADS="1"),
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LlamaForCausalLM" in out.stdout and "max_steps=3` reached" in out.stderr
    assert re.search(expect, out.stdout + out.stderr), out.stdout[-3000:]


def test_a_local_config_directory_or_file_is_built(tmp_path):
    base = load_config("llama_tiny", num_hidden_layers=3, hidden_size=64, intermediate_size=128)
    base.save_pretrained(tmp_path / "saved")  # what a downloaded checkpoint's folder holds, less its weights
    (tmp_path / "cfg.json").write_text(json.dumps({**json.loads((tmp_path / "saved/config.json").read_text()),
                                                   "num_hidden_layers": 1}))
    built = instantiate(compose_run(f"model.config={tmp_path / 'saved'}").model)
    assert isinstance(built, HFCausalLM) and len(built.model.model.layers) == 3
    assert built.model.config.hidden_size == 64 and next(built.parameters()).dtype == torch.float32
    assert built.model.config.head_dim == 16  # derived from the overridden width, not llama_tiny's 32
    assert len(HFCausalLM(config=str(tmp_path / "cfg.json")).model.model.layers) == 1


def test_a_saved_model_directory_loads_its_weights(tmp_path):
    """A ``save_pretrained`` directory (a fine-tuned checkpoint) trains from its weights, read from disk only;
    ``pretrained=False`` builds fresh ones, ``pretrained=True`` requires them."""
    torch.manual_seed(0)
    saved = build_causal_lm("llama_tiny", num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    saved.save_pretrained(tmp_path / "ckpt")
    built = instantiate(compose_run(f"model.config={tmp_path / 'ckpt'}").model)
    for (name, p), q in zip(built.model.named_parameters(), saved.parameters()):
        assert torch.equal(p, q), name
    assert next(built.parameters()).dtype == torch.float32
    fresh = HFCausalLM(config=str(tmp_path / "ckpt"), pretrained=False)
    assert not torch.equal(fresh.model.model.embed_tokens.weight, saved.model.embed_tokens.weight)
    load_config("llama_tiny").save_pretrained(tmp_path / "config_only")
    assert len(HFCausalLM(config=str(tmp_path / "config_only")).model.model.layers) == 4  # fresh: nothing to load
    with pytest.raises(FileNotFoundError, match=r"pretrained=True, but config='.*config_only' is not a directory "
                                                r"holding weights"):
        HFCausalLM(config=str(tmp_path / "config_only"), pretrained=True)


@pytest.mark.parametrize("overrides, message", [
    (["model.config=/no/such/model"], r"config='/no/such/model' is neither a file nor a directory here .*, nor a "
                                      r"config shipped with lightning_vdnn \(llama_tiny\)\. Give a directory with a "
                                      r"config.json"),
    (["model.config=."], r"config='\.' is a directory without a config.json"),
    (["+model.num_hiden_layers=2"], r"overrides \['num_hiden_layers'\] are not fields of LlamaConfig"),
])
def test_a_bad_config_is_refused_with_what_to_do(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)  # an empty directory: "." has no config.json
    with pytest.raises(InstantiationException, match=message):
        instantiate(compose_run(*overrides).model)


def test_a_config_without_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match=r"has no 'model_type' \(e.g. \"llama\"\)"):
        HFCausalLM(config=str(tmp_path))


def test_data_with_more_token_ids_than_the_vocab_is_refused_before_training():
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"The data has 256 token ids but the model's vocab_size is 128"):
        trainer.fit(HFCausalLM(vocab_size=128), datamodule=TextDataModule(max_bytes=10_000))


def test_loss_is_next_token_cross_entropy_as_the_model_scores_it():
    """``(x, y)`` windows, ``y`` shifted by one: the loss is the model's own ``labels=`` loss on the whole window."""
    torch.manual_seed(0)
    module = HFCausalLM(num_hidden_layers=2)
    window = torch.randint(0, 256, (2, 33))
    ours = module._loss((window[:, :-1], window[:, 1:]))
    theirs = module.model(input_ids=window, labels=window, use_cache=False).loss  # shifts inside, drops the last
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("strategy, checkpointing, atol_lr", [
    (lambda: "l2l", False, 0.0),
    (lambda: "l2l", True, 0.0),  # transformers' checkpointing: off while streamed (one warning), same result
    (lambda: VDNNStrategy(activation_offload="all", min_offload_bytes=0), False, 0.0),
    (lambda: VDNNStrategy(layer_streaming=True, microbatches=2), False, 0.02),
], ids=["l2l", "l2l_hf_checkpointing", "vdnn_all", "l2l_mb2"])
def test_strategies_train_the_hf_model_as_plain_training_does(one_thread, strategy, checkpointing, atol_lr):
    """Same seed, same batches: the weights after three steps are plain training's. With microbatches the gradient
    is summed over two chunks instead of one batch, a rounding difference AdamW can move by ~1% of lr where a
    gradient is near zero (as ``test_streaming.test_microbatches_equal_unchunked_plain_training`` explains)."""
    make = lambda ckpt=False: HFCausalLM(num_hidden_layers=2, warmup_steps=1, max_steps=3,  # noqa: E731
                                         gradient_checkpointing=ckpt)
    ref, _ = fit(make, token_loader(seq=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, trainer = fit(lambda: make(checkpointing), token_loader(seq=32), strategy=strategy())
    assert_same_params(got, ref, atol=max(1e-7, atol_lr * got.hparams.lr))
    report = trainer.strategy.memory_report()
    assert (report.streamed_h2d_bytes or 0) + report.offloaded_bytes > 0  # the strategy moved something
    assert any("gradient checkpointing is on" in str(w.message) for w in caught) == checkpointing
