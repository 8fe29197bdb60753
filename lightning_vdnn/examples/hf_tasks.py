"""Hugging Face causal language models as a LightningModule, built from a local config (with the weights saved
beside it, if any) and never downloaded.

The recipes' text data yields ``(x, y)`` byte windows with ``y`` already ``x`` shifted by one, so the module calls
the model with ``input_ids=x`` and takes the cross-entropy of its logits against ``y`` at every position, as
:class:`~lightning_vdnn.examples.tasks.LanguageModel` does. Passing ``labels=`` instead would shift a second time (the
model shifts its labels itself) and score one position fewer.

The network sits at ``self.model`` (a ``LlamaForCausalLM``'s blocks are then at ``model.model.layers``, where
``layers=None`` finds them), untouched: offload and streaming stay the strategy's job. ``transformers`` is
imported only here and only when a model is built, so the package needs it only for this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_vdnn.examples.tasks import NextTokenTask

#: Where the configs shipped with the package live: ``config="llama_tiny"`` is ``llama_tiny.json`` here.
SHIPPED = Path(__file__).resolve().parents[1] / "conf" / "hf"


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("Hugging Face models need the transformers library: pip install 'lightning-vdnn[hf]' "
                          "(from a checkout: pip install -e '.[hf]').") from exc
    return transformers


def shipped_configs() -> list[str]:
    """The names ``config=`` accepts besides a path."""
    return sorted(p.stem for p in SHIPPED.glob("*.json"))


def config_file(source: Union[str, Path]) -> Path:
    """The ``config.json`` that ``source`` names: a shipped name, a directory holding one, or a ``.json`` file.

    A shipped name wins over a same-named entry of the working directory (write ``./llama_tiny`` for that one).

    Raises:
        FileNotFoundError: nothing at ``source``, or a directory without ``config.json``; the message says what
            ``config=`` accepts. Nothing is looked up on the network.
    """
    text = str(source)
    if text in shipped_configs():
        return SHIPPED / f"{text}.json"
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"config={text!r} is a directory without a config.json. Give the directory a "
                                    "Hugging Face model was saved to (save_pretrained), or the .json file itself.")
        return path / "config.json"
    if path.is_file():
        return path
    raise FileNotFoundError(
        f"config={text!r} is neither a file nor a directory here ({Path.cwd()}), nor a config shipped with "
        f"lightning_vdnn ({', '.join(shipped_configs())}). Give a directory with a config.json, a .json config file, "
        "or a shipped name; configs and weights are never downloaded.")


def load_config(source: Union[str, Path], **overrides: Any):
    """A ``transformers`` config from :func:`config_file`, with ``overrides`` set on it (``num_hidden_layers=2``).

    Raises:
        ValueError: the file is not a JSON object with a known ``model_type``, or an override names a field the
            config does not have (a typo would otherwise be stored silently and change nothing).
    """
    transformers = _transformers()
    path = config_file(source)
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); a Hugging Face config.json is expected.") from exc
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise ValueError(f"{path} has no 'model_type' (e.g. \"llama\"), so the model class cannot be told. Add it, "
                         "or give the config.json that save_pretrained wrote.")
    model_type = fields.pop("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{path}: model_type={model_type!r} is not known to transformers "
                         f"{transformers.__version__}; upgrade transformers or fix the name.")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    unknown = sorted(k for k in overrides if not hasattr(config, k))
    if unknown:
        raise ValueError(f"overrides {unknown} are not fields of {type(config).__name__} (from {path}); "
                         "check the spelling against its config.json.")
    # Built again rather than set on it: a config derives fields at construction (a Llama's head_dim from
    # hidden_size), which a field set afterwards would leave stale.
    return transformers.AutoConfig.for_model(model_type, **{**fields, **overrides}) if overrides else config


def enable_checkpointing(model: nn.Module) -> None:
    """``transformers``' own per-layer activation checkpointing, non-reentrant as the rest of this package's.

    Newer versions name it ``activation_checkpointing_enable`` and warn on the older
    ``gradient_checkpointing_enable``; both set ``gradient_checkpointing`` on each layer, which layer streaming
    turns off on the blocks it streams (they recompute already).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


