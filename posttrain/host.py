"""Host tensors and the device: reads of host tensors (the tensor -> Python conversions that are not device
reads), and host tensors sent to the device without a synchronisation.

A training step reads the device once (tests/test_syncs.py counts every ``.item()``, ``.tolist()``,
``float(t)``, ``bool(t)`` ... of a step). Some tensors live on the host by construction (a batch order drawn
from a CPU generator, a collated batch before its transfer); reading them costs no synchronisation, and this
is the one function through which the loops do it. It refuses a tensor on an accelerator, so a device read
can never hide behind it.
"""

from __future__ import annotations

from typing import Any

import torch
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


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``; from the host, asynchronously.

    A blocking host-to-device copy (``tensor.to(device)``) synchronises: torch copies with
    ``memcpy_and_sync``, a ``cudaStreamSynchronize`` that waits for every kernel queued before it, so a batch
    whose five tensors are moved so stalls the host five times per micro-batch, and ``set_sync_debug_mode``
    counts each. ``non_blocking=True`` from pageable memory returns once CUDA has staged the bytes (its API's
    synchronisation rules), with no wait on the device, and the host tensor may be freed or changed at once
    (the loops pin nothing). On a CPU, or for a tensor already there, it is ``tensor.to(device)``.

    >>> to_device(torch.tensor([3, 1]), torch.device("cpu")).tolist()
    [3, 1]
    """
    return tensor.to(device, non_blocking=tensor.device.type == "cpu" and device.type != "cpu")


__all__ = ["host_values", "to_device"]
