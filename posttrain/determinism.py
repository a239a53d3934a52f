"""``deterministic: true``: the one module that sets torch's determinism switches.

On a CPU, torch's kernels already give the same bits for the same inputs. On a CUDA GPU some do not
(``index_add`` and the embedding backward accumulate with atomics; cuBLAS may pick a workspace-dependent
reduction), so two runs, or a run and its resumption, drift apart by float noise. :func:`configure` is
called at the start of every run (offline, online, pipeline) with the config's ``deterministic``:

* ``torch.use_deterministic_algorithms(True)`` (an operation without a deterministic kernel on the device
  stops the run with torch's error naming it), ``cudnn.deterministic`` on and ``cudnn.benchmark`` off;
* ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS reads when its first handle is created: once CUDA is
  initialised in this process it may be too late, so a run is refused in one line unless the variable
  already holds a deterministic value.

With ``deterministic: false`` the switches are put back as they were before a deterministic run of this
process set them (a pipeline or a test session runs several): nothing is changed for a process that never
asked for determinism.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from posttrain.errors import ConfigError

CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the two values torch accepts; the first one is set

# The switches as a deterministic run found them: (algorithms, warn_only, cudnn.deterministic, cudnn.benchmark).
_before: tuple[bool, bool, bool, bool] | None = None


def configure(deterministic: bool) -> None:
    """Set (``True``) or put back (``False``) the determinism switches; see the module docstring.

    Raises ConfigError naming ``deterministic`` when CUDA is already initialised in this process and
    ``CUBLAS_WORKSPACE_CONFIG`` does not hold a deterministic value."""
    global _before
    if not deterministic:
        if _before is not None:
            algorithms, warn_only, cudnn_deterministic, benchmark = _before
            torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, benchmark
            _before = None
        return
    _set_cublas_workspace()
    if _before is None:
        _before = (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _set_cublas_workspace() -> None:
    value = os.environ.get(CUBLAS_VARIABLE)
    if value in CUBLAS_DETERMINISTIC:
        return
    if torch.cuda.is_initialized():
        shown = "unset" if value is None else repr(value)
        raise ConfigError(
            f"deterministic: true needs {CUBLAS_VARIABLE}={CUBLAS_DETERMINISTIC[0]} before CUDA starts, but CUDA is "
            f"already initialised in this process ({CUBLAS_VARIABLE} {shown}); export {CUBLAS_VARIABLE}="
            f"{CUBLAS_DETERMINISTIC[0]} before starting Python, or set deterministic: false"
        )
    os.environ[CUBLAS_VARIABLE] = CUBLAS_DETERMINISTIC[0]


def cumsum(x: Tensor, dim: int) -> Tensor:
    """``x.cumsum(dim)``, computed on the CPU when deterministic algorithms are on and ``x`` is a floating-point
    CUDA tensor: torch has no deterministic CUDA kernel for it and would refuse (the sampler's inverse-CDF
    draw and top-p filter need it; one host round trip per decoding step, only under ``deterministic``)."""
    if x.is_cuda and x.is_floating_point() and torch.are_deterministic_algorithms_enabled():
        return x.cpu().cumsum(dim).to(x.device)
    return x.cumsum(dim)
