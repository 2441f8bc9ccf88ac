"""BlackMambaRouter's gating: bf16 models take kernels/router_gating, with megatron's logits."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_blackmamba import patches
from megatron_blackmamba.config import load_config
from megatron_blackmamba.kernels import router_gating
from tests.model.test_local_dispatcher import build_moe


def test_blackmamba_router_uses_it_and_agrees_with_megatrons_gating(single_rank):
    patches.apply()
    job = load_config(
        None,
        [
            "model.hidden_size=32",
            "model.ffn_hidden_size=48",
            "model.num_experts=4",
            "model.router_bias=true",
            "training.precision=bf16",
        ],
    )
    router = build_moe(job, local=True).router
    with torch.no_grad():
        router.bias.normal_()
    x = torch.randn(24, 3, 32).to(router.weight.device, torch.bfloat16)
    assert router_gating.applies(x, router.weight)  # the tensor-core path, not megatron's
    ours, theirs = router.gating(x), TopKRouter.gating(router, x)
    assert ours.shape == theirs.shape == (24, 3, 4) and ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
