"""Megatron's indexed-dataset format (``PREFIX.bin`` + ``PREFIX.idx``), written and read here.

Why not megatron's ``IndexedDatasetBuilder`` directly: workers should not import torch and
megatron (seconds per process), documents are added in batches rather than one numpy
conversion per document, outputs must be atomic and hashed, and merging should stream
indexes instead of holding every length in Python lists. The bytes are identical to
``IndexedDatasetBuilder``'s (``tests/data_prep/test_writer_merge.py`` checks it).

``.idx`` layout (little-endian), as read by ``megatron.core.datasets.indexed_dataset``::

    b"MMIDIDX\\x00\\x00"   magic (9 bytes)
    u64  version = 1
    u8   dtype code of the tokens in .bin (DType enum: uint16 = 8, int32 = 4, ...)
    u64  S = number of sequences
    u64  D = number of document indices (= documents + 1)
    int32[S]  sequence lengths (tokens)
    int64[S]  byte offset of each sequence in .bin
    int64[D]  document indices: sequence index where each document ends, starting with 0

We write one sequence per document, as megatron's ``preprocess_data.py`` does without
sentence splitting; ``.bin`` is the tokens of all sequences back to back.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np

from .fileio import AtomicFile

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
_DTYPE_CODES: Dict[type, int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


@dataclass(frozen=True)
class OutputInfo:
    """A finished ``PREFIX.bin/.idx`` pair: counts and hashes, as recorded in the manifest."""

    documents: int
    tokens: int
    bin_sha256: str
    bin_bytes: int
    idx_sha256: str
    idx_bytes: int

    def to_json(self) -> Dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class IndexHeader:
    dtype: type
    sequences: int
    document_indices: int


def read_index_header(prefix: str) -> IndexHeader:
    """Read and validate the fixed-size ``.idx`` header."""
    path = idx_path(prefix)
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise ValueError(f"{path}: truncated index header")
    magic, version, code, sequences, doc_indices = _HEADER.unpack(raw)
    if magic != _MAGIC or version != _VERSION or code not in _CODE_DTYPES:
        raise ValueError(f"{path}: not a megatron MMIDIDX v1 index")
    return IndexHeader(_CODE_DTYPES[code], sequences, doc_indices)


def read_index(prefix: str) -> Tuple[IndexHeader, np.ndarray, np.ndarray]:
    """Header, sequence lengths (int32) and document indices (int64), memory-mapped."""
    header = read_index_header(prefix)
    lengths = np.memmap(idx_path(prefix), np.int32, "r", _HEADER.size, (header.sequences,))
    docs_offset = _HEADER.size + header.sequences * (4 + 8)
    documents = np.memmap(idx_path(prefix), np.int64, "r", docs_offset, (header.document_indices,))
    return header, lengths, documents


def read_sequences(prefix: str) -> Tuple[np.ndarray, np.ndarray]:
    """(all tokens of ``PREFIX.bin``, memory-mapped; offsets [sequences + 1]): sequence i is
    ``tokens[offsets[i]:offsets[i + 1]]``. Refused if the ``.bin`` is not the size the index says.
    """
    header, lengths, _ = read_index(prefix)
    dtype = np.dtype(header.dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    expected, actual = int(offsets[-1]) * dtype.itemsize, os.path.getsize(bin_path(prefix))
    if actual != expected:
        raise ValueError(f"{bin_path(prefix)} has {actual} bytes, its index describes {expected}")
    tokens = np.memmap(bin_path(prefix), dtype, "r") if expected else np.zeros(0, dtype)
    return tokens, offsets


IndexParts = Callable[[], Iterator[Tuple[np.ndarray, np.ndarray]]]


def write_index(
    out: AtomicFile, dtype: type, sequences: int, document_indices: int, parts: IndexParts
) -> int:
    """Write an ``.idx`` for the concatenation of ``parts``; returns the total token count.

    ``parts()`` yields ``(lengths, document_indices)`` per part, in ``.bin`` order, and is
    called once per section so that merging never holds more than one part in memory.
    Document indices are re-based the way ``IndexedDatasetBuilder.add_index`` does it.
    """
    code = _DTYPE_CODES[np.dtype(dtype).type]
    out.write(_HEADER.pack(_MAGIC, _VERSION, code, sequences, document_indices))
    tokens = 0
    for lengths, _ in parts():
        out.write(np.ascontiguousarray(lengths, dtype=np.int32))
        tokens += int(lengths.sum(dtype=np.int64))
    itemsize = np.dtype(dtype).itemsize
    offset = 0
    for lengths, _ in parts():
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=starts[1:])
        out.write(offset + starts * itemsize)
        offset += int(lengths.sum(dtype=np.int64)) * itemsize
    out.write(np.zeros(1, dtype=np.int64))
    seen = 0
    for lengths, docs in parts():
        out.write(seen + np.asarray(docs[1:], dtype=np.int64))
        seen += len(lengths)
    return tokens


class IndexedDatasetWriter:
    """Streams documents (token id lists, EOD included) into ``PREFIX.bin``; ``finalize``
    writes ``PREFIX.idx``. Both files are atomic: nothing appears at ``PREFIX`` on failure.
    """

    def __init__(self, prefix: str, dtype: type) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype).type
        self._bin = AtomicFile(bin_path(prefix))
        self._lengths: List[int] = []

    def add_documents(self, documents: Sequence[Sequence[int]]) -> None:
        lengths = [len(doc) for doc in documents]
        tokens = np.fromiter(
            itertools.chain.from_iterable(documents), dtype=self.dtype, count=sum(lengths)
        )
        self._bin.write(tokens)
        self._lengths.extend(lengths)

    def finalize(self) -> OutputInfo:
        """Commit ``.bin`` then ``.idx`` (a reader checks for ``.idx`` last)."""
        bin_info = self._bin.commit()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with AtomicFile(idx_path(self.prefix)) as idx:
            tokens = write_index(
                idx, self.dtype, len(lengths), len(documents), lambda: iter([(lengths, documents)])
            )
        assert idx.info is not None
        return OutputInfo(
            len(lengths), tokens, bin_info.sha256, bin_info.size, idx.info.sha256, idx.info.size
        )

    def abort(self) -> None:
        self._bin.abort()
