"""Checkpoint layout helper for fused projections whose TP shards interleave logical tensors.

A column-parallel in_proj producing [x; z] holds rows [x_r; z_r] on TP rank r, which is not a
contiguous slice of the global [x; z]. Saving it as one ShardedTensor would bake the TP size into
the checkpoint. Instead each logical part is saved as its own TP-sharded tensor (``key.x``,
``key.z``), so the checkpoint is layout-free and loads at any TP size.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def split_into_logical_parts(
    sharded: ShardedTensor, sizes: Sequence[int], names: Sequence[str], dim: int = 0
) -> ShardedTensorFactory:
    """Save ``sharded`` as consecutive local chunks ``sizes`` along ``dim``, named
    ``key.<name>``."""
    if sum(sizes) != sharded.local_shape[dim] or len(sizes) != len(names):
        raise ValueError(
            f"{sharded.key}: parts {list(zip(names, sizes))} do not tile local dim {dim}"
        )
    template = sharded.without_data()

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        whole = replace(
            template,
            key=key,
            data=data,
            dtype=data.dtype,
            replica_id=replica_id,
            flattened_range=flattened_range,
        )
        parts, start = [], 0
        for size, name in zip(sizes, names):
            for piece in whole.narrow(dim, start, size):
                piece.key = f"{key}.{name}"
                parts.append(piece)
            start += size
        return parts

    @torch.no_grad()
    def merge(loaded):
        return torch.cat(loaded)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)
