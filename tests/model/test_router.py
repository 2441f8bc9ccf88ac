"""BlackMambaRouter's gating: bf16 models take kernels/router_gating, with megatron's logits."""

from __future__ import annotations

import math

import pytest
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


def _router(capacity: str | None):
    overrides = ["model.hidden_size=32", "model.ffn_hidden_size=48", "model.num_experts=4"]
    if capacity:
        overrides.append(f"parallel.moe_capacity_factor={capacity}")
    return build_moe(load_config(None, overrides), local=False).router


def test_capacity_drops_exactly_the_overflow_and_counts_it(single_rank):
    """Fresh logits: each expert keeps its ceil(T / E * factor) most probable tokens; the router
    counts every other (token, expert) pair as dropped, and the routed counts add up."""
    patches.apply()
    dropless, capped = _router(None), _router("0.5")
    capped.load_state_dict(dropless.state_dict())
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    logits = torch.randn(40, 4, generator=g) * 3  # uneven on purpose
    for router in (dropless, capped):
        router.train()
        router.take_load()
    _, wanted = dropless.routing(logits.view(40, 1, 4))
    probs, kept = capped.routing(logits.view(40, 1, 4))
    capacity = math.ceil(40 / 4 * 0.5)
    overflow = sum(max(0, int(n) - capacity) for n in wanted.sum(dim=0))
    assert overflow > 0  # the test drops something
    assert bool((kept <= wanted).all()) and int(kept.sum()) == 40 - overflow
    assert bool((kept.sum(dim=0) <= capacity).all()) and bool((probs[~kept] == 0).all())
    routed, dropped = capped.take_load()
    assert float(dropped) == overflow and routed.tolist() == kept.sum(dim=0).double().tolist()
    routed, dropped = dropless.take_load()
    assert float(dropped) == 0 and float(routed.sum()) == 40


def test_local_dispatcher_refuses_a_capacity_factor():
    from megatron_blackmamba.model.builder import moe_dispatcher

    job = load_config(None, ["parallel.moe_capacity_factor=1.25"])
    assert moe_dispatcher(job) in ("allgather", "alltoall")
    with pytest.raises(ValueError, match="moe_dispatcher=local is dropless"):
        load_config(None, ["parallel.moe_capacity_factor=1.25", "parallel.moe_dispatcher=local"])
    with pytest.raises(ValueError, match="moe_capacity_factor=-1.0 must be > 0"):
        load_config(None, ["parallel.moe_capacity_factor=-1"])
