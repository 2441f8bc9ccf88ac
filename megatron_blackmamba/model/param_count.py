"""Total and active (per-token) parameter counts, from a model built on the meta device.

BlackMamba's names quote both: 340M active / 1.5B total means each token runs through one of
the eight experts. Counting on a meta-device model costs no memory, so the full paper configs
can be checked on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_blackmamba.config import JobConfig
from megatron_blackmamba.model.builder import build_model


@dataclass
class ParamCount:
    total: int
    active: int
    expert: int  # all experts' parameters

    def describe(self) -> str:
        return (
            f"{self.active / 1e6:.0f}M active / {self.total / 1e9:.2f}B total"
            f" ({self.expert / 1e9:.2f}B in experts)"
        )


def count_parameters(job: JobConfig) -> ParamCount:
    """Counts for the single-rank (unsharded) model; needs megatron's parallel state initialised."""
    with torch.device("meta"):
        model = build_model(job, pre_process=True, post_process=True)
    total = expert = 0
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied embedding / output weight
            continue
        seen.add(id(param))
        total += param.numel()
        if ".experts." in name:
            expert += param.numel()
    m = job.model
    active = total - expert + expert * m.moe_topk // m.num_experts
    return ParamCount(total=total, active=active, expert=expert)
