"""The one module that touches ``torch.distributed``. Without an initialised process group every
function is the single-process identity, so the loops call them unconditionally.

Under ``torchrun`` (``WORLD_SIZE`` > 1), :func:`setup` joins the process group (NCCL on CUDA, gloo on CPU)
and a run is data-parallel:

* Every rank builds the same GLOBAL batch (the batch of a step is a pure function of the step and the seed)
  and takes its contiguous share of it (:func:`shard`). Losses divide by counts of the global batch, so
  each rank's gradient is its share of the full-batch gradient, and the shares must be SUMMED, never
  averaged: with ``ddp`` :func:`reduce_gradients` all-reduces them once per optimizer step (after every
  micro-batch's backward: accumulation costs no communication); with ``fsdp2`` FSDP2 reduce-scatters
  them in backward, with its divide factor set to 1.
* ``ddp`` keeps a full replica of the model per rank, ``fsdp2`` shards parameters, gradients and
  optimizer state over the ranks (:func:`prepare`).

Why not ``torch.nn.parallel.DistributedDataParallel``: its gradient hooks are armed by the wrapper's own
``forward``, and nothing here calls it. The log-prob primitive (:mod:`posttrain.model.logps`) runs the
decoder and the LM head separately, sampling calls ``generate``, a LoRA reference is the module with its
adapters disabled. A wrapper would sync nothing (or need every caller to unwrap it); one bucketed
all-reduce of the summed gradients after the last micro-batch is what DDP with ``no_sync`` does, minus
the overlap of communication with the backward pass.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from posttrain.errors import ConfigError

T = TypeVar("T")

BUCKET_BYTES = 64 * 2**20
"""Gradients are flattened and all-reduced in buckets of about this size (memory vs. number of calls)."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun) started, before :func:`setup` joins them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup() -> None:
    """Join the process group that torchrun describes in the environment; nothing with one process.

    NCCL with one GPU per process (``LOCAL_RANK``) where CUDA is available, gloo on CPU. The group is
    destroyed when the process exits."""
    if is_initialized() or launched_world_size() <= 1:
        return
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={launched_world_size()} but {', '.join(missing)} unset: launch several processes with "
            "torchrun --nproc-per-node N -m posttrain train CONFIG.yaml"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    atexit.register(teardown)


def teardown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """This process's device: its GPU (``LOCAL_RANK``) under torchrun, the GPU or the CPU otherwise."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank()) if is_initialized() else torch.device("cuda")


# ------------------------------------------------------------------------------------------ collectives


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over processes, in place, and return it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_floats(values: Sequence[float]) -> list[float]:
    """Python floats summed over processes (in float64): per-step sums kept as floats by the online loop."""
    if not is_initialized() or not values:
        return list(values)
    return all_reduce_sum(torch.tensor(list(values), dtype=torch.float64, device=device())).tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` with one process."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every rank's rows (dim 0) in rank order: the inverse of :func:`shard` on dim 0. Ranks may
    hold different numbers of rows; the other dimensions must agree."""
    if not is_initialized():
        return tensor
    parts = all_gather_objects(tensor.detach().cpu())
    return torch.cat(parts).to(tensor.device)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it finished: one process fills a cache (a converted
    model, say) that the others then read instead of writing it at the same time."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (the shares differ by at most one, in rank order), so
    that gathering the ranks' results in rank order gives the items' order back.

    >>> shard(10)
    slice(0, 10, None)
    """
    w, r = world_size(), rank()
    return slice(n * r // w, n * (r + 1) // w)


def my_chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """This rank's share of ``items`` (:func:`shard`) cut into micro-batches of ``size`` (the last shorter)."""
    mine = items[shard(len(items))]
    return [mine[start : start + size] for start in range(0, len(mine), size)]


# ----------------------------------------------------------------------------------- models, gradients


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model``'s parameters (they are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def prepare(model: nn.Module, strategy: str) -> nn.Module:
    """Make ``model`` data-parallel, in place (the same object comes back; nothing with one process).

    ``ddp``: a full replica per rank, rank 0's weights and buffers broadcast so that every replica starts
    equal (adapters and new heads are initialised from the RNG). ``fsdp2``: :func:`_fully_shard`.
    """
    if not is_initialized():
        return model
    if strategy == "fsdp2":
        _fully_shard(model)
    elif strategy == "ddp":
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
    else:
        raise ValueError(f"distributed.strategy must be ddp or fsdp2, got {strategy!r}")
    return model


