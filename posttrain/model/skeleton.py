"""A model built on the meta device (no memory), given its tensors afterwards: saving under fsdp2 fills one
with the gathered shards, a merged LoRA save with the merged and dequantized weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


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
