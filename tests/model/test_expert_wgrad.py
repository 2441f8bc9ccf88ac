"""training.fused_wgrad_accumulation under megatron's DDP: the grouped experts' GEMMs sum their
weight gradients into the fp32 main grads; every gradient must match DDP adding bf16 gradients."""

from __future__ import annotations

import torch

from megatron_blackmamba.config import load_config
from megatron_blackmamba.training.setup import build_ddp_model
from megatron_blackmamba.training.step import forward_backward
from tests.parallel.workers import TINY, make_microbatches

MICRO_BATCHES = 3


def _main_grads(fused: bool, weights: dict | None) -> tuple[dict, dict]:
    job = load_config(
        None,
        TINY
        + [
            "training.precision=bf16",
            "model.moe_grouped_gemm=true",
            f"training.fused_wgrad_accumulation={str(fused).lower()}",
        ],
    )
    (model,) = build_ddp_model(job)
    if weights is not None:
        model.module.load_state_dict(weights)
    model.zero_grad_buffer()
    t = job.training
    batches = make_microbatches(
        MICRO_BATCHES, t.micro_batch_size, t.seq_length, job.model.vocab_size
    )
    forward_backward([model], iter(batches), MICRO_BATCHES, t.seq_length, t.micro_batch_size)
    grads = {name: p.main_grad.detach().clone() for name, p in model.module.named_parameters()}
    return model.module.state_dict(), grads


def test_fused_expert_wgrad_matches_ddp_accumulation(single_rank):
    weights, unfused = _main_grads(False, None)
    _, fused = _main_grads(True, weights)
    experts = {name for name in fused if ".experts.weight" in name}
    assert experts
    for name, grad in fused.items():
        if name in experts:
            # unfused: each micro-batch's gradient rounded to bf16 before DDP adds it; fused sums
            # stay fp32, so they differ (the fused path ran) by about one bf16 rounding
            torch.testing.assert_close(grad, unfused[name], rtol=2e-2, atol=1e-3, msg=name)
            assert torch.count_nonzero(grad) > 0 and not torch.equal(grad, unfused[name])
        else:
            torch.testing.assert_close(grad, unfused[name], rtol=0, atol=0, msg=name)
