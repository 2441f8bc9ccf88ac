"""Per-layer expert load across the whole job: how many tokens each expert received.

The paper leaves open why late layers route less evenly; these numbers make that visible during
a run. Every rank counts the routing decisions of its own tokens (TP ranks hold disjoint sequence
slices, DP/EP ranks disjoint batches), so summing over all ranks that host a layer gives the
global count.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch
import torch.distributed as dist

from megatron_blackmamba.model.router import BlackMambaRouter


class LayerLoad(TypedDict):
    """One MoE layer's load, plain floats so it pickles and gathers as is."""

    routed: list[float]  # tokens per expert
    dropped: float  # (token, expert) pairs dropped for capacity


def take_local_counts(model: list[torch.nn.Module]) -> dict[int, LayerLoad]:
    counts: dict[int, LayerLoad] = {}
    for chunk in model:
        for module in chunk.modules():
            if isinstance(module, BlackMambaRouter):
                routed, dropped = module.take_load()
                counts[module.layer_number] = {"routed": routed.tolist(), "dropped": float(dropped)}
    return counts


def gather_expert_load(model: list[torch.nn.Module]) -> dict[int, LayerLoad]:
    """Collective; global per-layer loads (same dict on every rank)."""
    local = take_local_counts(model)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    total: dict[int, LayerLoad] = {}
    for per_rank in everyone:
        for layer, load in per_rank.items():
            acc = total.setdefault(layer, {"routed": [0.0] * len(load["routed"]), "dropped": 0.0})
            acc["routed"] = [a + c for a, c in zip(acc["routed"], load["routed"])]
            acc["dropped"] += load["dropped"]
    return dict(sorted(total.items()))


def load_summary(load: LayerLoad) -> dict[str, float]:
    """max/mean load (1.0 = perfectly balanced), routing entropy normalised to [0, 1], and the
    fraction of (token, expert) pairs dropped for capacity (0 when dropless)."""
    counts = load["routed"]
    total = sum(counts)
    wanted = total + load["dropped"]
    dropped_fraction = load["dropped"] / wanted if wanted else 0.0
    if total == 0:
        return {"max_over_mean": 0.0, "entropy": 0.0, "dropped_fraction": dropped_fraction}
    probs = [c / total for c in counts]
    entropy = -sum(p * math.log(p) for p in probs if p > 0) / math.log(len(counts))
    return {
        "max_over_mean": max(counts) / (total / len(counts)),
        "entropy": entropy,
        "dropped_fraction": dropped_fraction,
    }
