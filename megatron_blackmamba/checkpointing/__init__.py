"""Sharded, atomic, layout-free checkpoints (megatron dist_checkpointing, torch_dist format)."""

from megatron_blackmamba.checkpointing.store import (
    CheckpointError,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["CheckpointError", "find_resumable", "load_checkpoint", "save_checkpoint"]
