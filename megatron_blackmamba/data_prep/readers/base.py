"""The reader interface: how a corpus format is found, cut into shards and parsed.

A reader has two halves because of where they run:

* :meth:`Reader.split` runs in the main process and streams one input once, cutting it into
  shards at record boundaries every ~``shard_bytes``. The cut rule may depend only on the
  file's content, which is what makes shard boundaries - and so the output bytes - identical
  on every run, whatever the worker count and however often the run is interrupted.
* :meth:`Reader.read` runs in a worker and yields the documents of one shard. Bad records are
  reported to an :class:`~megatron_blackmamba.data_prep.issues.IssueLog` with their file and
  line/row.
"""

from __future__ import annotations

import glob
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

from ..issues import InputError, Issue, IssueLog, Reason

Locator = Dict[str, Any]
"""JSON-serialisable description of a shard's range in its input (stored in the manifest)."""


@dataclass(frozen=True)
class Document:
    text: str
    subset: str
    title: str = ""  # where the corpus names its documents (PG-19's metadata.csv)


@dataclass(frozen=True)
class Split:
    """One shard of an input: its locator, plus its raw bytes when the input cannot be
    re-opened at that position (compressed streams); ``None`` when the worker seeks itself."""

    locator: Locator
    payload: Optional[bytes] = None


class Reader(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    suffixes: ClassVar[Tuple[str, ...]]
    """File name endings this reader accepts when a pattern names a folder."""

    def expand(self, patterns: Sequence[str]) -> List[str]:
        """Input paths for glob patterns (``~`` and ``$VARS`` expanded), sorted, absolute.

        A folder stands for every accepted file below it. A pattern matching nothing, or
        naming a file this reader cannot read, is an error rather than a silent omission.
        """
        found = set()
        for pattern in patterns:
            pattern = os.path.expanduser(os.path.expandvars(pattern))
            matches = glob.glob(pattern, recursive=True)
            if not matches:
                hint = " (is the environment variable set?)" if "$" in pattern else ""
                raise InputError(f"no input matches {pattern!r}{hint}")
            for match in matches:
                found.update(self._inputs_at(os.path.abspath(match)))
        return sorted(found)

    def _inputs_at(self, path: str) -> List[str]:
        if os.path.isdir(path):
            inputs = [
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.endswith(self.suffixes)
            ]
            if not inputs:
                raise InputError(
                    f"{path}: folder holds no {'/'.join(self.suffixes)} files "
                    f"for the {self.name} reader"
                )
            return inputs
        if not path.endswith(self.suffixes):
            raise InputError(
                f"{path}: the {self.name} reader reads {'/'.join(self.suffixes)} "
                "files; pick another --reader or fix the input pattern"
            )
        return [path]

    @abstractmethod
    def split(self, path: str, shard_bytes: int, issues: IssueLog) -> Iterator[Split]:
        """Stream ``path`` once and yield its shards in order."""

    @abstractmethod
    def read(self, path: str, split: Split, issues: IssueLog) -> Iterator[Document]:
        """Yield the documents of one shard, reporting bad records to ``issues``."""


def decode_utf8(
    data: bytes, path: str, where: str, issues: IssueLog, column: bool = False
) -> Optional[str]:
    """``data`` as text, or None with a ``non_utf8`` record reported that names the first bad
    byte (its offset, or for a line its 1-based column)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        position = f"column {error.start + 1}" if column else f"offset {error.start}"
        issues.report(
            Issue(
                Reason.NON_UTF8,
                path,
                where,
                f"byte 0x{data[error.start]:02x} at {position} is not UTF-8",
            )
        )
        return None


def nested_get(record: Dict[str, Any], keys: Sequence[str]) -> str:
    """``record[k0][k1]...`` as a string, or "" when absent (used for subset names)."""
    value: Any = record
    for key in keys:
        if not isinstance(value, dict):
            return ""
        value = value.get(key)
    return value if isinstance(value, str) else ""
