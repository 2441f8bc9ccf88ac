"""Sharded, atomic, layout-free checkpoints (megatron dist_checkpointing, torch_dist format)."""

from megatron_blackmamba.checkpointing.store import (
    CheckpointError,
    checkpoint_config,
    checkpoint_tokenizer,
    find_resumable,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "checkpoint_config",
    "checkpoint_tokenizer",
    "find_resumable",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]
