"""The sync-free local token dispatcher against megatron's allgather dispatcher, same weights.

Both permute the tokens expert by expert, run the same experts and unpermute, so outputs and
every gradient must agree to rounding (fp32 for per-expert MLPs, bf16 for megatron's bf16-only
GroupedMLP; observed: bit-identical) on fresh random inputs, in training (Sinkhorn) and eval
(top-1) routing.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import build_module

from megatron_blackmamba import patches
from megatron_blackmamba.config import load_config
from megatron_blackmamba.model.builder import (
    moe_dispatcher,
    resolve_moe_dispatcher,
    transformer_config,
)
from megatron_blackmamba.model.local_dispatcher import LocalDispatchMoELayer, LocalTokenDispatcher
from megatron_blackmamba.model.norm import RMSNorm
from megatron_blackmamba.model.spec import moe_layer_spec

SMALL_MOE = ["model.hidden_size=32", "model.ffn_hidden_size=48", "model.num_experts=4"]


def build_moe(job, local: bool) -> MoELayer:
    spec = moe_layer_spec(
        job.model, LocalSpecProvider(), RMSNorm, local_dispatch=local
    ).submodules.mlp
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    layer = build_module(spec, config=transformer_config(job), layer_number=1, pg_collection=pgs)
    return layer.to("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "topk", [1, 2]
)  # 1: the invertible-permutation path; 2: megatron's unpermute
def test_local_dispatcher_matches_megatron_allgather(
    single_rank, grouped: bool, training: bool, topk: int
):
    patches.apply()
    job = load_config(
        None,
        SMALL_MOE
        + [
            f"model.moe_topk={topk}",
            f"model.moe_grouped_gemm={str(grouped).lower()}",
            # megatron's GroupedMLP runs only in bf16
            f"training.precision={'bf16' if grouped else 'fp32'}",
            "parallel.moe_dispatcher=allgather",
        ],
    )
    reference = build_moe(job, local=False)
    local = build_moe(job, local=True)
    assert type(local) is LocalDispatchMoELayer and isinstance(
        local.token_dispatcher, LocalTokenDispatcher
    )
    local.load_state_dict(reference.state_dict())
    reference.train(training)
    local.train(training)

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    dtype = torch.bfloat16 if grouped else torch.float32
    device = next(reference.parameters()).device  # the GPU, where there is one
    x = torch.randn(24, 3, 32, generator=g).to(device, dtype)
    upstream = torch.randn(24, 3, 32, generator=g).to(device, dtype)
    results = []
    for layer in (reference, local):
        inp = x.clone().requires_grad_(True)
        out, bias = layer(inp)
        assert bias is None
        (out * upstream).sum().backward()
        results.append((out.detach(), inp.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (out_ref, dx_ref, grads_ref), (out_loc, dx_loc, grads_loc) = results
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else {}  # {}: torch's bf16 defaults
    torch.testing.assert_close(out_loc, out_ref, **tol)
    torch.testing.assert_close(dx_loc, dx_ref, **tol)
    assert grads_ref.keys() == grads_loc.keys()
    for name, grad in grads_ref.items():
        if grad is None:  # an expert no token chose in this draw
            assert grads_loc[name] is None, name
        else:
            torch.testing.assert_close(grads_loc[name], grad, **tol, msg=name)


def test_dispatcher_resolution():
    assert resolve_moe_dispatcher("auto", experts_local=True) == "local"
    assert resolve_moe_dispatcher("auto", experts_local=False) in ("alltoall", "allgather")
    assert resolve_moe_dispatcher("allgather", experts_local=True) == "allgather"
    with pytest.raises(ValueError, match="ep=1 and tp=1"):
        resolve_moe_dispatcher("local", experts_local=False)
    with pytest.raises(ValueError, match="choose auto"):
        resolve_moe_dispatcher("scatter", experts_local=True)
    assert moe_dispatcher(load_config(None, ["parallel.ep=1"])) == "local"
    assert moe_dispatcher(load_config(None, ["parallel.ep=2"])) != "local"


@pytest.mark.parametrize("tokens", [(1, 5), (1, 64), (3, 40)])
def test_inference_calls_of_few_tokens_skip_the_dispatcher(single_rank, monkeypatch, tokens):
    """At most MAX_TOKENS tokens under no_grad in eval (decode steps): each token goes straight to
    its expert (kernels/top1_experts), equal to the dispatcher path and counted the same; more
    tokens, training or autograd take the dispatcher."""
    patches.apply()
    job = load_config(None, SMALL_MOE + ["model.moe_grouped_gemm=true", "training.precision=bf16"])
    layer = build_moe(job, local=True).eval()
    assert layer._direct_activation == "gelu"
    device = next(layer.parameters()).device
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(*tokens, 32, generator=g).to(device, torch.bfloat16)
    dispatch = layer.token_dispatcher.dispatch_preprocess
    calls = []
    monkeypatch.setattr(
        layer.token_dispatcher,
        "dispatch_preprocess",
        lambda *args: calls.append(1) or dispatch(*args),
    )
    with torch.no_grad():
        direct, bias = layer(x)
        direct_load, _ = layer.router.take_load()
        via_dispatcher, _ = MoELayer.forward(layer, x)
        dispatcher_load, _ = layer.router.take_load()
    direct_taken = tokens[0] * tokens[1] <= 64
    assert bias is None and len(calls) == (1 if direct_taken else 2)
    torch.testing.assert_close(direct, via_dispatcher)  # torch's bf16 tolerances
    torch.testing.assert_close(direct_load, dispatcher_load, rtol=0, atol=0)
    assert float(direct_load.sum()) == tokens[0] * tokens[1]
    layer(x.requires_grad_(True))  # autograd on: the dispatcher again
    assert len(calls) == (2 if direct_taken else 3)
