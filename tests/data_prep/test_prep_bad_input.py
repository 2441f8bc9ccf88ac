"""Bad input is skipped, counted per reason and reported with file and line/row - or, with
--strict, stops the run with exit status 2."""

from __future__ import annotations

import json
import logging
import re
import zlib

import pytest

from megatron_blackmamba.data_prep.build import BuildSpec, build
from megatron_blackmamba.data_prep.issues import BadRecordError

from .prep_helpers import (
    expected_ids,
    jsonl_bytes,
    make_texts,
    pile_records,
    read_documents,
    run_cli,
    write_compressed,
    write_parquet,
    write_pg19,
)


def _build(tmp_path, reader, pattern, tokenizer_path, **kwargs):
    return build(
        BuildSpec(
            reader=reader,
            inputs=(str(pattern),),
            tokenizer=tokenizer_path,
            output=str(tmp_path / "out" / reader),
            progress=False,
            **kwargs,
        )
    )


def _bad_lines(texts):
    """Good records interleaved with one bad line of each kind; returns (bytes, bad line nos)."""
    good = [json.dumps(r).encode() for r in pile_records(texts, ["A"] * len(texts))]
    bad = {
        3: (b'{"text": "unterminated', "invalid_json"),
        5: (b'{"meta": {"pile_set_name": "A"}}', "missing_text"),
        7: (b'{"text": "caf\xe9 latin-1"}', "non_utf8"),
        9: (b'{"text": ""}', "empty"),
        11: (b"", "empty"),
        13: (b'{"text": "lone \\ud800 surrogate"}', "non_utf8"),
        15: (b'["a", "list"]', "invalid_json"),
    }
    lines = []
    for line_no in range(1, len(good) + len(bad) + 1):
        lines.append(bad[line_no][0] if line_no in bad else good.pop(0))
    return b"\n".join(lines) + b"\n", bad


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.zst", "bad.jsonl.gz"])
def test_bad_records_are_skipped_counted_and_located(
    tmp_path, tokenizer_path, hf_tokenizer, caplog, name
):
    texts = make_texts(10, 3)
    data, bad = _bad_lines(texts)
    path = write_compressed(tmp_path / name, data)
    with caplog.at_level(logging.WARNING, logger="megatron_blackmamba.data_prep"):
        result = _build(tmp_path, "pile", path, tokenizer_path, shard_bytes=200)
    assert read_documents(result.prefix) == expected_ids(hf_tokenizer, texts)
    counts = {}
    for _, reason in bad.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert result.stats.skipped == counts
    for line_no, (_, reason) in bad.items():
        assert any(f"{path}, line {line_no}: {reason}" in m for m in caplog.messages), line_no
    assert "skipped records (not in the output): empty 2, invalid_json 2" in result.report()


