"""Attention masks built on the device, so that transformers asks the device nothing about them.

Given a (B, T) padding mask, transformers' mask builder first checks whether any token is padding (to fall
back on SDPA's ``is_causal``): two device reads per forward, and a pipeline stall on a GPU before every
micro-batch. A prepared 4-D mask is used as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from posttrain.model.lora import base_model


def causal_padding_mask(model: nn.Module, attention_mask: Tensor) -> Tensor:
    """The (B, 1, T, T) boolean mask of padded rows, built on the device, for SDPA models: transformers then
    uses it as it is. Given the (B, T) mask instead, transformers first asks whether any token is padding
    (two reads of the device per forward, tests/test_syncs.py). Each query reads the keys before it that are
    not padding, and itself (a padding query then reads something: no NaN row; its output is never used).
    Models with another attention implementation or a sliding window get the (B, T) mask, as before."""
    config = base_model(model).config
    length = attention_mask.shape[-1]
    window = getattr(config, "sliding_window", None)
    windowed = window is not None and getattr(config, "use_sliding_window", True) is not False and window < length
    if getattr(config, "_attn_implementation", None) != "sdpa" or windowed or attention_mask.dim() != 2:
        return attention_mask
    causal = torch.ones((length, length), dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    return (causal & keys) | torch.eye(length, dtype=torch.bool, device=attention_mask.device)


__all__ = ["causal_padding_mask"]
