"""Reads of host tensors: the tensor -> Python conversions that are not device reads.

A training step reads the device once (tests/test_syncs.py counts every ``.item()``, ``.tolist()``,
``float(t)``, ``bool(t)`` ... of a step). Some tensors live on the host by construction (a batch order drawn
from a CPU generator, a collated batch before its transfer); reading them costs no synchronisation, and this
is the one function through which the loops do it. It refuses a tensor on an accelerator, so a device read
can never hide behind it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def host_values(tensor: Tensor) -> Any:
    """``tensor.tolist()`` for a tensor on the CPU; ``ValueError`` for one on an accelerator.

    >>> import torch
    >>> host_values(torch.tensor([3, 1]))
    [3, 1]
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"host_values reads host tensors only, got one on {tensor.device} (a device read)")
    return tensor.tolist()


__all__ = ["host_values"]
