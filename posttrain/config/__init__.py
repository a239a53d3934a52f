"""Run configuration: YAML -> frozen, typed, validated dataclasses.

The schema (:mod:`posttrain.config.schema`: one place documents each field) and its reader
(:mod:`posttrain.config.loader`: YAML, ``--set`` overrides, the checks made when a file is read), exported
together: ``from posttrain.config import load, TrainConfig, ConfigError`` is the public way in.
"""

from posttrain.config.loader import (
    apply_overrides,
    check_models,
    check_rewards,
    from_dict,
    load,
    parse_override,
    read_yaml,
    section,
)
from posttrain.config.schema import (
    DataConfig,
    DistributedConfig,
    GenerationConfig,
    Layout,
    LoraConfig,
    LoraSave,
    Precision,
    ReferenceConfig,
    ReferenceKind,
    Scheduler,
    SpanKernel,
    Strategy,
    TrainConfig,
)
from posttrain.errors import ConfigError, check
from posttrain.fields import PathStr

__all__ = [
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "GenerationConfig",
    "Layout",
    "LoraConfig",
    "LoraSave",
    "PathStr",
    "Precision",
    "ReferenceConfig",
    "ReferenceKind",
    "Scheduler",
    "SpanKernel",
    "Strategy",
    "TrainConfig",
    "apply_overrides",
    "check",
    "check_models",
    "check_rewards",
    "from_dict",
    "load",
    "parse_override",
    "read_yaml",
    "section",
]
