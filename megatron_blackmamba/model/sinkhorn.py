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
    row_max = logits.amax(dim=1, keepdim=True).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    return torch.exp(temperature * (logits - row_max))


def _initial_d1(cost: torch.Tensor, init: str) -> torch.Tensor:
    if init not in INITS:
        raise ValueError(f"sinkhorn init {init!r} unknown; choose one of {INITS}")
    if init == "paper":
        return 1.0 / (cost.shape[1] * cost.sum(0) + torch.finfo(cost.dtype).tiny)
    return torch.ones(cost.shape[1], dtype=cost.dtype, device=cost.device)


def _row_scale(cost: torch.Tensor, d1: torch.Tensor, row_mass: torch.Tensor | None = None) -> torch.Tensor:
    """d0 that gives every token (row) mass 1/T for column scaling d1 (``row_mass`` = cost @ d1)."""
    if row_mass is None:
        row_mass = cost @ d1
    return (1.0 / cost.shape[0]) / (row_mass + torch.finfo(cost.dtype).tiny)


def _col_scale(cost: torch.Tensor, d0: torch.Tensor) -> torch.Tensor:
    """d1 that gives every expert (column) mass 1/E for row scaling d0."""
    return (1.0 / cost.shape[1]) / (d0 @ cost + torch.finfo(cost.dtype).tiny)


def sinkhorn_steps(cost: torch.Tensor, init: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (d0, d1) after each full iteration, forever; callers decide when to stop."""
    d1 = _initial_d1(cost, init)
    while True:
        d0 = _row_scale(cost, d1)
        d1 = _col_scale(cost, d0)
        yield d0, d1


def row_marginal_error(plan: torch.Tensor) -> float:
    """max_i |T * rowsum_i - 1|: 0 for a perfectly balanced plan (rows of zeros excepted)."""
    rows = plan.sum(1)
    err = (rows * plan.shape[0] - 1).abs().masked_fill(rows <= 0, 0.0)
    return float(err.max()) if err.numel() else 0.0


@torch.no_grad()
def sinkhorn(
    logits: torch.Tensor,
    temperature: float = 2.0,
    init: str = "paper",
    tol: float = 1e-2,
    max_iters: int = 20,
) -> SinkhornResult:
    """Balanced plan for (T, E) router logits; runs at least one and at most ``max_iters`` iterations.

    Same iterates as ``sinkhorn_steps``, arranged so the stopping test costs no extra pass: after
    iteration k, T * rowsum_i of the plan (d0_k, d1_k) equals d0_k,i / d0_k+1,i, and d0_k+1 is
    the next iteration's first half anyway. One host sync per iteration (the test itself).
    """
    if max_iters < 1:
        raise ValueError("sinkhorn max_iters must be >= 1")
    cost = stable_cost(logits.to(torch.float32 if logits.dtype != torch.float64 else torch.float64), temperature)
    d0 = _row_scale(cost, _initial_d1(cost, init))
    for iterations in range(1, max_iters + 1):
        d1 = _col_scale(cost, d0)
        row_mass = cost @ d1
        d0_next = _row_scale(cost, d1, row_mass)
        err = float((d0 / d0_next - 1).abs().masked_fill(row_mass <= 0, 0.0).max()) if d0.numel() else 0.0
        if err < tol or iterations == max_iters:
            return SinkhornResult(plan=d0.unsqueeze(1) * cost * d1, iterations=iterations, row_error=err)
        d0 = d0_next
    raise AssertionError("unreachable")
