"""Loading policies, references, reward models and tokenizers: hub ids, local directories, ``embedded:`` models."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from posttrain.errors import ConfigError
from posttrain.model import embedded
from posttrain.model.lora import exact_4bit_kernels
from posttrain.model.skeleton import fill_skeleton  # noqa: F401 - (re-exported)

_EMPTY = contextvars.ContextVar("posttrain_empty_weights", default=False)
_TRUSTED = contextvars.ContextVar("posttrain_trust_remote_code", default=False)
# What the hub takes as a model id: NAME or ORG/NAME. Anything else that is not a folder is a missing folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


@contextlib.contextmanager
def remote_code(trusted: bool) -> Iterator[None]:
    """Inside, every model and tokenizer load (policy, reference, reward model, critic, vLLM) passes
    ``trust_remote_code=trusted``: the run's ``trust_remote_code`` key, set once where a run starts (one
    setting, not an argument threaded through every loader). Outside: false. With false, a model that needs
    its own code is refused in one line (:func:`model_source`); transformers never prompts."""
    token = _TRUSTED.set(trusted)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def trusted() -> bool:
    """The ``trust_remote_code`` in force (see :func:`remote_code`)."""
    return _TRUSTED.get()


def local_model_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model, when that shows without loading it: a file, a folder without
    ``config.json``, or no folder at all where the name cannot be a hub id either. None: it may load."""
    if name.startswith(embedded.PREFIX):
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"{name} holds no config.json (not a saved model)"
    if path.exists():
        return f"{name} is a file, not a model folder"
    if name.startswith((".", "~", "/")) or not _HUB_ID.fullmatch(name) or "--" in name or ".." in name:
        return f"{name}: no such folder (and not a hub id, NAME or ORG/NAME)"
    return None


def model_source(name: str, key: str = "model", *, tokenizer: bool = False) -> str:
    """``name`` as ``from_pretrained`` takes it (``embedded:`` converted, ``~`` expanded), checked first so
    that each way it can be wrong is one ConfigError naming ``key``: a missing folder, a file, a folder
    without ``config.json`` (or, for ``tokenizer``, without tokenizer files), custom code not trusted."""
    try:
        source = embedded.resolve(os.path.expanduser(name))
    except (ValueError, RuntimeError) as err:  # an unknown embedded name, its package not installed
        raise ConfigError(f"{key}: {err}") from None
    path = Path(source)
    if tokenizer and path.is_dir():
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"{key}: {name} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    else:
        problem = local_model_problem(source)
        if problem:
            raise ConfigError(f"{key}: {problem}")
    if path.is_dir() and not trusted() and _needs_custom_code(path, key):
        raise ConfigError(
            f"{key}: {name} needs its own Python code (config.json has auto_map and a model_type transformers "
            "does not know); set trust_remote_code: true to run it, if you trust that code"
        )
    return source


def _needs_custom_code(folder: Path, key: str) -> bool:
    """transformers' own test for a local folder: ``auto_map`` in config.json and a ``model_type`` it does
    not know. (A hub repo, or a tokenizer of its own, is refused by transformers itself: :func:`_refused`.)"""
    from transformers import CONFIG_MAPPING

    file = folder / "config.json"
    if not file.is_file():
        return False
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{key}: {file} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: {file} is not a JSON object")
    return bool(values.get("auto_map")) and values.get("model_type") not in CONFIG_MAPPING


