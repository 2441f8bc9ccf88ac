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
relative error of the token marginals, max_i |T * rowsum_i - 1| (one pass over a T x E plan).
Both rules are measured side by side in tests/model/test_sinkhorn.py.

No host syncs. Reading the stopping test back to the host would drain the CUDA queue once per
iteration (6-20 times per MoE layer per forward) and leave GPU training host-bound, so the loop
keeps its "converged" flag on the device and freezes the iterates once it is set: the plan is
bit-identical to stopping at the first iteration whose error < tol, at the price of always
running max_iters iterations of small device ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from megatron_blackmamba.config import ModelConfig
from megatron_blackmamba.cuda_graph import capture
from megatron_blackmamba.kernels.triton_support import triton_kernels

INITS = ("paper", "uniform")


@dataclass
class SinkhornResult:
    """``iterations`` and ``row_error`` are 0-d tensors on the plan's device: reading them (int(),
    float(), .item()) syncs with the device, so only tests and logging should."""

    plan: torch.Tensor  # (T, E) balanced transport plan, fp32 or fp64
    iterations: torch.Tensor  # 0-d int64: iterations run to produce the plan (1..max_iters)
    row_error: torch.Tensor  # 0-d, plan's dtype: max_i |T * rowsum_i - 1| of the returned plan


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


# (1/n) / (x + tiny) as three kernels, in place on a fresh tensor (what ``(1/n) / tensor`` runs
# anyway).
def _row_scale(
    cost: torch.Tensor, d1: torch.Tensor, row_mass: torch.Tensor | None = None
) -> torch.Tensor:
    """d0 that gives every token (row) mass 1/T for column scaling d1 (``row_mass`` = cost @ d1, not
    modified)."""
    if row_mass is None:
        row_mass = cost @ d1
    return (row_mass + torch.finfo(cost.dtype).tiny).reciprocal_().mul_(1.0 / cost.shape[0])


def _col_scale(cost: torch.Tensor, d0: torch.Tensor) -> torch.Tensor:
    """d1 that gives every expert (column) mass 1/E for row scaling d0."""
    return (d0 @ cost).add_(torch.finfo(cost.dtype).tiny).reciprocal_().mul_(1.0 / cost.shape[1])


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


def _rounded_up_tol(tol: float, dtype: torch.dtype) -> float:
    """``tol`` rounded up to ``dtype``: for every x of ``dtype``, x < result exactly when x < tol.

    ``err < tol`` on a float32 tensor rounds tol to the nearest float32, which would flip the test
    for an error within half an ulp of tol; the test must match ``float(err) < tol`` in float64.
    """
    if dtype == torch.float64:
        return float(tol)
    with np.errstate(over="ignore"):
        rounded = np.float32(tol)
    if float(rounded) < tol:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


