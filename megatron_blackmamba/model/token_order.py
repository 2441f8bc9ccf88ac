"""megatron's dropless token permutation without a host sync.

megatron's ``moe_utils.permute`` finds each expert's tokens with ``masked_select``, whose output
size is data dependent, so the host waits for the GPU. A dropless dispatcher knows that size
(tokens x top-k), and ``torch.nonzero_static`` with it yields the same indices in the same order
without waiting. The patch ``moe_utils.permute->nonzero_static`` (megatron_blackmamba/patches)
installs :func:`permute_known_size` in megatron; the local dispatcher calls :func:`dropless_order`.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import permute as megatron_permute


def dropless_order(
    routing_map: torch.Tensor, num_out_tokens: int, probs: torch.Tensor | None = None
):
    """(token index [num_out_tokens] int64, its prob [num_out_tokens] or None) of every routed
    (token, expert) pair of ``routing_map`` [tokens, experts] bool, expert by expert and tokens in
    order within an expert: megatron's permute order."""
    num_tokens = routing_map.shape[0]
    # Row-major nonzeros of the [experts, tokens] mask, exactly what megatron's masked_select
    # yields.
    mask = routing_map.bool().T.contiguous().view(-1)
    flat = torch.nonzero_static(mask, size=num_out_tokens).view(-1)
    permuted_probs = None if probs is None else probs.T.contiguous().view(-1).index_select(0, flat)
    return flat % num_tokens, permuted_probs


def permute_known_size(
    tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False
):
    """megatron's ``permute`` (same signature and results) without a host sync when the dropless
    output size ``num_out_tokens`` is a Python int; any other call goes to megatron's own."""
    if fused or drop_and_pad or not isinstance(num_out_tokens, int):
        return megatron_permute(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad)
    sorted_indices, permuted_probs = dropless_order(routing_map, num_out_tokens, probs)
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices
