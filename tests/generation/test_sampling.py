"""Sampling filters: top-k / top-p keep exactly the tokens they should; sampling never leaves
them."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_blackmamba.generation.sampling import (
    SamplingParams,
    sample,
    top_k_filter,
    top_p_filter,
)

PROBS = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.4, 0.1, 0.25, 0.25]])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def test_top_k_keeps_the_k_largest_and_ties():
    assert kept(top_k_filter(LOGITS, 2)) == [{1, 3}, {0, 2, 3}]  # row 2: tokens 2 and 3 tie for 2nd
    assert kept(top_k_filter(LOGITS, 1)) == [{1}, {0}]
    assert torch.equal(top_k_filter(LOGITS, 0), LOGITS)
    assert torch.equal(top_k_filter(LOGITS, 4), LOGITS)
    survivors = top_k_filter(LOGITS, 2)
    assert torch.equal(survivors[torch.isfinite(survivors)], LOGITS[torch.isfinite(survivors)])


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.3, [{1}, {0}]),  # the most likely token alone already reaches p
        (0.75, [{1, 3}, {0, 2, 3}]),  # row 2 needs 0.4 + 0.25 + 0.25 >= 0.75
        (0.85, [{1, 2, 3}, {0, 2, 3}]),
        (1.0, [{0, 1, 2, 3}, {0, 1, 2, 3}]),
    ],
)
def test_top_p_keeps_the_smallest_nucleus(p, expected):
    assert kept(top_p_filter(LOGITS, p)) == expected


def test_sampling_stays_inside_the_filters():
    g = torch.Generator().manual_seed(0)
    logits = LOGITS[:1].expand(4000, -1)
    draws = {
        "top_k": sample(logits, SamplingParams(top_k=2), g),
        "top_p": sample(logits, SamplingParams(top_p=0.75), g),
        "both": sample(logits, SamplingParams(top_k=3, top_p=0.75), g),
        "none": sample(logits, SamplingParams(), g),
    }
    assert set(draws["top_k"].tolist()) == {1, 3}
    assert set(draws["top_p"].tolist()) == {1, 3}
    assert set(draws["both"].tolist()) == {1, 3}
    assert set(draws["none"].tolist()) == {0, 1, 2, 3}
    # Renormalised over the kept tokens: 0.5 / 0.8 of the draws are token 1.
    share = (draws["top_k"] == 1).float().mean().item()
    assert math.isclose(share, 0.625, abs_tol=0.03)


def test_temperature_sharpens_and_greedy_is_argmax():
    g = torch.Generator().manual_seed(1)
    logits = LOGITS[:1].expand(2000, -1)
    cold = sample(logits, SamplingParams(temperature=0.05), g)
    assert (cold == 1).float().mean() > 0.99
    hot = sample(logits, SamplingParams(temperature=5.0), g)
    assert (hot == 1).float().mean() < 0.4
    assert sample(LOGITS, SamplingParams(greedy=True, temperature=3.0, top_k=1)).tolist() == [1, 0]


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