def _iteration(
    cost: torch.Tensor, d0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iteration k from d0_k: (d1_k, d0_k+1, row_marginal_error of the plan (d0_k, d1_k)); 14
    kernels."""
    d1 = _col_scale(cost, d0)
    row_mass = cost @ d1
    d0_next = _row_scale(cost, d1, row_mass)
    err = (d0 / d0_next).sub_(1).abs_().masked_fill_(row_mass <= 0, 0.0).max()
    return d1, d0_next, err


def _check_args(logits: torch.Tensor, max_iters: int) -> None:
    if max_iters < 1:
        raise ValueError("sinkhorn max_iters must be >= 1")
    if logits.shape[0] == 0:
        raise ValueError("sinkhorn needs at least one token")


@torch.no_grad()
def sinkhorn(
    logits: torch.Tensor,
    temperature: float = ModelConfig.sinkhorn_temperature,
    init: str = ModelConfig.sinkhorn_init,
    tol: float = ModelConfig.sinkhorn_tol,
    max_iters: int = ModelConfig.sinkhorn_max_iters,
) -> SinkhornResult:
    """Balanced plan for (T, E) router logits, T >= 1; the plan of the first iteration whose error
    is < ``tol``, or of iteration ``max_iters``.

    Same iterates as ``sinkhorn_steps``, arranged so the stopping test costs no extra pass: after
    iteration k, T * rowsum_i of the plan (d0_k, d1_k) equals d0_k,i / d0_k+1,i, and d0_k+1 is
    the next iteration's first half anyway. Never syncs with the device: always runs
    ``max_iters`` iterations (14 kernels each, plus 5 of bookkeeping after the first), and from the
    first converged one on, ``done`` freezes d0, d1, the error and the iteration count with
    ``torch.where``; the arithmetic is the early-stopping loop's, op for op.
    """
    _check_args(logits, max_iters)
    cost = stable_cost(
        logits.to(torch.float32 if logits.dtype != torch.float64 else torch.float64), temperature
    )
    tol = _rounded_up_tol(tol, cost.dtype)
    d0 = _row_scale(cost, _initial_d1(cost, init))
    d1, d0_next, err = _iteration(cost, d0)
    frozen = torch.zeros((), dtype=torch.int64, device=cost.device)  # iterations after convergence
    for _ in range(max_iters - 1):
        done = err < tol  # err stays frozen below tol once converged, so done stays set
        torch.where(done, d0, d0_next, out=d0)
        d1_new, d0_next, err_new = _iteration(cost, d0)
        torch.where(done, d1, d1_new, out=d1)
        torch.where(done, err, err_new, out=err)
        frozen.add_(done)
    return SinkhornResult(
        plan=d0.unsqueeze(1) * cost * d1, iterations=max_iters - frozen, row_error=err
    )


@torch.no_grad()
def sinkhorn_fused(
    logits: torch.Tensor,
    temperature: float = ModelConfig.sinkhorn_temperature,
    init: str = ModelConfig.sinkhorn_init,
    tol: float = ModelConfig.sinkhorn_tol,
    max_iters: int = ModelConfig.sinkhorn_max_iters,
) -> SinkhornResult:
    """``sinkhorn`` with the iteration loop as max_iters + 2 Triton launches of many programs each
    (kernels/sinkhorn_triton.py): same iterates and stopping rule, fp32 on a GPU; sums in another
    order, so equal to rounding."""
    from megatron_blackmamba.kernels import sinkhorn_triton

    _check_args(logits, max_iters)
    cost = stable_cost(logits.float(), temperature).contiguous()
    d0, d1, iterations, err = sinkhorn_triton.sinkhorn_loop(
        cost, _initial_d1(cost, init), _rounded_up_tol(tol, cost.dtype), max_iters
    )
    return SinkhornResult(plan=d0.unsqueeze(1) * cost * d1, iterations=iterations, row_error=err)


def _fused_applies(logits: torch.Tensor) -> bool:
    """Whether the Triton loop can take ``logits``: triton importable and its domain (fp32, GPU,
    ...)."""
    kernels = triton_kernels("sinkhorn_triton")
    return kernels is not None and kernels.applies(logits)


# (solver, shape, dtype, device, sinkhorn kwargs) -> (static input, captured graph, static result)
_GRAPHS: dict[tuple, tuple[torch.Tensor, "torch.cuda.CUDAGraph", SinkhornResult]] = {}


def _capture(
    solver, logits: torch.Tensor, kwargs: dict
) -> tuple[torch.Tensor, "torch.cuda.CUDAGraph", SinkhornResult]:
    static_in = logits.clone()
    graph, static_out = capture(lambda: solver(static_in, **kwargs), logits.device)
    return static_in, graph, static_out


@torch.no_grad()
def sinkhorn_replayed(logits: torch.Tensor, **kwargs) -> SinkhornResult:
    """The Sinkhorn plan of ``logits``, replayed from a CUDA graph when ``logits`` is on a GPU.

    The torch loop launches ~19 small kernels per iteration, max_iters times per MoE layer: eager,
    the host spends longer launching them than the GPU spends running them (8 ms of host time per
    layer in bench/results/h100_profile_step.md). It never syncs and its shapes are fixed per
    (tokens, experts), so it is captured once per shape and replayed as one launch; where the
    fused Triton loop applies (``sinkhorn_fused``: fp32 logits, which megatron's router produces)
    the graph holds that instead, max_iters + 2 kernel nodes rather than ~380. While the MoE layer
    itself is being captured (training.cuda_graphs) the solver runs directly into that graph, and
    on CPU it is a plain ``sinkhorn`` call. The result is copied out of the graph's static buffers,
    so it stays valid after later replays.
    """
    if logits.device.type != "cuda":
        return sinkhorn(logits, **kwargs)
    solver = sinkhorn_fused if _fused_applies(logits) else sinkhorn
    if torch.cuda.is_current_stream_capturing():
        return solver(logits, **kwargs)
    key = (
        solver.__name__,
        tuple(logits.shape),
        logits.dtype,
        logits.device,
        tuple(sorted(kwargs.items())),
    )
    if key not in _GRAPHS:
        _GRAPHS[key] = _capture(solver, logits, kwargs)
    static_in, graph, out = _GRAPHS[key]
    static_in.copy_(logits)
    graph.replay()
    return SinkhornResult(
        plan=out.plan.clone(), iterations=out.iterations.clone(), row_error=out.row_error.clone()
    )
