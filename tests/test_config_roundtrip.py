"""Config round trips: every key of every method survives to_dict -> YAML -> load unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_config import raw

from posttrain.algorithms import ALGORITHMS
from posttrain.config import ConfigError, TrainConfig, from_dict, load

FULL: dict[str, Any] = {
    "model": "some/model",
    "output_dir": "/tmp/run",
    "data": {
        "train": "a.parquet",
        "eval": "b.jsonl",
        "eval_size": 0,
        "split": "test",
        "max_length": 300,
        "max_prompt_length": 100,
        "chat_template": False,
    },
    "reference": {"kind": "cached", "model": "ref/model", "cache_dir": "/tmp/cache"},
    "lora": {
        "r": 8,
        "alpha": 16.0,
        "dropout": 0.05,
        "target_modules": "q_proj,v_proj",
        "save": "adapter",
        "load_in_4bit": True,
    },
    "distributed": {"strategy": "fsdp2"},
    "generation": {
        "max_new_tokens": 32,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "stop": ["\n\n"],
        "backend": "vllm",
        "vllm_gpu_memory_utilization": 0.5,
        "batch_size": 32,
        "loop": "generate",
        "mask_truncated": True,
    },
    "rewards": [{"name": "numeric_answer", "weight": 1.0}],
    "max_steps": 12,
    "epochs": 2.5,
    "batch_size": 6,
    "micro_batch_size": 3,
    "learning_rate": 3e-6,
    "lr_scheduler": "linear",
    "warmup_ratio": 0.2,
    "weight_decay": 0.01,
    "adam_betas": [0.8, 0.95],
    "adam_eps": 1e-6,
    "max_grad_norm": None,
    "skip_nonfinite_steps": 3,
    "precision": "bf16",
    "seed": 3,
    "logps_chunk_size": 64,
    "gradient_checkpointing": True,
    "layout": "padded",
    "compile": False,
    "span_attention": "mask",
    "eval_steps": 5,
    "save_steps": 10,
    "keep_resumable": 2,
    "logging_steps": 2,
    "log_completions": 2,
    "report_to": ["posttrain.tracking:TensorBoardTracker"],
    "deterministic": True,
    "trust_remote_code": True,
}
HYPERPARAMETERS = {
    "dpo": {"beta": 0.2, "rpo_alpha": 0.5},
    "ipo": {"beta": 0.3, "length_normalize": True},
    "cdpo": {"beta": 0.4, "label_smoothing": 0.25},
    "robust_dpo": {"beta": 0.4, "label_smoothing": 0.2},
    "hinge": {"beta": 0.7},
    "simpo": {"beta": 2.5, "gamma": 0.5},
    "orpo": {"orpo_lambda": 0.2},
    "distill": {"beta": 0.05},
    "reward": {"center_coef": 0.01},
    "sft": {"completion_only": False, "packing": True},
    "grpo": {
        "num_generations": 4,
        "beta": 0.0,
        "epsilon_low": 0.2,
        "epsilon_high": 0.28,
        "scale_rewards": "none",
        "loss_aggregation": "dapo",
        "num_iterations": 2,
        "sequence_level_ratio": True,
        "dynamic_sampling": True,
        "max_resample": 5,
    },
    "dr_grpo": {
        "num_generations": 4,
        "beta": 0.02,
        "epsilon_low": 0.1,
        "epsilon_high": 0.15,
        "scale_rewards": "std",
        "loss_aggregation": "grpo",
        "num_iterations": 3,
        "sequence_level_ratio": False,
        "dynamic_sampling": True,
        "max_resample": 2,
    },
    "dapo": {
        "num_generations": 16,
        "beta": 0.01,
        "epsilon_low": 0.2,
        "epsilon_high": 0.3,
        "scale_rewards": "none",
        "loss_aggregation": "grpo",
        "num_iterations": 2,
        "sequence_level_ratio": True,
        "dynamic_sampling": False,
        "max_resample": 1,
        "overlong_buffer": 8,
        "overlong_penalty": 0.5,
    },
    "rloo": {"num_generations": 3, "beta": 0.1},
    "ppo": {
        "num_generations": 2,
        "beta": 0.1,
        "adaptive_kl": True,
        "kl_target": 3.0,
        "kl_gain": 0.2,
        "gamma": 0.99,
        "lam": 0.9,
        "epsilon": 0.1,
        "value_clip": 0.3,
        "vf_coef": 0.5,
        "ppo_epochs": 2,
        "num_mini_batches": 4,
        "whiten_advantages": False,
        "target_kl": 0.05,
        "critic_model": "runs/rm/model",
        "share_trunk": False,
        "critic_learning_rate": 1e-5,
        "critic_warmup_steps": 3,
    },
    "iterative_dpo": {
        "num_generations": 6,
        "beta": 0.2,
        "rounds": 3,
        "tie_threshold": 0.1,
        "loss": "ipo",
        "reference_update": "last",
        "steps_per_round": 1,
        "prompts_per_round": 12,
        "pairs_per_prompt": 3,
        "rpo_alpha": 0.0,  # > 0 needs loss: dpo (tests/test_iterative.py round-trips 1.0 through a run)
    },
    "kto": {"beta": 0.2, "desirable_weight": 1.33, "undesirable_weight": 2.0},
}


def test_every_method_is_covered() -> None:
    assert set(HYPERPARAMETERS) == set(ALGORITHMS)
    for name, cls in ALGORITHMS.items():
        assert set(HYPERPARAMETERS[name]) == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("method", sorted(HYPERPARAMETERS))
def test_to_dict_from_dict_round_trip(method: str, tmp_path: Path) -> None:
    given = {"method": method, **HYPERPARAMETERS[method], **FULL}
    if method in ("grpo", "dr_grpo", "dapo", "rloo", "ppo"):  # their reference scores their own samples
        given["reference"] = {**FULL["reference"], "kind": "copy"}
    config = from_dict(given)
    assert config.to_dict() == given  # every field, flat, in YAML types
    assert from_dict(config.to_dict()) == config
    path = tmp_path / "config.yaml"  # what a run writes next to its outputs
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert load(path) == config


def test_round_trip_of_defaults() -> None:
    config = load(raw(method="simpo"))
    assert from_dict(config.to_dict()) == config
    assert config.to_dict()["reference"] == {"kind": "copy", "model": None, "cache_dir": None}
    assert isinstance(config, TrainConfig)


def test_distributed_section() -> None:
    """`distributed:` defaults to ddp, takes fsdp2, and names the field and the choices otherwise."""
    assert load(raw()).distributed.strategy == "ddp"
    assert load(raw(distributed={"strategy": "fsdp2"})).distributed.strategy == "fsdp2"
    with pytest.raises(ConfigError, match=r"^distributed.strategy: must be one of ddp, fsdp2; got 'zero3'$"):
        load(raw(distributed={"strategy": "zero3"}))
    with pytest.raises(ConfigError, match=r"^distributed.stratgy: unknown key \(did you mean 'strategy'\?\)$"):
        load(raw(distributed={"stratgy": "ddp"}))
