"""Per-shard and per-build counts (documents/tokens per subset, skips, filtered) and tables.

Counts live in the manifest with each shard, so a resumed run reports the same totals as an
uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from .issues import EXAMPLES_PER_REASON

NO_SUBSET = "(none)"


@dataclass
class Stats:
    """Documents and tokens per subset, skipped records per reason, filtered docs per subset."""

    subsets: Dict[str, List[int]] = field(default_factory=dict)  # subset -> [docs, tokens]
    skipped: Dict[str, int] = field(default_factory=dict)
    filtered: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, List[str]] = field(default_factory=dict)  # reason -> first messages
    titled: int = 0  # documents whose corpus names them (e.g. PG-19 books found in metadata.csv)

    @property
    def documents(self) -> int:
        return sum(docs for docs, _ in self.subsets.values())

    @property
    def tokens(self) -> int:
        return sum(tokens for _, tokens in self.subsets.values())

    def add_document(self, subset: str, tokens: int) -> None:
        counts = self.subsets.setdefault(subset or NO_SUBSET, [0, 0])
        counts[0] += 1
        counts[1] += tokens

    def add_filtered(self, subset: str) -> None:
        key = subset or NO_SUBSET
        self.filtered[key] = self.filtered.get(key, 0) + 1

    def update(self, other: "Stats") -> None:
        for name, (docs, tokens) in other.subsets.items():
            counts = self.subsets.setdefault(name, [0, 0])
            counts[0] += docs
            counts[1] += tokens
        for mine, theirs in ((self.skipped, other.skipped), (self.filtered, other.filtered)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        for reason, messages in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(messages[: max(0, EXAMPLES_PER_REASON - len(mine))])
        self.titled += other.titled

    def to_json(self) -> Dict[str, object]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "subsets": self.subsets,
            "skipped": self.skipped,
            "filtered": self.filtered,
            "examples": self.examples,
            "titled": self.titled,
        }

    @classmethod
    def from_json(cls, data: Dict) -> "Stats":
        return cls(
            {k: list(v) for k, v in data.get("subsets", {}).items()},
            dict(data.get("skipped", {})),
            dict(data.get("filtered", {})),
            {k: list(v) for k, v in data.get("examples", {}).items()},
            int(data.get("titled", 0)),
        )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: List[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _fmt(value: object) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)
