"""JSON-lines corpora, plain or ``.gz``/``.zst``: the shared half of the Pile, SlimPajama,
PeS2o and ProofPile readers, which differ only in their name and where the subset name lives.

Compressed streams cannot be entered in the middle, so the main process decompresses each file
once and ships every shard's raw lines to a worker; memory stays at about one shard per
in-flight task. A shard ends at the first newline at or after ``shard_bytes`` decompressed
bytes, which depends on content only.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable, ClassVar, Dict, Iterator, Optional, Tuple

from ..issues import InputError, Issue, IssueLog, Reason
from .base import Document, Reader, Split, decode_utf8, nested_get

_READ_SIZE = 1 << 20


class _TruncatedStream(Exception):
    pass


def _stream_errors() -> Tuple[type, ...]:
    import zstandard

    return (zstandard.ZstdError, _TruncatedStream, OSError, zlib.error)


def _frames(path: str, new_decoder: Callable[[], Any]) -> Iterator[bytes]:
    """Decompress every frame (zstd) or member (gzip) of a file as the data arrives.

    Feeding decoders by hand, rather than using ``gzip.open`` or zstandard's
    ``stream_reader``, keeps the data decoded before a truncation point (``gzip.open`` drops
    it) and notices truncated zstd files at all (``stream_reader`` silently stops).
    """
    with open(path, "rb") as f:
        decoder, inside = new_decoder(), False
        while data := f.read(_READ_SIZE):
            while data:
                out = decoder.decompress(data)
                inside = True
                if out:
                    yield out
                data = b""
                if decoder.eof:
                    data = decoder.unused_data
                    decoder, inside = new_decoder(), False
        if inside:
            raise _TruncatedStream("the file ends inside a compressed frame (truncated)")


def decompressed_chunks(path: str) -> Iterator[bytes]:
    """The decompressed bytes of a plain, gzip or zstd file, in chunks."""
    if path.endswith(".zst"):
        import zstandard

        zstd = zstandard.ZstdDecompressor(max_window_size=1 << 31)  # accept `zstd --long`
        return _frames(path, zstd.decompressobj)
    if path.endswith(".gz"):
        return _frames(path, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))
    return _plain_chunks(path)


def _plain_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(_READ_SIZE):
            yield data


class JsonlReader(Reader):
    """One JSON object per line with the document in ``text_field``.

    Registered as ``jsonl`` for any such corpus (FineWeb, DCLM, Megatron-style jsonl) with the
    text under ``text_key`` (``--text-key``, default ``text``); the published formats subclass it.
    """

    name = "jsonl"
    description = (
        "any JSON-lines corpus, plain/.gz/.zst (text under --text-key, default 'text'; no subset)"
    )

    suffixes = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
    subset_keys: ClassVar[Tuple[str, ...]] = ()
    """Path of the subset name inside a record, e.g. ("meta", "pile_set_name")."""

    def __init__(self, text_key: str = "text") -> None:
        self.text_field = text_key

    def subset_of(self, record: Dict[str, Any], path: str) -> str:
        return nested_get(record, self.subset_keys)

    def split(self, path: str, shard_bytes: int, issues: IssueLog) -> Iterator[Split]:
        buffer = bytearray()
        start, first_line = 0, 1

        def take(size: int) -> Split:
            nonlocal start, first_line
            payload = bytes(buffer[:size])
            del buffer[:size]
            shard = Split({"first_line": first_line, "start": start, "end": start + size}, payload)
            start += size
            first_line += payload.count(b"\n")
            return shard

        try:
            for chunk in decompressed_chunks(path):
                buffer += chunk
                while len(buffer) >= shard_bytes:
                    newline = buffer.find(b"\n", shard_bytes - 1)
                    if newline < 0:
                        break
                    yield take(newline + 1)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
            raise InputError(f"{path}: cannot read ({error})") from None
        except _stream_errors() as error:
            lines = first_line - 1 + buffer.count(b"\n")
            issues.report(
                Issue(
                    Reason.CORRUPT_STREAM,
                    path,
                    f"after line {lines} (decompressed byte {start + len(buffer)})",
                    f"{type(error).__name__}: {error}",
                )
            )
        if buffer:
            yield take(len(buffer))

    def read(self, path: str, split: Split, issues: IssueLog) -> Iterator[Document]:
        assert split.payload is not None
        lines = split.payload.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        first_line = split.locator["first_line"]
        for offset, raw in enumerate(lines):
            document = self._parse(raw, path, f"line {first_line + offset}", issues)
            if document is not None:
                yield document

    def _parse(self, raw: bytes, path: str, where: str, issues: IssueLog) -> Optional[Document]:
        def skip(reason: Reason, detail: str) -> None:
            issues.report(Issue(reason, path, where, detail))

        if not raw or raw.isspace():
            return skip(Reason.EMPTY, "blank line")
        line = decode_utf8(raw, path, where, issues, column=True)
        if line is None:
            return None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return skip(Reason.INVALID_JSON, f"{error.msg} at column {error.colno}")
        if not isinstance(record, dict):
            return skip(Reason.INVALID_JSON, f"a JSON {type(record).__name__}, not an object")
        text = record.get(self.text_field)
        if not isinstance(text, str):
            keys = ", ".join(sorted(record)[:10])
            return skip(Reason.MISSING_TEXT, f"no string {self.text_field!r} field (keys: {keys})")
        if not text.strip():
            return skip(Reason.EMPTY, f"{self.text_field!r} is empty")
        if "\\ud" in line or "\\uD" in line:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return skip(Reason.NON_UTF8, "text holds an unpaired surrogate escape (\\udXXX)")
        return Document(text, self.subset_of(record, path))
