"""The GPU performance patches (megatron_blackmamba/patches/performance.py) against what they
replace."""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba import patches
from megatron_blackmamba.model import token_order
from megatron_blackmamba.patches.performance import foreach_l2_norm, foreach_scale


def test_foreach_l2_norm_matches_float64():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g) for s in ((3, 4), (7,), (2, 2, 5))]
    norm, per_tensor = foreach_l2_norm(2048, None, [tensors], False)
    want = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]))
    assert per_tensor is None and norm.shape == (1,)
    assert abs(float(norm) - float(want)) <= 1e-6 * float(want)


@pytest.mark.parametrize("in_place", [False, True])
def test_foreach_scale_matches_reference(in_place: bool):
    g = torch.Generator().manual_seed(1)
    src = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    want = [t.double() * 0.37 for t in src]
    dst = src if in_place else [torch.empty(t.shape, dtype=torch.bfloat16) for t in src]
    foreach_scale(2048, None, [src, dst], 0.37)
    tol = 1e-6 if in_place else 1e-2  # bf16 destination rounds
    for got, ref in zip(dst, want):
        assert torch.allclose(got.double(), ref, rtol=tol, atol=0)


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("with_probs", [True, False])
def test_sync_free_permute_matches_megatron(topk: int, with_probs: bool):
    """Same permuted tokens, probs and indices as megatron's masked_select version, on fresh
    maps."""
    patches.apply()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    num_tokens, num_experts, hidden = 37, 8, 5
    tokens = torch.randn(num_tokens, hidden, generator=g)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    scores[:, 3] = -1.0  # an expert nobody chooses
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(
        1, scores.topk(topk, dim=1).indices, True
    )
    probs = torch.rand(num_tokens, num_experts, generator=g) * routing_map if with_probs else None
    size = num_tokens * topk
    got = token_order.permute_known_size(tokens, routing_map, probs, num_out_tokens=size)
    want = token_order.megatron_permute(tokens, routing_map, probs, num_out_tokens=size)
    for g_t, w_t in zip(got, want):
        if w_t is None:
            assert g_t is None
        else:
            assert torch.equal(g_t, w_t)


def test_permute_without_a_known_size_is_megatrons():
    patches.apply()
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert (
        moe_utils.permute is token_order.permute_known_size
        and token_dispatcher.permute is token_order.permute_known_size
    )
    routing_map = torch.eye(4, dtype=torch.bool)
    tokens = torch.arange(8.0).view(4, 2)
    for size in (None, torch.tensor(4)):  # megatron's path: masked_select
        out, _, idx = token_order.permute_known_size(tokens, routing_map, num_out_tokens=size)
        assert torch.equal(out, tokens) and torch.equal(idx, torch.arange(4))
