"""Sinkhorn routing with BlackMamba's initialisation.

Two yardsticks, measured side by side on the same random logits with a per-expert bias (so raw
argmax routing is 2-5x imbalanced), at the released temperature 2:
  * the stopping rule of megatron-core and the released BlackMamba code, mean |d1 - d1_old| < 1e-4.
    Logit std <= 0.5: the paper's start stops after ONE iteration, the uniform start after 3-6.
    Logit std 1.0: the uniform start needs >= 10 (12-14), the paper's start 2-5 -- so "one
    iteration where plain Sinkhorn needs >= 10" holds only in this softer form.
  * scale-free: balance of the top-1 assignment. One paper iteration is about as balanced as two
    uniform ones. Part of the first yardstick's gap comes from the rule itself, which is not
    scale-free: the paper's start makes d1 ~T*E times smaller. Both facts are asserted so neither
    is overstated.
"""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.model.sinkhorn import row_marginal_error, sinkhorn, sinkhorn_steps, stable_cost


def _imbalanced_logits(seed: int, tokens: int = 4096, experts: int = 8, std: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    per_expert_bias = torch.randn(experts, generator=g, dtype=torch.float64) * std
    return torch.randn(tokens, experts, generator=g, dtype=torch.float64) * std + per_expert_bias


def _iterations_to_released_rule(logits: torch.Tensor, init: str, tol: float = 1e-4, cap: int = 200) -> int:
    cost = stable_cost(logits, temperature=2.0)
    previous = None
    for k, (_, d1) in enumerate(sinkhorn_steps(cost, init), start=1):
        start_d1 = d1 if previous is None else previous
        if previous is None:
            # the released code compares against its initial d1
            start_d1 = 1.0 / (cost.shape[1] * cost.sum(0)) if init == "paper" else torch.ones_like(d1)
        if (start_d1 - d1).abs().mean() < tol:
            return k
        previous = d1
        if k >= cap:
            return k
    raise AssertionError


def _top1_balance(plan: torch.Tensor) -> float:
    load = torch.bincount(plan.argmax(1), minlength=plan.shape[1]).double()
    return float(load.max() / load.mean())


def test_released_stopping_rule_iterations():
    for seed in range(5):
        for std in (0.1, 0.3, 0.5):
            logits = _imbalanced_logits(seed, std=std)
            assert _iterations_to_released_rule(logits, "paper") == 1
            assert _iterations_to_released_rule(logits, "uniform") >= 3
        logits = _imbalanced_logits(seed, std=1.0)
        paper, uniform = _iterations_to_released_rule(logits, "paper"), _iterations_to_released_rule(logits, "uniform")
        assert uniform >= 10 and paper <= 5 and 2 * paper <= uniform


def test_one_paper_iteration_balances_like_two_uniform_ones():
    for seed in range(5):
        for std in (0.3, 0.5, 1.0):
            logits = _imbalanced_logits(seed, std=std)
            converged = sinkhorn(logits, init="uniform", tol=1e-10, max_iters=500)
            one_paper = sinkhorn(logits, init="paper", tol=0.0, max_iters=1)
            one_uniform = sinkhorn(logits, init="uniform", tol=0.0, max_iters=1)
            two_uniform = sinkhorn(logits, init="uniform", tol=0.0, max_iters=2)
            assert one_paper.row_error < one_uniform.row_error
            assert _top1_balance(one_paper.plan) <= _top1_balance(one_uniform.plan)
            assert _top1_balance(one_paper.plan) <= _top1_balance(two_uniform.plan) * 1.1
            assert _top1_balance(one_paper.plan) < _top1_balance(logits) * 0.8
            agree = (one_paper.plan.argmax(1) == converged.plan.argmax(1)).double().mean()
            assert agree > 0.8


def test_tolerance_and_cap():
    logits = _imbalanced_logits(0)
    loose = sinkhorn(logits, tol=0.5, max_iters=50)
    tight = sinkhorn(logits, tol=1e-6, max_iters=50)
    capped = sinkhorn(logits, tol=0.0, max_iters=3)
    assert loose.iterations < tight.iterations <= 50
    assert tight.row_error < 1e-6
    assert capped.iterations == 3
    columns = capped.plan.sum(0) * capped.plan.shape[1]
    torch.testing.assert_close(columns, torch.ones_like(columns))  # expert marginals exact after a d1 update


def test_degenerate_logits_give_no_nan():
    t, e = 64, 8
    cases = {
        "all equal": torch.zeros(t, e),
        "huge": torch.full((t, e), 1e4) + torch.randn(t, e) * 1e3,
        "tiny": torch.randn(t, e) * 1e-8,
        "-inf expert": torch.randn(t, e).index_fill_(1, torch.tensor([3]), float("-inf")),
        "-inf token": torch.randn(t, e).index_fill_(0, torch.tensor([5]), float("-inf")),
    }
    for name, logits in cases.items():
        for init in ("paper", "uniform"):
            result = sinkhorn(logits, init=init, max_iters=20)
            assert torch.isfinite(result.plan).all(), f"{name}/{init}: non-finite plan"
            assert result.plan.argmax(1).lt(e).all()
    equal = sinkhorn(cases["all equal"], max_iters=1)
    torch.testing.assert_close(equal.plan, torch.full((t, e), 1.0 / (t * e)))
    masked = sinkhorn(cases["-inf expert"])
    assert not (masked.plan.argmax(1) == 3).any(), "an expert with -inf logits must never be chosen"


@pytest.mark.parametrize("init", ["paper", "uniform"])
def test_reported_row_error_is_the_returned_plans(init: str):
    """The loop's stopping test uses d0_k / d0_k+1; it must equal the plan's own marginal error."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(300, 8, generator=g, dtype=torch.float64)
    logits[5] = float("-inf")  # a dead row is excluded from both
    for max_iters in (1, 2, 5):
        result = sinkhorn(logits, init=init, tol=0.0, max_iters=max_iters)
        assert result.iterations == max_iters
        assert abs(result.row_error - row_marginal_error(result.plan)) <= 1e-9