#: The files ``save_pretrained`` writes the weights to (one file, or shards listed in an index).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def saved_weights(source: Union[str, Path]) -> Optional[Path]:
    """The directory ``source`` names if it holds weights ``save_pretrained`` wrote, else None."""
    path = Path(str(source)).expanduser()
    if str(source) in shipped_configs() or not path.is_dir():
        return None
    return path if any((path / name).is_file() for name in WEIGHT_FILES) else None


def build_causal_lm(source: Union[str, Path], attn_implementation: str = "sdpa", pretrained: Optional[bool] = None,
                    **overrides: Any) -> nn.Module:
    """An ``AutoModelForCausalLM`` from :func:`load_config`, in fp32 (whatever ``dtype`` the config names: the
    precision plugin casts for compute, and the optimizer wants fp32 masters). Its weights are those saved in the
    directory ``source`` names (:data:`WEIGHT_FILES`, read from disk only) where it holds them and ``pretrained``
    is not False, else fresh.

    Raises:
        FileNotFoundError: ``pretrained=True`` and ``source`` is not a directory holding weights.
    """
    transformers = _transformers()
    config = load_config(source, **overrides)
    weights = saved_weights(source) if pretrained is not False else None
    if pretrained and weights is None:
        raise FileNotFoundError(f"pretrained=True, but config={str(source)!r} is not a directory holding weights "
                                f"({', '.join(WEIGHT_FILES)}); give the directory save_pretrained wrote, or leave "
                                "pretrained unset for fresh weights.")
    kwargs = dict(dtype=torch.float32, attn_implementation=attn_implementation)
    try:
        if weights is not None:
            return transformers.AutoModelForCausalLM.from_pretrained(weights, config=config, local_files_only=True,
                                                                     **kwargs)
        return transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{type(config).__name__} (from {source!r}) does not build a causal LM: {exc}") from exc


class HFCausalLM(NextTokenTask):
    """Next-token prediction with a Hugging Face causal LM; AdamW with warm-up + cosine, stepped every batch.

    Args:
        config: a config shipped with the package (``"llama_tiny"``), a directory with a ``config.json``, or a
            ``.json`` file (see :func:`config_file`).
        pretrained: load the weights saved in the ``config`` directory (``None``: where it holds some; ``False``:
            fresh weights; ``True``: required). Never downloaded.
        attn_implementation: ``"sdpa"``, ``"eager"``, ... as ``transformers`` takes it.
        gradient_checkpointing: ``transformers``' own per-layer checkpointing (:func:`enable_checkpointing`).
        lr, weight_decay, betas, warmup_steps, max_steps, min_lr_ratio: as :class:`~lightning_vdnn.examples.tasks.LanguageModel`.
        overrides: fields set on the config before the model is built (``num_hidden_layers=2``).
    """

    def __init__(
        self,
        config: str = "llama_tiny",
        pretrained: Optional[bool] = None,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        max_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_causal_lm(config, attn_implementation, pretrained, **overrides)
        if gradient_checkpointing:
            enable_checkpointing(self.model)

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Refuse data whose token ids the embedding cannot hold, before a step fails with an index error."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab, vocab = getattr(datamodule, "vocab_size", None), self.model.config.vocab_size
        if data_vocab is not None and vocab < data_vocab:
            raise ValueError(f"The data has {data_vocab} token ids but the model's vocab_size is {vocab}. Use a "
                             f"config with vocab_size >= {data_vocab}, or override it (model.vocab_size={data_vocab}).")

    @override
    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]`` (no key/value cache: this is training)."""
        return self.model(input_ids=idx, use_cache=False).logits

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
