"""compat.py's replacements for megatron's local multi-tensor fallbacks, and GroupedMLP on gmm."""

from __future__ import annotations

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_blackmamba import compat
from megatron_blackmamba.config import load_config
from megatron_blackmamba.model.builder import transformer_config


def test_foreach_l2_norm_matches_float64():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g) for s in ((3, 4), (7,), (2, 2, 5))]
    norm, per_tensor = compat._foreach_l2_norm(2048, None, [tensors], False)
    want = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]))
    assert per_tensor is None and norm.shape == (1,)
    assert abs(float(norm) - float(want)) <= 1e-6 * float(want)


@pytest.mark.parametrize("in_place", [False, True])
def test_foreach_scale_matches_reference(in_place: bool):
    g = torch.Generator().manual_seed(1)
    src = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    want = [t.double() * 0.37 for t in src]
    dst = src if in_place else [torch.empty(t.shape, dtype=torch.bfloat16) for t in src]
    compat._foreach_scale(2048, None, [src, dst], 0.37)
    tol = 1e-6 if in_place else 1e-2  # bf16 destination rounds
    for got, ref in zip(dst, want):
        assert torch.allclose(got.double(), ref, rtol=tol, atol=0)


def _experts(grouped: bool, num_experts: int, hidden: int, ffn: int):
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP

    job = load_config(None, [f"model.hidden_size={hidden}", f"model.ffn_hidden_size={ffn}",
                             f"model.num_experts={num_experts}", "model.activation=geglu", "training.precision=bf16"])
    config = transformer_config(job)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    if grouped:
        return GroupedMLP(num_experts, config, pg_collection=pgs)
    spec = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=num_experts, moe_grouped_gemm=False)
    return SequentialMLP(num_experts, config, spec.submodules.experts.submodules, pg_collection=pgs)


def test_grouped_mlp_on_gmm_matches_sequential_mlp_and_float64(single_rank):
    """megatron's GroupedMLP (bf16 only) through kernels/grouped_gemm vs SequentialMLP, same weights."""
    compat.apply()
    E, h, f, T = 4, 32, 48, 40
    seq, grp = _experts(False, E, h, f), _experts(True, E, h, f)
    with torch.no_grad():  # GroupedMLP stores expert e's fc1 as weight1.view(E, h, 2f)[e] = fc1.weight.T
        grp.weight1.view(E, h, 2 * f).copy_(torch.stack([e.linear_fc1.weight.t() for e in seq.local_experts]))
        grp.weight2.view(E, f, h).copy_(torch.stack([e.linear_fc2.weight.t() for e in seq.local_experts]))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, h, generator=g).bfloat16()
    probs = torch.rand(T, generator=g)
    x, probs = x.to(grp.weight1.device), probs.to(grp.weight1.device)  # weights are on the GPU when there is one
    sizes = torch.tensor([12, 0, 20, 8])

    def ref64() -> torch.Tensor:
        out = []
        for e, rows in enumerate(torch.split(x.double(), sizes.tolist())):
            w1, w2 = seq.local_experts[e].linear_fc1.weight.double(), seq.local_experts[e].linear_fc2.weight.double()
            gate, up = (rows @ w1.t()).chunk(2, dim=-1)
            out.append((torch.nn.functional.gelu(gate) * up) @ w2.t())
        return torch.cat(out) * probs.double()[:, None]

    want = ref64()
    got_seq, _ = seq(x, sizes, probs)
    got_grp, _ = grp(x, sizes, probs)
    for got in (got_seq, got_grp):
        assert torch.linalg.norm(got.double() - want) <= 2e-2 * torch.linalg.norm(want)
    assert torch.linalg.norm(got_grp.double() - got_seq.double()) <= 2e-2 * torch.linalg.norm(want)


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("with_probs", [True, False])
def test_sync_free_permute_matches_megatron(topk: int, with_probs: bool):
    """Same permuted tokens, probs and indices as megatron's masked_select version, on fresh maps."""
    compat.apply()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    num_tokens, num_experts, hidden = 37, 8, 5
    tokens = torch.randn(num_tokens, hidden, generator=g)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    scores[:, 3] = -1.0  # an expert nobody chooses
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, scores.topk(topk, dim=1).indices, True)
    probs = torch.rand(num_tokens, num_experts, generator=g) * routing_map if with_probs else None
    size = num_tokens * topk
    got = compat.permute_known_size(tokens, routing_map, probs, num_out_tokens=size)
    want = compat._MEGATRON_PERMUTE(tokens, routing_map, probs, num_out_tokens=size)
    for g_t, w_t in zip(got, want):
        if w_t is None:
            assert g_t is None
        else:
            assert torch.equal(g_t, w_t)


def test_permute_without_a_known_size_is_megatrons():
    compat.apply()
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert moe_utils.permute is compat.permute_known_size and token_dispatcher.permute is compat.permute_known_size
    routing_map = torch.eye(4, dtype=torch.bool)
    tokens = torch.arange(8.0).view(4, 2)
    for size in (None, torch.tensor(4)):  # megatron's path: masked_select
        out, _, idx = compat.permute_known_size(tokens, routing_map, num_out_tokens=size)
        assert torch.equal(out, tokens) and torch.equal(idx, torch.arange(4))
