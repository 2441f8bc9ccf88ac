"""Datasets and resumable iterators: data_prep output -> megatron GPTDataset -> micro-batches.

The sample order is a pure function of (seed, blend, sequence length) via megatron's dataset
indices; the iterator position is just ``consumed_samples``, stored in every checkpoint, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_blackmamba.config import JobConfig
from megatron_blackmamba.data_prep.mixture import read_megatron_blend
from megatron_blackmamba.data_prep.sample import ensure_sample_dataset, sample_tokenizer_path
from megatron_blackmamba.data_prep.tokenizer import TextTokenizer, load_tokenizer


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    valid: Optional[torch.utils.data.Dataset]
    tokenizer: TextTokenizer


def tokenizer_path(job: JobConfig) -> str:
    """The tokenizer.json this job's data was prepared with (the bundled one for sample/mock)."""
    if job.data.tokenizer:
        return job.data.tokenizer
    if job.data.blend in ("sample", "mock"):
        return sample_tokenizer_path()
    raise ValueError(
        "data.tokenizer is required with a blend file: pass the tokenizer.json used by data_prep"
    )


def resolve_tokenizer(job: JobConfig) -> TextTokenizer:
    path = tokenizer_path(job)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > job.model.vocab_size:
        raise ValueError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but"
            f" model.vocab_size={job.model.vocab_size}; raise model.vocab_size (pad to a multiple"
            " of 128)"
        )
    return tokenizer


def _blend(spec: str, cache_dir: str) -> tuple[list[str], list[float] | None]:
    if spec == "sample":
        return [ensure_sample_dataset(cache_dir)], None
    return read_megatron_blend(spec)


def build_datasets(job: JobConfig, train_samples: int, valid_samples: int) -> Datasets:
    """Train/valid datasets for the whole run; every rank builds the same (cached) indices."""
    d, t = job.data, job.training
    tokenizer = resolve_tokenizer(job)
    mock = d.blend == "mock"
    common = dict(
        random_seed=t.seed,
        sequence_length=t.seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=None if mock else f"{d.cache_dir}/index",
        mid_level_dataset_surplus=0.005,
    )
    if mock:
        config = GPTDatasetConfig(split="99,1,0", **common)
    elif d.valid_blend:
        config = GPTDatasetConfig(
            blend_per_split=[
                _blend(d.blend, d.cache_dir),
                _blend(d.valid_blend, d.cache_dir),
                None,
            ],
            **common,
        )
    else:
        config = GPTDatasetConfig(blend=_blend(d.blend, d.cache_dir), split=d.split, **common)
    cls = MockGPTDataset if mock else GPTDataset
    # Sizes, never None: megatron refuses a weighted blend's split of no size (the test split is
    # unused; validation is 0 samples with training.eval_interval=0).
    sizes = [train_samples, valid_samples, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return Datasets(train=train, valid=valid, tokenizer=tokenizer)


class ResumableBatchSampler:
    """This data-parallel rank's index lists, starting after ``consumed_samples`` global samples.

    Global sample order is the dataset order; each step of ``micro_batch_size * dp`` samples is
    split into contiguous per-rank slices (megatron's pretraining sampler convention). Lazy, so a
    300B-token dataset costs nothing up front.
    """

    def __init__(
        self, total: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ):
        self.total, self.consumed = total, consumed_samples
        self.mbs, self.rank, self.step = micro_batch_size, dp_rank, micro_batch_size * dp_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed
        while start + self.step <= self.total:
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += self.step

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // self.step)


def micro_batches(
    dataset: torch.utils.data.Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    sampler = ResumableBatchSampler(
        len(dataset),
        consumed_samples,
        micro_batch_size,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=num_workers > 0,
        # A copy from pageable memory makes the host wait for the GPU's queue to drain, at every
        # micro-batch; from pinned memory it is queued like a kernel (bench/PERF_NOTES.md).
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        k: torch.stack([torch.as_tensor(s[k]) for s in samples])
        for k in ("tokens", "labels", "loss_mask")
    }
