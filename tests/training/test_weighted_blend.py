"""A blend file with weights (what data_prep's mixture writes) builds the training datasets.

megatron refuses a split of a weighted blend whose size is None ("size_is_none =>
weights_are_none"); the test split is never used and validation may be off
(training.eval_interval=0), so both are asked for with a size, 0 where unused."""

from __future__ import annotations

import pytest

from megatron_blackmamba.config import load_config
from megatron_blackmamba.data_prep.sample import ensure_sample_dataset, sample_tokenizer_path
from megatron_blackmamba.parallel.setup import destroy, init_distributed
from megatron_blackmamba.training.data import build_datasets


@pytest.mark.parametrize("valid_samples", [0, 8])
def test_weighted_blend_builds_with_or_without_validation(sample_cache, tmp_path, valid_samples):
    prefix = ensure_sample_dataset(sample_cache)
    blend = tmp_path / "blend.txt"
    blend.write_text(f"0.7 {prefix}\n0.3 {prefix}\n")
    job = load_config(
        "configs/tiny.yaml",
        [
            f"data.blend={blend}",
            f"data.tokenizer={sample_tokenizer_path()}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    init_distributed(job.parallel, job.training.seed)
    try:
        data = build_datasets(job, 32, valid_samples)
    finally:
        destroy()
    assert len(data.train) >= 32
    assert len(data.valid or []) >= valid_samples
