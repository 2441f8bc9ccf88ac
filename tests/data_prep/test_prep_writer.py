"""The .bin/.idx writer and the merge produce exactly megatron-core's bytes."""

from __future__ import annotations

import filecmp
import warnings

import numpy as np
import pytest

from megatron_blackmamba.data_prep.merge import merge_indexed_datasets
from megatron_blackmamba.data_prep.tokenizer import optimal_dtype
from megatron_blackmamba.data_prep.writer import IndexedDatasetWriter

from .prep_helpers import read_documents

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder


def _random_docs(seed: int, count: int, high: int):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, rng.integers(1, 40)).tolist() for _ in range(count)]


def _megatron_build(prefix: str, docs, dtype) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")


def _same_files(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + ext, b + ext, shallow=False) for ext in (".bin", ".idx"))


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65000), (np.int32, 200_000)])
def test_writer_matches_megatron_builder(tmp_path, dtype, high):
    docs = _random_docs(0, 50, high)
    writer = IndexedDatasetWriter(str(tmp_path / "ours"), dtype)
    writer.add_documents(docs[:7])
    writer.add_documents(docs[7:])
    info = writer.finalize()
    _megatron_build(str(tmp_path / "megatron"), docs, dtype)
    assert _same_files(str(tmp_path / "ours"), str(tmp_path / "megatron"))
    assert info.documents == 50 and info.tokens == sum(map(len, docs))
    assert read_documents(str(tmp_path / "ours")) == docs


def test_merge_matches_megatron_add_index(tmp_path):
    parts = [_random_docs(seed, count, 1000) for seed, count in ((1, 9), (2, 0), (3, 13))]
    for k, docs in enumerate(parts):
        writer = IndexedDatasetWriter(str(tmp_path / f"part{k}"), np.uint16)
        writer.add_documents(docs)
        writer.finalize()
    info = merge_indexed_datasets(
        [str(tmp_path / f"part{k}") for k in range(3)], str(tmp_path / "merged")
    )
    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=np.uint16)
    for k in range(3):
        builder.add_index(str(tmp_path / f"part{k}"))
    builder.finalize(str(tmp_path / "megatron.idx"))
    assert _same_files(str(tmp_path / "merged"), str(tmp_path / "megatron"))
    assert info.documents == 22
    assert read_documents(str(tmp_path / "merged")) == [d for docs in parts for d in docs]


def test_merge_refuses_mixed_dtypes(tmp_path):
    for name, dtype in (("a", np.uint16), ("b", np.int32)):
        writer = IndexedDatasetWriter(str(tmp_path / name), dtype)
        writer.add_documents([[1, 2]])
        writer.finalize()
    with pytest.raises(ValueError, match="dtype"):
        merge_indexed_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert not (tmp_path / "m.bin").exists()


def test_aborted_writer_leaves_nothing(tmp_path):
    writer = IndexedDatasetWriter(str(tmp_path / "x"), np.uint16)
    writer.add_documents([[1, 2, 3]])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("vocab", [1, 400, 8192, 50277, 65499, 65500, 65536, 100_000])
def test_dtype_rule_is_megatrons(vocab):
    assert optimal_dtype(vocab) is DType.optimal_dtype(vocab)
