"""Rank body for the multi-rank interop test (importable, so spawned processes can run it)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_blackmamba.checkpointing import load_checkpoint
from megatron_blackmamba.config import load_config
from megatron_blackmamba.model.builder import build_model
from megatron_blackmamba.parallel.setup import destroy, init_distributed


def forward_at_layout(
    ckpt: str, config: str, layout: list[str], tokens_path: str, out_path: str
) -> None:
    """Load ``ckpt`` at ``layout`` (no pipeline split), run an eval forward; rank 0 saves the
    logits."""
    job = load_config(config, ["training.precision=fp32", *layout])
    init_distributed(job.parallel, seed=0)
    try:
        model = build_model(job)
        load_checkpoint(ckpt, [model])
        model.eval()
        with torch.no_grad():
            logits = model(torch.load(tokens_path), None, None, runtime_gather_output=True)
        if torch.distributed.get_rank() == 0:
            torch.save(
                {
                    "logits": logits,
                    "tp": parallel_state.get_tensor_model_parallel_world_size(),
                    "ep": parallel_state.get_expert_model_parallel_world_size(),
                    "etp": parallel_state.get_expert_tensor_parallel_world_size(),
                },
                out_path,
            )
    finally:
        destroy()
