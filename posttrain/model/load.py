"""Loading policies, references, reward models and tokenizers: hub ids, local directories, ``embedded:`` models."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from posttrain.config import ConfigError
from posttrain.model import embedded
from posttrain.model.lora import exact_4bit_kernels

_EMPTY = contextvars.ContextVar("posttrain_empty_weights", default=False)


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

    config = AutoConfig.from_pretrained(embedded.resolve(name), **config_kwargs)
    with torch.device("meta"):
        return auto_class.from_config(config, dtype=torch.float32)


def fill_skeleton(
    skeleton: nn.Module, state: Mapping[str, Any], buffer: Callable[[str, str], torch.Tensor]
) -> nn.Module:
    """Give a meta-device ``skeleton`` its tensors: ``state`` assigned as it is (no copy), the buffers the
    state dict leaves out (non-persistent ones: rotary frequencies) from ``buffer(owner, name)``, and tied
    embeddings tied again (one tensor, whatever copies made ``state``). Returns ``skeleton``."""
    skeleton.load_state_dict(state, assign=True)
    for key, value in list(skeleton.named_buffers()):
        if value.is_meta:
            owner, _, name = key.rpartition(".")
            setattr(skeleton.get_submodule(owner), name, buffer(owner, name))
    tie = getattr(skeleton, "tie_weights", None)
    if callable(tie):
        tie()
    return skeleton


def load_tokenizer(name: str) -> Any:
    """The tokenizer of ``name``, with a pad token (EOS when it has none: the loss mask makes it inert)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(embedded.resolve(name))
    except OSError as err:
        raise ConfigError(f"model: cannot load the tokenizer of {name!r}: {str(err).splitlines()[0]}") from err
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
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            embedded.resolve(name), dtype=torch.float32, output_loading_info=True, **(quantized or {})
        )
        model: Any = loaded[0]
        info: dict[str, Any] = loaded[1]
    except OSError as err:  # not a directory, not on the hub, or no network: one line, exit 2
        raise ConfigError(f"model: cannot load {name!r}: {str(err).splitlines()[0]}") from err
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
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


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

    try:
        if _EMPTY.get():
            model = _skeleton(AutoModelForSequenceClassification, name, num_labels=1)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                embedded.resolve(name), num_labels=1, dtype=torch.float32, **(quantized or {})
            )
    except OSError as err:
        raise ConfigError(f"model: cannot load {name!r}: {str(err).splitlines()[0]}") from err
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # The new rows are only ever the pad token's, which right padding and the attention mask keep out of
        # every real position: plain initialisation is enough (mean_resizing would fit a hidden x hidden
        # covariance to the whole vocabulary for nothing).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return ready(exact_4bit_kernels(model) if quantized else model, trainable, gradient_checkpointing)
