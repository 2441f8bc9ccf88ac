"""Sinkhorn token->expert balancing with BlackMamba's initialisation.

Sinkhorn rescales the cost matrix ``exp(temperature * logits)`` (tokens x experts) by a row vector
d0 and a column vector d1 until every token carries mass 1/T and every expert 1/E; the top-1
expert of the balanced plan is the token's expert during training.

Initialisation. megatron-core (and Switch-style code) starts from d1 = 1. BlackMamba's released
code starts from d1 = 1 / (E * column sums of the cost), i.e. each expert's column is already
softmax-normalised over the tokens, so the first row update lands close to the balanced plan.

Stopping rule. The released code stops when mean |d1 - d1_old| < tol. That number depends on the
*scale* of d1, which the initialisation itself changes by a factor of ~T*E, so it is not a fair
yardstick between initialisations. Here the loop stops on a scale-free quantity: the largest
relative error of the token marginals, max_i |T * rowsum_i - 1| (one pass over a T x E plan). Both rules are measured side by side in tests/model/test_sinkhorn.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

INITS = ("paper", "uniform")


@dataclass
class SinkhornResult:
    plan: torch.Tensor  # (T, E) balanced transport plan, fp32 or fp64
    iterations: int
    row_error: float  # max_i |T * rowsum_i - 1| of the returned plan


def stable_cost(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(temperature * logits) with each row shifted by its max.

    A per-token constant factor is absorbed by d0, so the plan is unchanged, but huge logits no
    longer overflow; rows that are all -inf become all-zero rows instead of NaN.
    """
    row_max = logits.amax(dim=1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return torch.exp(temperature * (logits - row_max))


def sinkhorn_steps(cost: torch.Tensor, init: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (d0, d1) after each full iteration, forever; callers decide when to stop."""
    if init not in INITS:
        raise ValueError(f"sinkhorn init {init!r} unknown; choose one of {INITS}")
    num_tokens, num_experts = cost.shape
    tiny = torch.finfo(cost.dtype).tiny
    if init == "paper":
        d1 = 1.0 / (num_experts * cost.sum(0) + tiny)
    else:
        d1 = torch.ones(num_experts, dtype=cost.dtype, device=cost.device)
    while True:
        d0 = (1.0 / num_tokens) / (cost @ d1 + tiny)
        d1 = (1.0 / num_experts) / (d0 @ cost + tiny)
        yield d0, d1


def row_marginal_error(plan: torch.Tensor) -> float:
    """max_i |T * rowsum_i - 1|: 0 for a perfectly balanced plan (rows of zeros excepted)."""
    rows = plan.sum(1)
    live = rows > 0
    return float((rows[live] * plan.shape[0] - 1).abs().max()) if live.any() else 0.0


@torch.no_grad()
def sinkhorn(
    logits: torch.Tensor,
    temperature: float = 2.0,
    init: str = "paper",
    tol: float = 1e-2,
    max_iters: int = 20,
) -> SinkhornResult:
    """Balanced plan for (T, E) router logits; runs at least one and at most ``max_iters`` iterations."""
    if max_iters < 1:
        raise ValueError("sinkhorn max_iters must be >= 1")
    cost = stable_cost(logits.to(torch.float32 if logits.dtype != torch.float64 else torch.float64), temperature)
    for iterations, (d0, d1) in enumerate(sinkhorn_steps(cost, init), start=1):
        plan = d0.unsqueeze(1) * cost * d1
        err = row_marginal_error(plan)
        if err < tol or iterations >= max_iters:
            return SinkhornResult(plan=plan, iterations=iterations, row_error=err)
    raise AssertionError("unreachable")
