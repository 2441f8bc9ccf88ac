"""PG-19: one ``<book_id>.txt`` per book in split folders (``train/``, ``validation/``,
``test/``) next to ``metadata.csv`` (book_id, short_book_title, publication_date, url).

Inputs are split folders, or the published root folder, of which one split is read
(``--split``, default ``train``); a shard is a run of books (sorted by file name) of about
``shard_bytes``. Each book is one document, its subset the split name, its title (from
``metadata.csv``, when present) counted in the build's stats and named in messages about it.
"""

from __future__ import annotations

import csv
import functools
import os
from typing import Dict, Iterator, List

from ..issues import InputError, Issue, IssueLog, Reason
from .base import Document, Reader, Split, decode_utf8


class PG19Reader(Reader):
    name = "pg19"
    description = "PG-19 (split folders of <id>.txt books + metadata.csv; subset = split)"
    suffixes = (".txt",)
    splits = ("train", "validation", "test")

    def __init__(self, split: str = "train") -> None:
        if split not in self.splits:
            raise InputError(f"--split {split!r}: PG-19's splits are {', '.join(self.splits)}")
        self.split_name = split

    def _inputs_at(self, path: str) -> List[str]:
        if not os.path.isdir(path):
            raise InputError(
                f"{path}: the pg19 reader takes split folders of <book_id>.txt "
                "files (e.g. pg19/train) or the root folder holding them, not single files"
            )
        if not _books(path) and os.path.isdir(os.path.join(path, self.split_name)):
            path = os.path.join(
                path, self.split_name
            )  # the published root: train/ validation/ test/
        if not _books(path):
            raise InputError(
                f"{path}: folder holds no .txt books (nor a {self.split_name}/ split folder)"
            )
        return [path]

    def split(self, path: str, shard_bytes: int, issues: IssueLog) -> Iterator[Split]:
        group: List[str] = []
        size = 0
        for name in _books(path):
            group.append(name)
            size += os.path.getsize(os.path.join(path, name))
            if size >= shard_bytes:
                yield Split({"books": group})
                group, size = [], 0
        if group:
            yield Split({"books": group})

    def read(self, path: str, split: Split, issues: IssueLog) -> Iterator[Document]:
        titles = _titles(path)
        subset = os.path.basename(path)
        for name in split.locator["books"]:
            book = os.path.join(path, name)
            title = titles.get(name[: -len(".txt")])
            where = f"{title!r}" if title else ""
            with open(book, "rb") as f:
                data = f.read()
            text = decode_utf8(data, book, where, issues)
            if text is None:
                continue
            if not text.strip():
                issues.report(Issue(Reason.EMPTY, book, where, "the book file is empty"))
                continue
            yield Document(text, subset, title or "")


def _books(folder: str) -> List[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".txt"))


@functools.lru_cache(maxsize=8)
def _titles(folder: str) -> Dict[str, str]:
    """book_id -> title from metadata.csv in the split folder or its parent (optional)."""
    for candidate in (
        os.path.join(folder, "metadata.csv"),
        os.path.join(os.path.dirname(folder), "metadata.csv"),
    ):
        if os.path.isfile(candidate):
            with open(candidate, newline="", encoding="utf-8", errors="replace") as f:
                return {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}
    return {}