def _fully_shard(model: nn.Module) -> None:
    """FSDP2 units: every block of the decoder stack, then the rest.

    A causal LM is scored by the log-prob primitive, which calls the decoder and then the LM head on
    chunks of hidden states, never the model's own forward. So the decoder is the root unit, and the LM
    head is grouped with the input embeddings (the same tensor when tied): the group is gathered when the
    embeddings run and each standalone head call re-gathers it if needed (FSDP2's chunked-loss pattern).
    ``generate`` and a full forward call the decoder and the head too, so they work unchanged. A model
    without an LM head (a reward model, a critic) is called through its forward: it is the root.
    Gradients are summed, not averaged (see the module docstring).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from posttrain.model.logps import backbone_and_head

    try:
        decoder, head = backbone_and_head(model)
    except TypeError:
        decoder, head = model, None
    blocks = [m for m in decoder.modules() if isinstance(m, nn.ModuleList)]
    if not blocks:
        name = type(model).__name__
        raise ConfigError(f"distributed.strategy: fsdp2 finds no stack of blocks (nn.ModuleList) in {name}")
    for block in max(blocks, key=lambda m: sum(p.numel() for p in m.parameters())):
        fully_shard(block)
    if head is not None:
        embeddings = decoder.get_input_embeddings()  # type: ignore[operator]
        fully_shard([embeddings, head])
    fully_shard(decoder)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM / AVG


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Under ``fsdp2``, every FSDP unit of ``model`` gathered (all-gathered once, kept through any number
    of forwards) for the block, resharded after it; nothing for a model that is not sharded.

    For sampling: ``generate`` runs one forward per new token, and the processes' completions end at
    different lengths, so gathering per forward (FSDP2's default) would need every process to run as many
    forwards as the slowest. With the weights gathered once, each process decodes alone (what rollout
    engines do with the trained weights too); memory: the full weights for the duration of the block,
    gradients and optimizer state stay sharded. Every process must enter the block (the gather is
    collective)."""
    if not is_sharded(model):
        yield
        return
    units = _units(model)
    root = units[0]  # the outermost unit (the decoder, or the whole model without an LM head)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:  # back to fully_shard's defaults: the root keeps its weights after forward, the rest not
            unit.set_reshard_after_forward(unit is not root, recurse=False)
            unit.reshard()


@contextlib.contextmanager
def forward_only(*models: nn.Module) -> Iterator[None]:
    """``torch.no_grad()`` for forwards that no backward follows (evaluation, KTO's KL baseline, old-policy
    log-probs) of models that train afterwards; under ``fsdp2`` every unit of ``models`` is resharded after.

    FSDP2 finishes a pass in the callback at the end of backward: it clears which unit claimed the pass and
    which grouped modules still have to run (the embeddings + LM head unit, whose head the log-prob
    primitive calls standalone, is left waiting for the embeddings). A no-grad pass has no backward, so
    that state stays. Two such passes before a training step (KTO: evaluation's KL baseline, then the step's)
    lost the decoder's and that unit's gradients altogether (None on every process; caught by
    tests/test_distributed.py). Resharding every unit afterwards gives the next training forward a clean
    start: it gathers and hooks each unit again."""
    with torch.no_grad():
        yield
    for model in models:
        for unit in _units(model):
            unit.reshard()


def _units(model: nn.Module) -> list[Any]:
    """The FSDP units (``FSDPModule``) of ``model``, outermost first; none when it is not sharded."""
    if not is_sharded(model):
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def lockstep(chunks: Sequence[T], model: nn.Module, filler: T) -> list[tuple[T, bool]]:
    """``chunks`` (this process's micro-batches, empty ones dropped) as ``(chunk, real)`` pairs, padded with
    ``(filler, False)`` to the largest number of chunks of any process when ``model`` is sharded.

    FSDP2 gathers the weights in every forward and reduce-scatters gradients in every backward: collectives
    that each process must reach as often as the others. A share of a batch that does not split evenly
    (PPO's minibatches, a DAPO batch short of groups, an eval split) gives some processes a micro-batch
    fewer; those run the filler instead and drop what it gives (a loss times 0 still runs backward)."""
    pairs = [(c, True) for c in chunks if len(c)]  # type: ignore[arg-type] # (an empty share: nothing to run)
    if not is_sharded(model):
        return pairs
    most = torch.tensor([len(pairs)], device=device())
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return pairs + [(filler, False)] * (int(most) - len(pairs))


