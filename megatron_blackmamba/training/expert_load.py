"""Per-layer expert load across the whole job: how many tokens each expert received.

The paper leaves open why late layers route less evenly; these numbers make that visible during
a run. Every rank counts the routing decisions of its own tokens (TP ranks hold disjoint sequence
slices, DP/EP ranks disjoint batches), so summing over all ranks that host a layer gives the
global count.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_blackmamba.model.router import BlackMambaRouter


def take_local_counts(model: list[torch.nn.Module]) -> dict[int, list[float]]:
    counts: dict[int, list[float]] = {}
    for chunk in model:
        for module in chunk.modules():
            if isinstance(module, BlackMambaRouter):
                counts[module.layer_number] = module.take_load_counts().tolist()
    return counts


def gather_expert_load(model: list[torch.nn.Module]) -> dict[int, list[float]]:
    """Collective; global per-layer counts (same dict on every rank)."""
    local = take_local_counts(model)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    total: dict[int, list[float]] = {}
    for per_rank in everyone:
        for layer, counts in per_rank.items():
            acc = total.setdefault(layer, [0.0] * len(counts))
            total[layer] = [a + c for a, c in zip(acc, counts)]
    return dict(sorted(total.items()))


def load_summary(counts: list[float]) -> dict[str, float]:
    """max/mean load (1.0 = perfectly balanced) and routing entropy normalised to [0, 1]."""
    total = sum(counts)
    if total == 0:
        return {"max_over_mean": 0.0, "entropy": 0.0}
    probs = [c / total for c in counts]
    entropy = -sum(p * math.log(p) for p in probs if p > 0) / math.log(len(counts))
    return {"max_over_mean": max(counts) / (total / len(counts)), "entropy": entropy}
