"""FusedGLUGroupedMLP (model/experts.py) against megatron's GroupedMLP with the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.experts import GroupedMLP

from megatron_blackmamba import patches
from megatron_blackmamba.config import load_config
from megatron_blackmamba.model.builder import transformer_config
from megatron_blackmamba.model.experts import FusedGLUGroupedMLP
from megatron_blackmamba.model.spec import blackmamba_stack_spec

E, H, FFN = 4, 32, 48


def _config(activation: str):
    job = load_config(
        None,
        [
            f"model.hidden_size={H}",
            f"model.ffn_hidden_size={FFN}",
            f"model.num_experts={E}",
            f"model.activation={activation}",
            "training.precision=bf16",
        ],
    )
    return transformer_config(job)


@pytest.mark.parametrize("activation", ["geglu", "swiglu"])
def test_fused_matches_grouped_mlp_and_float64(single_rank, activation: str):
    patches.apply()
    config = _config(activation)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    plain, fused = (
        GroupedMLP(E, config, pg_collection=pgs),
        FusedGLUGroupedMLP(E, config, pg_collection=pgs),
    )
    fused.load_state_dict(plain.state_dict())
    device = plain.weight1.device  # the GPU when there is one: then the Triton kernels run
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, H, generator=g).bfloat16().to(device)
    probs = torch.rand(40, generator=g).to(device)
    dy = torch.randn(40, H, generator=g).bfloat16().to(device)
    sizes = torch.tensor([12, 0, 20, 8])

    outputs = []
    for module in (plain, fused):
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        out, _ = module(xi, sizes, pi)
        out.backward(dy)
        outputs.append((out, xi.grad, pi.grad, module.weight1.grad, module.weight2.grad))

    # float64 of the same math: per-expert GEMMs around act(gate) * value * prob.
    act = F.silu if activation == "swiglu" else F.gelu
    x64, p64 = x.double().requires_grad_(), probs.double().requires_grad_()
    w1 = plain.weight1.detach().double().view(E, H, 2 * FFN).requires_grad_()
    w2 = plain.weight2.detach().double().view(E, FFN, H).requires_grad_()
    parts = []
    for e, (rows, p) in enumerate(
        zip(torch.split(x64, sizes.tolist()), torch.split(p64, sizes.tolist()))
    ):
        gate, value = (rows @ w1[e]).chunk(2, dim=-1)
        parts.append((act(gate) * value * p[:, None]) @ w2[e])
    want = torch.cat(parts)
    want.backward(dy.double())
    wants = (want.detach(), x64.grad, p64.grad, w1.grad.view(H, -1), w2.grad.view(-1, H))

    for got_plain, got_fused, ref in zip(*outputs, wants):
        scale = torch.linalg.norm(ref)
        assert torch.linalg.norm(got_fused.double() - ref) <= 2e-2 * scale
        assert torch.linalg.norm(got_fused.double() - got_plain.double()) <= 2e-2 * scale


@pytest.mark.parametrize("fused_glu,expected", [(True, FusedGLUGroupedMLP), (False, GroupedMLP)])
def test_spec_picks_the_experts_module(fused_glu: bool, expected: type):
    job = load_config(
        None, ["model.moe_grouped_gemm=true", f"model.fused_glu={str(fused_glu).lower()}"]
    )
    spec = blackmamba_stack_spec(job.model, use_te=False)
    assert spec.submodules.moe_layer.submodules.mlp.submodules.experts.module is expected
