"""Concatenate indexed datasets into one prefix, in order, streaming both files.

Same result, byte for byte, as megatron's ``IndexedDatasetBuilder.add_index`` over the same
prefixes followed by ``finalize`` - but memory stays bounded by the largest single part
rather than growing with the whole dataset, and the output is atomic and hashed.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import numpy as np

from .fileio import AtomicFile, copy_into
from .issues import InputError
from .writer import OutputInfo, bin_path, idx_path, read_index, read_index_header, write_index


def merge_indexed_datasets(prefixes: Sequence[str], output: str) -> OutputInfo:
    """Write ``output.bin/.idx`` as the concatenation of ``prefixes`` (all of one dtype)."""
    if not prefixes:
        raise InputError("nothing to merge: no input prefixes")
    headers = []
    for prefix in prefixes:
        try:
            headers.append(read_index_header(prefix))
        except (OSError, ValueError) as error:
            raise InputError(f"cannot merge {prefix}: {error}") from None
    dtype = headers[0].dtype
    for prefix, header in zip(prefixes, headers):
        if header.dtype is not dtype:
            raise InputError(
                f"{prefix}: token dtype {header.dtype.__name__} differs from "
                f"{prefixes[0]}'s {dtype.__name__}; merge only datasets made with one tokenizer"
            )
    sequences = sum(h.sequences for h in headers)
    document_indices = 1 + sum(h.document_indices - 1 for h in headers)

    def parts() -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        for prefix in prefixes:
            _, lengths, documents = read_index(prefix)
            yield lengths, documents

    with AtomicFile(bin_path(output)) as out_bin:
        for prefix in prefixes:
            copy_into(bin_path(prefix), out_bin)
    with AtomicFile(idx_path(output)) as out_idx:
        tokens = write_index(out_idx, dtype, sequences, document_indices, parts)
    assert out_bin.info is not None and out_idx.info is not None
    return OutputInfo(
        document_indices - 1,
        tokens,
        out_bin.info.sha256,
        out_bin.info.size,
        out_idx.info.sha256,
        out_idx.info.size,
    )
