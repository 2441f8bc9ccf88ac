"""StarCoder data: ``<language>/train-*.parquet`` with each source file in the ``content`` column.

Parquet can be entered at any row group, so shards are row-group ranges (~``shard_bytes`` of
uncompressed data each, from the footer) and workers read their range themselves.
"""

from __future__ import annotations

import os
from typing import Iterator

from ..issues import Issue, IssueLog, Reason
from .base import Document, Reader, Split, decode_utf8

_BATCH_ROWS = 1024


class StarcoderReader(Reader):
    name = "starcoder"
    description = "StarCoder data (parquet, 'content' column; subset = language folder)"
    suffixes = (".parquet",)
    column = "content"

    def split(self, path: str, shard_bytes: int, issues: IssueLog) -> Iterator[Split]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            metadata = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as error:
            issues.report(
                Issue(Reason.UNREADABLE_FILE, path, "", f"cannot open as parquet ({error})")
            )
            return
        columns = metadata.schema.names
        if self.column not in columns:
            issues.report(
                Issue(
                    Reason.MISSING_TEXT,
                    path,
                    f"all {metadata.num_rows} rows",
                    f"no {self.column!r} column (columns: {', '.join(columns)})",
                    count=metadata.num_rows,
                )
            )
            return
        first_group = first_row = rows = size = 0
        for group in range(metadata.num_row_groups):
            size += metadata.row_group(group).total_byte_size
            rows += metadata.row_group(group).num_rows
            if size >= shard_bytes or group == metadata.num_row_groups - 1:
                yield Split(
                    {"row_groups": [first_group, group + 1], "first_row": first_row, "rows": rows}
                )
                first_group, first_row, rows, size = group + 1, first_row + rows, 0, 0

    def read(self, path: str, split: Split, issues: IssueLog) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        subset = os.path.basename(os.path.dirname(path))
        start, stop = split.locator["row_groups"]
        row = split.locator["first_row"]
        end = row + split.locator["rows"]
        try:
            batches = pq.ParquetFile(path).iter_batches(
                batch_size=_BATCH_ROWS, row_groups=range(start, stop), columns=[self.column]
            )
            for batch in batches:
                column = batch.column(0)
                if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                    # raw bytes, so that invalid UTF-8 is reported per row, not per batch
                    column = column.view(
                        pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
                    )
                for value in column.to_pylist():
                    document = self._parse(value, path, row, subset, issues)
                    row += 1
                    if document is not None:
                        yield document
        except (pa.ArrowException, OSError) as error:
            issues.report(
                Issue(
                    Reason.UNREADABLE_FILE,
                    path,
                    f"rows {row}-{end - 1} (0-based)",
                    f"cannot read ({error})",
                    count=end - row,
                )
            )

    def _parse(
        self, value: object, path: str, row: int, subset: str, issues: IssueLog
    ) -> "Document | None":
        where = f"row {row} (0-based)"
        if not isinstance(value, bytes):
            issues.report(
                Issue(
                    Reason.MISSING_TEXT,
                    path,
                    where,
                    f"{self.column!r} is {type(value).__name__}, not text",
                )
            )
            return None
        text = decode_utf8(value, path, where, issues)
        if text is None:
            return None
        if not text.strip():
            issues.report(Issue(Reason.EMPTY, path, where, f"{self.column!r} is empty"))
            return None
        return Document(text, subset)
