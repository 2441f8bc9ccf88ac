"""The paper configs have the published sizes (counted on the meta device: nothing allocated)."""

from __future__ import annotations

import pytest

from megatron_blackmamba.config import load_config
from megatron_blackmamba.model.param_count import count_parameters


@pytest.mark.parametrize(
    "overrides, total, active",
    [
        # BlackMamba 340M/1.5B: hidden 1152, 30 layers (15 Mamba + 15 MoE).
        (["model.hidden_size=1152", "model.num_layers=30"], 1.5e9, 340e6),
        # BlackMamba 630M/2.8B: hidden 1472; the released checkpoint has 36 layers (18 + 18),
        # which is what reaches 2.8B total (30 layers would give only ~2.36B).
        (["model.hidden_size=1472", "model.num_layers=36"], 2.8e9, 630e6),
    ],
)
def test_paper_sizes_within_5_percent(single_rank, overrides, total, active):
    counts = count_parameters(load_config(None, overrides))
    assert counts.total == pytest.approx(total, rel=0.05), counts.describe()
    assert counts.active == pytest.approx(active, rel=0.05), counts.describe()


def test_active_counts_one_expert_of_eight(single_rank):
    counts = count_parameters(
        load_config(None, ["model.hidden_size=64", "model.num_layers=4", "model.vocab_size=256"])
    )
    assert counts.total - counts.active == counts.expert * 7 // 8
    # Each of the 2 MoE layers holds 8 GeLU experts of 2*h*4h weights (no biases by default).
    assert counts.expert == 2 * 8 * (2 * 64 * 256)