@pytest.mark.parametrize("name", ["cut.jsonl.zst", "cut.jsonl.gz"])
def test_truncated_stream(tmp_path, tokenizer_path, hf_tokenizer, caplog, name):
    texts = make_texts(1000, 4)  # several compressed blocks, so a cut keeps some data
    path = write_compressed(tmp_path / name, jsonl_bytes(pile_records(texts, ["A"] * 1000)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    if name.endswith(".gz"):
        decoded = zlib.decompressobj(31).decompress(path.read_bytes())
    else:
        import zstandard

        decoded = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    complete = decoded.count(b"\n")
    assert 0 < complete < 1000
    with caplog.at_level(logging.WARNING, logger="megatron_blackmamba.data_prep"):
        result = _build(tmp_path, "pile", path, tokenizer_path, shard_bytes=20_000)
    assert read_documents(result.prefix) == expected_ids(hf_tokenizer, texts[:complete])
    assert result.stats.skipped["corrupt_stream"] == 1
    assert any(
        f"{path}, after line {complete} " in m and "re-download" in m for m in caplog.messages
    )


def test_unreadable_and_incomplete_parquet(tmp_path, tokenizer_path, hf_tokenizer, caplog):
    texts = make_texts(9, 6)
    write_parquet(tmp_path / "python" / "a.parquet", texts[:4] + [None, ""] + texts[4:])
    (tmp_path / "python" / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    write_parquet(tmp_path / "python" / "c.parquet", texts[:2], column="body")
    with caplog.at_level(logging.WARNING, logger="megatron_blackmamba.data_prep"):
        result = _build(tmp_path, "starcoder", tmp_path / "python", tokenizer_path)
    assert read_documents(result.prefix) == expected_ids(hf_tokenizer, texts)
    assert result.stats.skipped == {"missing_text": 3, "empty": 1, "unreadable_file": 1}
    a, b, c = (str(tmp_path / "python" / f"{x}.parquet") for x in "abc")
    for expected in (
        f"{a}, row 4 (0-based): missing_text",
        f"{a}, row 5 (0-based): empty",
        f"{b}: unreadable_file: cannot open as parquet",
        f"{c}, all 2 rows: missing_text: no 'content' column",
    ):
        assert any(expected in m for m in caplog.messages), expected


def test_pg19_bad_books(tmp_path, tokenizer_path, caplog):
    write_pg19(tmp_path, "train", {"1": b"A fine book.", "2": b"\xff\xfe bad", "3": b"  \n"})
    with caplog.at_level(logging.WARNING, logger="megatron_blackmamba.data_prep"):
        result = _build(tmp_path, "pg19", tmp_path / "train", tokenizer_path)
    assert result.output.documents == 1
    assert result.stats.skipped == {"non_utf8": 1, "empty": 1}
    book = tmp_path / "train" / "2.txt"
    assert any(
        f"{book}, 'Title of 2, a novel': non_utf8: byte 0xff at offset 0" in m
        for m in caplog.messages
    )


def test_strict_stops(tmp_path, tokenizer_path):
    data, bad = _bad_lines(make_texts(10, 3))
    path = write_compressed(tmp_path / "bad.jsonl.zst", data)
    with pytest.raises(BadRecordError, match=r"line 3: invalid_json"):
        _build(tmp_path, "pile", path, tokenizer_path, strict=True)
    args = [
        "build",
        "--reader",
        "pile",
        "--input",
        str(path),
        "--tokenizer",
        tokenizer_path,
        "--output",
        str(tmp_path / "cli" / "out"),
        "--no-progress",
        "--workers",
        "2",
        "--shard-size-mb",
        "0.0002",
    ]
    strict = run_cli(*args, "--strict")
    assert strict.returncode == 2, strict.stderr
    # with 2 workers the first bad record *found* may be any of them
    assert re.search(f"{re.escape(str(path))}, line ({'|'.join(map(str, bad))}): ", strict.stderr)
    assert "--strict" in strict.stderr
    assert not (tmp_path / "cli" / "out.bin").exists()
    lenient = run_cli(*args)
    assert lenient.returncode == 0, lenient.stderr
    assert (
        "skipped records (not in the output): empty 2, invalid_json 2, missing_text 1, non_utf8 2"
        in lenient.stdout
    )
    # a strict rerun must not accept shards that an earlier lenient run finished with skips
    again = run_cli(*args, "--strict", "--restart")
    assert again.returncode == 2


def test_strict_rejects_skips_recorded_by_an_earlier_run(tmp_path, tokenizer_path):
    data, _ = _bad_lines(make_texts(10, 3))
    path = write_compressed(tmp_path / "bad.jsonl", data)
    _build(tmp_path, "pile", path, tokenizer_path, keep_shards=True)
    (tmp_path / "out" / "pile.idx").unlink()  # force the rerun past "already built"
    with pytest.raises(BadRecordError, match="found by an earlier run"):
        _build(tmp_path, "pile", path, tokenizer_path, keep_shards=True, strict=True)