def _refused(err: Exception, name: str, key: str, what: str = "") -> ConfigError:
    """A load that failed, as one line naming the key: transformers' refusal of custom code (a hub repo), a
    weights file that cannot be read (truncated, corrupt), or the error's first line."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "trust_remote_code" in str(err):
        return ConfigError(f"{key}: {name} needs its own Python code; set trust_remote_code: true to run it")
    if isinstance(err, SafetensorError):
        return ConfigError(f"{key}: {name}: a weights file cannot be read (truncated or corrupt?): {first}")
    elsewhere = "" if Path(name).expanduser().exists() or embedded.is_embedded(name) else " (no such local folder)"
    return ConfigError(f"{key}: cannot load {what}{name!r}{elsewhere}: {first}")


def pretrained(auto_class: Any, name: str, key: str = "model", **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(name, **kwargs)``, the one way posttrain loads a model, its config or its
    tokenizer: the source checked first (:func:`model_source`), ``trust_remote_code`` as the run says
    (:func:`remote_code`), and each failure one ConfigError naming ``key``."""
    tokenizer = auto_class.__name__ == "AutoTokenizer"
    source = model_source(name, key, tokenizer=tokenizer)
    try:
        return auto_class.from_pretrained(source, trust_remote_code=trusted(), **kwargs)
    except ConfigError:
        raise
    except (OSError, ValueError, SafetensorError) as err:  # ValueError: transformers' word for a bad model
        raise _refused(err, name, key, "the tokenizer of " if tokenizer else "") from err
    except RuntimeError as err:  # weights of other shapes than config.json says; anything else is no input error
        if "mismatched_sizes" not in str(err) and "size mismatch" not in str(err):
            raise
        raise ConfigError(f"{key}: {name}: its weights do not have the shapes its config.json gives") from err


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Inside, :func:`load_causal_lm` and :func:`load_reward_model` build the model from its config on the
    meta device (no weights read, no memory): a skeleton for weights loaded with ``assign=True`` (saving
    under fsdp2 fills one with the gathered shards)."""
    token = _EMPTY.set(True)
    try:
        yield
    finally:
        _EMPTY.reset(token)


def _skeleton(auto_class: Any, name: str, **config_kwargs: Any) -> Any:
    from transformers import AutoConfig

    config = pretrained(AutoConfig, name, **config_kwargs)
    with torch.device("meta"):
        return auto_class.from_config(config, dtype=torch.float32)


def load_tokenizer(name: str, key: str = "model") -> Any:
    """The tokenizer of ``name``, with a pad token (EOS when it has none: the loss mask makes it inert).
    ``key``: the config key that named it, for errors."""
    from transformers import AutoTokenizer

    tokenizer = pretrained(AutoTokenizer, name, key)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name: str, *, trainable: bool = True, gradient_checkpointing: bool = False, quantized: dict[str, Any] | None = None
) -> nn.Module:
    """A causal LM in fp32 (bf16 runs use autocast over fp32 master weights); frozen when not trainable.
    ``quantized``: :func:`posttrain.model.lora.four_bit`'s arguments (QLoRA's 4-bit base)."""
    from transformers import AutoModelForCausalLM

    if _EMPTY.get():
        return ready(_skeleton(AutoModelForCausalLM, name), trainable, gradient_checkpointing)
    loaded = pretrained(AutoModelForCausalLM, name, dtype=torch.float32, output_loading_info=True, **(quantized or {}))
    model: Any = loaded[0]
    info: dict[str, Any] = loaded[1]
    if info.get("missing_keys"):  # e.g. a reward model's dir: its LM head would be random noise
        missing = sorted(info["missing_keys"])
        raise ConfigError(
            f"model: {name!r} is not a complete causal LM: {len(missing)} weights missing ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); a reward model cannot start a policy"
        )
    return ready(exact_4bit_kernels(model) if quantized else model, trainable, gradient_checkpointing)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while scoring a reference (with LoRA the reference is the training policy itself)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def ready(model: Any, trainable: bool, gradient_checkpointing: bool) -> Any:
    """Training mode (with activation checkpointing when asked) for a policy; frozen otherwise."""
    if not trainable:
        return freeze(model)
    model.train()
    if gradient_checkpointing:
        checkpoint_activations(model)
    return model


def checkpoint_activations(model: Any) -> None:
    """Recompute each layer's activations in backward (non-reentrant). Newer transformers call it
    ``activation_checkpointing_enable`` (the old ``gradient_checkpointing_enable`` warns, to go in v6); older
    ones (>= 4.56, the floor) know only the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """bf16 autocast around forwards when ``precision == "bf16"``; a no-op for fp32."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


# ------------------------------------------------------------------------------------------- reward models

REWARD_PAD_TOKEN = "<|pad|>"


def add_distinct_pad(tokenizer: Any, avoid: Collection[int] = ()) -> bool:
    """Give ``tokenizer`` a pad token of its own when it has none, or shares it with EOS or ``avoid``.

    A sequence classifier reads its score at the last token that is not ``pad_token_id`` (that is how
    transformers finds the end of a right-padded row), so the pad token must never end a real sequence:
    not EOS, and none of the ids a rendered conversation contains (``avoid``). Then a new special token
    ``<|pad|>`` is added (the caller resizes the embeddings). Returns whether one was added.
    """
    pad = tokenizer.pad_token_id
    if pad is not None and pad != tokenizer.eos_token_id and pad not in avoid:
        return False
    tokenizer.add_special_tokens({"pad_token": REWARD_PAD_TOKEN})
    if tokenizer.pad_token_id in avoid or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError(f"model: the tokenizer already uses {REWARD_PAD_TOKEN!r} in its texts; cannot pad with it")
    return True


def load_reward_model(
    name: str,
    tokenizer: Any,
    *,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
    quantized: dict[str, Any] | None = None,
) -> nn.Module:
    """A scalar reward model (``AutoModelForSequenceClassification``, one output) in fp32.

    ``name`` is either a causal LM (its decoder is kept, ``lm_head`` dropped and a new ``score`` head
    initialised) or a reward model saved by posttrain (loaded as is: the resume path). The embeddings grow
    to ``len(tokenizer)`` when the tokenizer has more ids (a pad token added by :func:`add_distinct_pad`),
    and ``pad_token_id`` is written into the config so that transformers, here and after a plain
    ``from_pretrained``, reads the score at the last real token of a right-padded row. ``quantized``: as
    for :func:`load_causal_lm` (the new score head stays full precision).
    """
    from transformers import AutoModelForSequenceClassification

    if _EMPTY.get():
        model = _skeleton(AutoModelForSequenceClassification, name, num_labels=1)
    else:
        model = pretrained(
            AutoModelForSequenceClassification, name, num_labels=1, dtype=torch.float32, **(quantized or {})
        )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # The new rows are only ever the pad token's, which right padding and the attention mask keep out of
        # every real position: plain initialisation is enough (mean_resizing would fit a hidden x hidden
        # covariance to the whole vocabulary for nothing).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return ready(exact_4bit_kernels(model) if quantized else model, trainable, gradient_checkpointing)
