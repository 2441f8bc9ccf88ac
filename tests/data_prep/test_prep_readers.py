"""Round trip for every reader: tokens read back through megatron-core's IndexedDataset equal
direct tokenisation (+EOD) of the source texts, document by document, in input order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest

from megatron_blackmamba.data_prep.build import BuildSpec, build
from megatron_blackmamba.data_prep.issues import InputError

from .prep_helpers import (
    expected_ids,
    jsonl_bytes,
    make_texts,
    pile_records,
    read_documents,
    write_compressed,
    write_parquet,
    write_pg19,
)

Corpus = Tuple[List[str], List[str], List[str]]  # input patterns, texts in order, subsets


def _jsonl_corpus(tmp: Path, names: List[str], subset_of: Callable[[str, int], Dict]) -> Corpus:
    texts, subsets, seed = [], [], 10
    for name in sorted(names):
        file_texts = make_texts(25, seed)
        seed += 1
        records = []
        for i, text in enumerate(file_texts):
            record, subset = subset_of(text, i)
            records.append(record)
            subsets.append(subset)
        write_compressed(tmp / name, jsonl_bytes(records))
        texts.extend(file_texts)
    return [str(tmp / "**" / "*.json*")], texts, subsets


def pile(tmp: Path) -> Corpus:
    names = ["Pile-CC", "ArXiv", "Github"]
    return _jsonl_corpus(
        tmp,
        ["train/00.jsonl.zst", "train/01.jsonl.zst"],
        lambda t, i: (pile_records([t], [names[i % 3]])[0], names[i % 3]),
    )


def slimpajama(tmp: Path) -> Corpus:
    names = ["RedPajamaC4", "RedPajamaWikipedia"]
    return _jsonl_corpus(
        tmp,
        ["chunk1/example_train_0.jsonl.zst", "chunk2/example_train_1.jsonl.zst"],
        lambda t, i: (pile_records([t], [names[i % 2]], key="redpajama_set_name")[0], names[i % 2]),
    )


def pes2o(tmp: Path) -> Corpus:
    names = ["s2orc", "s2ag"]
    return _jsonl_corpus(
        tmp,
        ["v2/train-00000-of-00002.json.gz", "v2/valid.jsonl"],
        lambda t, i: (
            {"added": "2023", "id": str(i), "source": names[i % 2], "text": t, "version": "v2"},
            names[i % 2],
        ),
    )


def proofpile(tmp: Path) -> Corpus:
    names = ["arxiv", "books", "formal"]
    return _jsonl_corpus(
        tmp,
        ["train/proofpile_train_0.jsonl.zst", "dev/proofpile_dev.jsonl"],
        lambda t, i: ({"text": t, "meta": {"set_name": names[i % 3]}}, names[i % 3]),
    )


def starcoder(tmp: Path) -> Corpus:
    texts, subsets = [], []
    for seed, language in enumerate(["java", "python"]):
        for part in range(2):
            file_texts = make_texts(20, 100 + seed * 2 + part)
            write_parquet(tmp / language / f"train-0000{part}-of-00002.parquet", file_texts)
            texts.extend(file_texts)
            subsets.extend([language] * len(file_texts))
    return [str(tmp)], texts, subsets


def pg19(tmp: Path) -> Corpus:
    texts, subsets = [], []
    for split, first_id in (("test", 300), ("train", 100)):
        books = {str(first_id + i): text.encode() for i, text in enumerate(make_texts(6, first_id))}
        write_pg19(tmp, split, books)
        texts.extend(books[k].decode() for k in sorted(books))
        subsets.extend([split] * len(books))
    return [str(tmp / "t*")], texts, subsets


CORPORA = {
    "pile": pile,
    "slimpajama": slimpajama,
    "pes2o": pes2o,
    "proofpile": proofpile,
    "starcoder": starcoder,
    "pg19": pg19,
}


@pytest.mark.parametrize("reader", sorted(CORPORA))
def test_round_trip(tmp_path, reader, tokenizer_path, hf_tokenizer):
    patterns, texts, subsets = CORPORA[reader](tmp_path / "raw")
    result = build(
        BuildSpec(
            reader=reader,
            inputs=tuple(patterns),
            tokenizer=tokenizer_path,
            output=str(tmp_path / "out" / reader),
            shard_bytes=1000,
            progress=False,
        )
    )
    expected = expected_ids(hf_tokenizer, texts)
    assert read_documents(str(tmp_path / "out" / reader)) == expected
    assert result.shards > 2, "small shards should split the inputs"
    assert result.output.documents == len(texts)
    assert result.output.tokens == sum(map(len, expected))
    assert {name: docs for name, (docs, _) in result.stats.subsets.items()} == Counter(subsets)
    assert not result.stats.skipped


def test_subset_filters(tmp_path, tokenizer_path, hf_tokenizer):
    patterns, texts, subsets = pile(tmp_path / "raw")
    common = dict(
        reader="pile",
        inputs=tuple(patterns),
        tokenizer=tokenizer_path,
        shard_bytes=4000,
        progress=False,
    )
    only = build(BuildSpec(output=str(tmp_path / "only"), include_subsets=("ArXiv",), **common))
    assert read_documents(str(tmp_path / "only")) == expected_ids(
        hf_tokenizer, [t for t, s in zip(texts, subsets) if s == "ArXiv"]
    )
    assert only.stats.filtered == {
        "Pile-CC": subsets.count("Pile-CC"),
        "Github": subsets.count("Github"),
    }
    without = build(
        BuildSpec(output=str(tmp_path / "without"), exclude_subsets=("Github",), **common)
    )
    assert read_documents(str(tmp_path / "without")) == expected_ids(
        hf_tokenizer, [t for t, s in zip(texts, subsets) if s != "Github"]
    )
    assert without.stats.filtered == {"Github": subsets.count("Github")}
    assert "filtered out by subset: Github" in without.report()


def test_multi_frame_zstd(tmp_path, tokenizer_path, hf_tokenizer):
    import zstandard

    texts = make_texts(12, 5)
    frames = b"".join(
        zstandard.ZstdCompressor().compress(jsonl_bytes(pile_records([t], ["A"]))) for t in texts
    )
    (tmp_path / "multi.jsonl.zst").write_bytes(frames)
    result = build(
        BuildSpec(
            reader="pile",
            inputs=(str(tmp_path / "multi.jsonl.zst"),),
            tokenizer=tokenizer_path,
            output=str(tmp_path / "out"),
            progress=False,
        )
    )
    assert read_documents(str(tmp_path / "out")) == expected_ids(hf_tokenizer, texts)
    assert not result.stats.skipped


def test_input_errors_are_explicit(tmp_path, tokenizer_path):
    (tmp_path / "notes.txt").write_text("x")
    for pattern, message in (
        (str(tmp_path / "missing*.jsonl.zst"), "no input matches"),
        (str(tmp_path / "notes.txt"), "reads .jsonl"),
    ):
        with pytest.raises(InputError, match=message):
            build(
                BuildSpec(
                    reader="pile",
                    inputs=(pattern,),
                    tokenizer=tokenizer_path,
                    output=str(tmp_path / "out"),
                    progress=False,
                )
            )
    write_compressed(tmp_path / "a.jsonl", jsonl_bytes([{"text": "hi"}]))
    with pytest.raises(InputError, match="no token '<eod>'"):
        build(
            BuildSpec(
                reader="pile",
                inputs=(str(tmp_path / "a.jsonl"),),
                tokenizer=tokenizer_path,
                output=str(tmp_path / "out"),
                eod_token="<eod>",
                progress=False,
            )
        )
