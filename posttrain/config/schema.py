"""The run configuration's schema: frozen, typed dataclasses, validated at construction.

One place documents each field (docs/config.md mirrors it). The YAML is flat where users expect it
(``method``, ``model``, ``beta``, ``batch_size`` ...) and nested for the data and reference sections. The
method's own hyperparameters (``beta``, ``gamma``, ``label_smoothing`` ...) are written at the top level
and bound to the method's algorithm class (``config.algorithm``), whose defaults follow the method's
paper. A key that belongs to another method is an error, not a silent no-op.

Errors name the field, the allowed range and, for unknown keys, the nearest valid name. Reading YAML, the
``--set`` overrides and the checks made when a file is read live in :mod:`posttrain.config.loader`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.algorithms import Algorithm
from posttrain.errors import check
from posttrain.fields import PathStr


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they become tokens."""

    train: PathStr
    """Training data: .jsonl .json .parquet .csv, a saved `datasets` directory, or a hub name."""
    eval: PathStr | None = None
    """Optional held-out data, same formats."""
    eval_size: int = 0
    """When ``eval`` is not given: hold out this many training rows (chosen by ``seed``) for evaluation."""
    split: str = "train"
    """Split to read from a hub data set or a saved DatasetDict."""
    max_length: int = 1024
    """Prompt + completion tokens; longer completions are cut at the end."""
    max_prompt_length: int | None = None
    """Prompt tokens; longer prompts keep their end (the part next to the answer). Default: max_length // 2."""
    chat_template: bool | None = None
    """Apply the tokenizer's chat template: None = when it has one."""

    @property
    def prompt_limit(self) -> int:
        """The prompt length limit in force."""
        return self.max_length // 2 if self.max_prompt_length is None else self.max_prompt_length

    def __post_init__(self) -> None:
        check(bool(self.train), "data.train", "is required (a file, a saved dataset dir or a hub name)")
        check(self.eval_size >= 0, "data.eval_size", f"must be >= 0, got {self.eval_size}")
        check(
            not (self.eval and self.eval_size),
            "data.eval_size",
            f"must be 0 when data.eval is given (it would be ignored), got {self.eval_size}",
        )
        check(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        check(
            self.max_prompt_length is None or 1 <= self.max_prompt_length < self.max_length,
            "data.max_prompt_length",
            f"must be in [1, data.max_length - 1 = {self.max_length - 1}], got {self.max_prompt_length}",
        )


ReferenceKind = Literal["copy", "cached", "none"]
Layout = Literal["auto", "padded", "packed", "shared_prefix"]
SpanKernel = Literal["auto", "loop", "mask"]


@dataclass(frozen=True)
class ReferenceConfig:
    """The frozen reference policy of DPO-style losses.

    ``copy``: a frozen copy of the policy's starting weights (or of ``model``), run each step.
    ``cached``: reference log-probs computed once, stored on disk keyed by a fingerprint of (weights,
    token ids of the data, precision), reused by later epochs and runs; the model is freed before training.
    ``none``: no reference (SimPO, ORPO need none and ignore the others).
    """

    kind: ReferenceKind = "copy"
    model: PathStr | None = None
    """Reference weights; default: the policy's starting weights."""
    cache_dir: PathStr | None = None
    """Where ``cached`` stores log-probs; default ``$POSTTRAIN_CACHE/reference`` (~/.cache/posttrain)."""

    def __post_init__(self) -> None:
        blocker = None if self.cache_dir is None else _file_in_the_way(Path(self.cache_dir))
        check(blocker is None, "reference.cache_dir", f"{self.cache_dir}: {blocker} is a file, not a folder")


LoraSave = Literal["merged", "adapter"]


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) through ``peft``: only the adapters train.

    With LoRA, the reference of DPO-style methods is the policy itself with its adapters disabled (the
    base weights never change), so no second copy of the model is held.
    """

    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.0
    target_modules: str = "all-linear"
    """``all-linear`` or comma-separated module names (e.g. ``q_proj,v_proj``)."""
    save: LoraSave = "merged"
    """Final model: ``merged`` (a plain HF model) or ``adapter`` (peft adapter files only)."""
    load_in_4bit: bool = False
    """QLoRA (Dettmers et al. 2023): the frozen base in 4-bit NF4 with double quantization (``bitsandbytes``,
    on CUDA or CPU); the reference is then the 4-bit base, and a merged save the dequantized base plus the
    adapters' updates, in fp32. Not with ``fsdp2`` nor the vLLM backend (refused in one line)."""

    def __post_init__(self) -> None:
        check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        check(bool(self.target_modules.strip()), "lora.target_modules", "must name modules or be all-linear")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling for the online methods. The policy, old-policy and reference log-probs of a sample are all
    computed from logits divided by this ``temperature``."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = off."""
    stop: tuple[str, ...] = ()
    """Stop strings: a completion is cut right after the first one."""
    backend: Literal["hf", "vllm"] = "hf"
    """``hf``: transformers' ``generate`` on the training module; ``vllm``: a colocated vLLM engine (CUDA GPU,
    ``pip install vllm``) that receives the current weights before every rollout."""
    vllm_gpu_memory_utilization: float = 0.3
    """With ``backend: vllm``: the share of GPU memory vLLM may take (the rest is training's)."""
    batch_size: int = 16
    """With ``backend: hf``: completions per ``generate`` call (memory of the KV cache vs. speed)."""
    loop: Literal["auto", "generate"] = "auto"
    """With ``backend: hf``: ``auto`` decodes with posttrain's loop (:mod:`posttrain.rollout.decode`: each
    prompt prefilled once for its samples, no per-step overhead of ``generate``) where the model allows it,
    else ``model.generate``; ``generate``: always ``model.generate``."""
    mask_truncated: bool | None = None
    """Completions that hit ``max_new_tokens`` without finishing get no loss (DAPO's overlong filtering).
    null: the method's default (true for ``dapo``, false for the others)."""

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.temperature > 0, "generation.temperature", f"must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "generation.top_k", f"must be >= 0, got {self.top_k}")
        check(self.batch_size >= 1, "generation.batch_size", f"must be >= 1, got {self.batch_size}")
        u = self.vllm_gpu_memory_utilization
        check(0 < u < 1, "generation.vllm_gpu_memory_utilization", f"must be in (0, 1), got {u}")


