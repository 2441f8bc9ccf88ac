"""Bad-input policy: every skipped record is counted by reason and explained, never silently
dropped.

Real corpora contain truncated downloads, stray invalid lines and empty documents. By default a
bad record is skipped, counted under a reason, and the first few are reported with the file,
line/row and what to do; ``--strict`` turns the first one into a :class:`BadRecordError`
(exit status 2) for pipelines that must not lose data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, List

EXAMPLES_PER_REASON = 3
"""Messages kept per skip reason (per shard, and in totals); counts are always complete."""


class Reason(str, Enum):
    INVALID_JSON = "invalid_json"
    MISSING_TEXT = "missing_text"
    NON_UTF8 = "non_utf8"
    EMPTY = "empty"
    CORRUPT_STREAM = "corrupt_stream"
    UNREADABLE_FILE = "unreadable_file"


_ADVICE = {
    Reason.INVALID_JSON: "record skipped; fix or delete the line",
    Reason.MISSING_TEXT: "record skipped; check that --reader matches this corpus",
    Reason.NON_UTF8: "record skipped; re-encode the source as UTF-8",
    Reason.EMPTY: "nothing to tokenise, record skipped",
    Reason.CORRUPT_STREAM: (
        "the rest of this file is lost; re-download it (records before this point are kept)"
    ),
    Reason.UNREADABLE_FILE: "these records are lost; re-download the file",
}


@dataclass(frozen=True)
class Issue:
    """One bad record (or unreadable span, ``count`` records long when known)."""

    reason: Reason
    path: str
    where: str
    detail: str
    count: int = 1

    def message(self) -> str:
        where = f", {self.where}" if self.where else ""
        return f"{self.path}{where}: {self.reason.value}: {self.detail} - {_ADVICE[self.reason]}"


class InputError(ValueError):
    """Inputs, settings or files given to data_prep cannot be used (a user error, not a bug)."""


class BadRecordError(Exception):
    """Raised in ``--strict`` mode at the first bad record."""


class IssueLog:
    """Counts skipped records per reason and keeps the first few messages of each reason."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.counts: Dict[str, int] = {}
        self.examples: Dict[str, List[str]] = {}

    def report(self, issue: Issue) -> None:
        if self.strict:
            raise BadRecordError(issue.message() + " (--strict: stopping)")
        key = issue.reason.value
        self.counts[key] = self.counts.get(key, 0) + issue.count
        shown = self.examples.setdefault(key, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(issue.message())
