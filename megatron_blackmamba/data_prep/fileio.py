"""Atomic, hashed file output: every file data_prep writes appears complete or not at all.

A run may be killed at any instant (SIGKILL, preemption). Writing under a temp name and
``os.replace``-ing it into place means a reader - including a resumed run - never sees a
half-written ``.bin``, ``.idx`` or manifest. The sha256 is computed while writing so recording
it in the manifest costs no second read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

_CHUNK = 1 << 20


def temp_path(path: str) -> str:
    """A sibling temp name unique to this process, so two writers never share a temp file."""
    return f"{path}.tmp-{os.getpid()}"


@dataclass(frozen=True)
class FileInfo:
    """What the manifest records about a finished output file."""

    sha256: str
    size: int


class AtomicFile:
    """A binary file written under a temp name and moved into place only by :meth:`commit`.

    Used as a context manager it commits on success and removes the temp file on error.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._tmp = temp_path(path)
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.info: Optional[FileInfo] = None

    def write(self, data: Any) -> None:
        """Write a bytes-like object (bytes, memoryview, contiguous numpy array)."""
        view = memoryview(data)
        self._file.write(view)
        self._hash.update(view)
        self.size += view.nbytes

    def commit(self) -> FileInfo:
        """Flush to disk, then atomically replace ``path`` with the written content."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        self.info = FileInfo(self._hash.hexdigest(), self.size)
        return self.info

    def abort(self) -> None:
        """Discard everything written; ``path`` is left untouched."""
        self._file.close()
        try:
            os.remove(self._tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def copy_into(src_path: str, dst: AtomicFile) -> None:
    """Append a whole file to ``dst`` in bounded chunks."""
    with open(src_path, "rb") as src:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON with sorted keys (stable diffs, deterministic bytes) atomically."""
    with AtomicFile(path) as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8") + b"\n")


def file_sha256(path: str) -> str:
    """sha256 of a file, read in bounded chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