Strategy = Literal["ddp", "fsdp2"]


@dataclass(frozen=True)
class DistributedConfig:
    """How the processes of a ``torchrun`` launch share a run; ignored with one process (docs/distributed.md).

    Every rank takes an equal share of each GLOBAL batch (``batch_size`` must be a multiple of the number of
    processes) and the gradients are summed, so N processes train what one process would.
    """

    strategy: Strategy = "ddp"
    """``ddp``: a full replica of the model per process, gradients all-reduced once per optimizer step.
    ``fsdp2``: parameters, gradients and optimizer state sharded over the processes (FSDP2
    ``fully_shard``): about 1/N of the training state each, more communication (online methods gather the
    policy's weights for sampling; not with the vLLM backend)."""


Scheduler = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class TrainConfig:
    """A whole run. ``algorithm`` holds the method and its hyperparameters."""

    algorithm: Algorithm
    model: PathStr
    data: DataConfig
    output_dir: PathStr
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    trust_remote_code: bool = False
    """Let a model whose folder or hub repo ships its own Python code (``auto_map`` in its config, a
    ``model_type`` transformers does not know) run that code, for every model of the run: policy, reference,
    reward model, critic, tokenizer, vLLM. false: such a model is refused in one line, never a prompt."""
    lora: LoraConfig | None = None
    """Train low-rank adapters instead of every weight (needs ``peft``); absent = full fine-tuning."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Online methods: how completions are sampled."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes (torchrun): data parallelism or FSDP2 sharding."""
    rewards: tuple[Any, ...] = ()
    """Online methods: reward specs (a built-in name or ``module:function``, with ``weight`` and options)."""
    max_steps: int | None = None
    """Optimizer steps; when unset, ``epochs`` passes over the training data."""
    epochs: float = 1.0
    batch_size: int = 8
    """GLOBAL batch in examples (pairs for preference methods), whatever the number of processes."""
    micro_batch_size: int | None = None
    """Examples per forward/backward; ``batch_size`` must be a multiple. Default: ``batch_size``."""
    learning_rate: float | None = None
    """Peak learning rate; default: the method's (5e-7 for the DPO family, 8e-6 for ORPO)."""
    lr_scheduler: Scheduler = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    skip_nonfinite_steps: int = 0
    """A NaN/inf loss or gradient norm stops the run at that step (0), or up to this many such steps have their
    update skipped on the device (counted in the summary) before the next one stops it."""
    precision: Precision = "fp32"
    seed: int = 0
    logps_chunk_size: int = 1024
    """Completion tokens per LM-head chunk in the log-prob primitive (memory vs. speed)."""
    gradient_checkpointing: bool = False
    layout: Layout = "auto"
    """How completions are laid out for scoring: ``padded`` (a row each), ``packed`` (one row per micro-batch,
    no padding, attention kept inside each sequence), ``shared_prefix`` (packed, a prompt shared by several
    completions computed once), ``auto`` (the fastest one the method and the model allow)."""
    compile: Literal["auto", True, False] = "auto"
    """``torch.compile`` the policy's decoder layers, attention outside the graph (posttrain/model/compiled.py):
    ``true``, ``false``, or ``auto`` (off for now: it does not pay on a CPU, and awaits its GPU measurement).
    Offline methods only."""
    span_attention: SpanKernel = "auto"
    """How the packed layouts' attention runs: ``loop`` (one causal call per sequence: the fastest on a CPU),
    ``mask`` (one call per layer: FlexAttention with a block mask on CUDA, a dense mask elsewhere), ``auto``
    (``mask`` on CUDA, ``loop`` elsewhere)."""
    eval_steps: int | None = None
    """Evaluate every N steps (and always before and after training when there is eval data)."""
    save_steps: int | None = None
    """Save a resumable checkpoint every N steps (and always at the end)."""
    keep_resumable: int | None = None
    """With ``save_steps``: the newest N checkpoints keep their training state; older ones keep their model
    alone (still a loadable model and a frontier point, no longer resumable). null: every one stays resumable."""
    logging_steps: int = 1
    log_completions: int = 4
    """Online methods: write this many samples of each step's rollout (prompt, completion, per-reward scores,
    advantage) to ``completions.jsonl``; 0: none (posttrain/training/completions.py)."""
    report_to: tuple[str, ...] = ()
    """Trackers that get every figure of metrics.jsonl at the same steps: ``tensorboard`` or ``module:Class``
    (posttrain/tracking.py); checked here, opened by the run."""
    deterministic: bool = False
    """Deterministic kernels (``posttrain.determinism``): torch's deterministic algorithms, cuDNN deterministic
    and not benchmarking, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (refused when CUDA started without it). A run
    and its resumption then agree bit for bit on a CUDA GPU too; slower there (docs/config.md)."""

    def __post_init__(self) -> None:
        check(bool(self.model), "model", "is required (a local directory, a hub id or embedded:NAME)")
        check(bool(self.output_dir), "output_dir", "is required")
        blocker = _file_in_the_way(Path(self.output_dir))
        where = "" if blocker == Path(self.output_dir) else f"{self.output_dir}: "
        check(blocker is None, "output_dir", f"{where}{blocker} is a file, not a folder")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        mb = self.micro_batch_size
        check(
            mb is None or (mb >= 1 and self.batch_size % mb == 0),
            "micro_batch_size",
            f"must divide batch_size={self.batch_size}, got {mb}",
        )
        lr = self.learning_rate
        check(lr is None or lr > 0, "learning_rate", f"must be > 0, got {lr}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(all(0 <= b < 1 for b in self.adam_betas), "adam_betas", f"each in [0, 1), got {self.adam_betas}")
        check(self.adam_eps > 0, "adam_eps", f"must be > 0, got {self.adam_eps}")
        g = self.max_grad_norm
        check(g is None or g > 0, "max_grad_norm", f"must be > 0 or null, got {g}")
        n = self.skip_nonfinite_steps
        check(n >= 0, "skip_nonfinite_steps", f"must be >= 0, got {n}")
        check(self.logps_chunk_size >= 1, "logps_chunk_size", f"must be >= 1, got {self.logps_chunk_size}")
        # Seeds of the data order and the samplers are derived from it by products (seed * 100_003 + epoch ...)
        # that torch takes as 64-bit integers.
        check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        for name in ("eval_steps", "save_steps", "keep_resumable"):
            v = getattr(self, name)
            check(v is None or v >= 1, name, f"must be >= 1 or null, got {v}")
        check(self.logging_steps >= 1, "logging_steps", f"must be >= 1, got {self.logging_steps}")
        check(self.log_completions >= 0, "log_completions", f"must be >= 0, got {self.log_completions}")
        if self.report_to:
            from posttrain.tracking import check_trackers  # (only when a tracker is named)

            check_trackers(self.report_to)
        d = self.deterministic
        check(isinstance(d, bool), "deterministic", f"expected true or false, got {d!r}")
        check(
            self.compile is not True or self.algorithm.data_kind != "prompts",
            "compile",
            f"true is for the offline methods; {self.algorithm.name} samples with the same layers and a KV cache "
            "of a new length every token, which would recompile them (use auto or false)",
        )
        refusal = self.algorithm.reference_refusal(self.reference.kind)
        check(refusal is None, "reference.kind", refusal or "")

    @property
    def method(self) -> str:
        return self.algorithm.name

    @property
    def lr(self) -> float:
        """The learning rate in force: the configured one or the method's default."""
        return self.learning_rate if self.learning_rate is not None else self.algorithm.default_learning_rate

    @property
    def uses_reference(self) -> bool:
        """Whether the run scores a reference: DPO-style methods unless ``kind: none``; GRPO, RLOO and PPO
        when ``beta > 0`` (their KL term)."""
        return self.algorithm.uses_reference(self.reference.kind)

    def to_dict(self) -> dict[str, Any]:
        """The flat YAML form (method hyperparameters at the top level); ``from_dict`` round-trips it."""
        out: dict[str, Any] = {"method": self.algorithm.name}
        out.update(dataclasses.asdict(self.algorithm))
        for f in dataclasses.fields(self):
            if f.name == "algorithm":
                continue
            value = getattr(self, f.name)
            is_section = dataclasses.is_dataclass(value) and not isinstance(value, type)
            out[f.name] = dataclasses.asdict(value) if is_section else value
        out["adam_betas"] = list(self.adam_betas)
        out["rewards"] = list(self.rewards)
        out["report_to"] = list(self.report_to)
        out["generation"]["stop"] = list(self.generation.stop)
        return out


def _file_in_the_way(folder: Path) -> Path | None:
    """The existing file, if any, at ``folder`` or at the first of its parents that exists (mkdir would fail)."""
    for place in (folder, *folder.parents):
        if place.exists():
            return None if place.is_dir() else place
    return None
