"""One config object for a whole job: model, parallelism, training, data, checkpoints, logging.

Configs are plain YAML files whose top-level keys are the sections of ``JobConfig``; any field can
be overridden on the command line as ``section.field=value``. Every field has a type, a default
and a one-line help string (``blackmamba-train --help-config`` prints them); values are parsed
and checked when the config is loaded (``loader``, ``checks``), before anything expensive starts.
"""

from megatron_blackmamba.config.checks import CheckResult, check_job
from megatron_blackmamba.config.loader import (
    ConfigError,
    apply_dict,
    describe,
    load_config,
    parse_override,
    resolve_config_path,
    to_yaml,
)
from megatron_blackmamba.config.schema import (
    CheckpointConfig,
    DataConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
)

__all__ = [
    "CheckResult",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "JobConfig",
    "LoggingConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainingConfig",
    "apply_dict",
    "check_job",
    "describe",
    "load_config",
    "parse_override",
    "resolve_config_path",
    "to_yaml",
]
