"""training/expert_load.load_summary: balance, entropy and the dropped fraction of one layer."""

from __future__ import annotations

import math

import pytest

from megatron_blackmamba.training.expert_load import load_summary


def test_summary_of_an_uneven_layer_with_drops():
    summary = load_summary({"routed": [3.0, 1.0], "dropped": 1.0})
    assert summary["max_over_mean"] == pytest.approx(1.5)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert summary["entropy"] == pytest.approx(entropy)
    assert summary["dropped_fraction"] == pytest.approx(1 / 5)  # of the 5 pairs routing wanted


def test_a_balanced_dropless_layer_and_an_empty_one():
    assert load_summary({"routed": [2.0] * 4, "dropped": 0.0}) == pytest.approx(
        {"max_over_mean": 1.0, "entropy": 1.0, "dropped_fraction": 0.0}
    )
    assert load_summary({"routed": [0.0, 0.0], "dropped": 3.0}) == {
        "max_over_mean": 0.0,
        "entropy": 0.0,
        "dropped_fraction": 1.0,
    }