def reduce_gradients(params: Iterable[nn.Parameter]) -> None:
    """Sum the gradients of replicated (not sharded) parameters over processes, in buckets.

    A parameter that got no gradient on some rank (its share of a batch did not use it) counts as 0 there;
    one that got none anywhere keeps ``grad = None``, as with one process (AdamW then skips it).
    """
    if not is_initialized():
        return
    from torch.distributed.tensor import DTensor

    plain = [p for p in params if p.requires_grad and not isinstance(p, DTensor)]
    if not plain:
        return
    used = all_reduce_sum(torch.tensor([p.grad is not None for p in plain], dtype=torch.int32, device=device()))
    todo = [p for p, u in zip(plain, used.tolist(), strict=True) if u]
    for p in todo:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[nn.Parameter] = []
    size = 0
    for i, p in enumerate(todo):
        bucket.append(p)
        size += p.numel() * p.element_size()
        last = i + 1 == len(todo)
        if last or size >= BUCKET_BYTES or (todo[i + 1].dtype, todo[i + 1].device) != (p.dtype, p.device):
            _all_reduce_bucket([q.grad for q in bucket if q.grad is not None])
            bucket, size = [], 0


def _all_reduce_bucket(grads: list[Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the (already reduced) gradients to ``max_norm`` by their global norm; return that norm, a scalar
    tensor left on the device (read with the step's other figures: no synchronisation here).

    One process: ``torch.nn.utils.clip_grad_norm_``. Several: the same arithmetic, the norm of sharded
    gradients gathered over the ranks (replicated gradients are equal on every rank).
    """
    if not is_initialized():
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norms = []
    for group in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
        if group:
            norm = torch.nn.utils.get_total_norm(group)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros((), device=device())
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as clip_grad_norm_ computes it
    from torch.distributed.tensor.experimental import implicit_replication

    with torch.no_grad(), implicit_replication():  # the scalar multiplies DTensor shards as a replicated value
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


# ---------------------------------------------------------------------------------------- checkpoints


def unsharded(model: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
    """``model`` as one plain module, for saving: itself when it is not sharded. Under ``fsdp2`` (every rank
    must call this) the full weights are gathered to rank 0's CPU and assigned to ``rebuild()``, which is
    called under :func:`posttrain.model.load.empty_weights` (a skeleton of the same layout on the meta device,
    built with the RNG left untouched; buffers that are not in the state dict come from ``model``, where
    FSDP2 keeps them whole): rank 0 holds the gathered weights once. The other ranks get None."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from posttrain.model.load import empty_weights
    from posttrain.model.skeleton import fill_skeleton

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    with torch.random.fork_rng(devices=[]), empty_weights():
        plain = rebuild()
    return fill_skeleton(
        plain, full, lambda owner, name: model.get_submodule(owner).get_buffer(name).detach().to("cpu", copy=True)
    )


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's FULL state in torch's own layout (parameters by position in ``param_groups``): the
    same file whatever the strategy and number of processes, so a run saved by N processes resumes on M.
    Under ``fsdp2`` every rank must call this; rank 0 gets the state, the others ``{}``."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full: dict[str, Any] = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not is_main() or "param_groups" not in full:
        return {}
    position: dict[str, int] = {}
    groups = []
    for group in full["param_groups"]:
        ids = [position.setdefault(name, len(position)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {position[name]: s for name, s in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state saved by :func:`optimizer_state` (by any number of processes) into ``optimizer``."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    live = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups, start = [], 0
    for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True):
        groups.append({**saved, "params": live[start : start + len(group["params"])]})
        start += len(group["params"])
    by_name: dict[str, Any] = {"state": {live[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
