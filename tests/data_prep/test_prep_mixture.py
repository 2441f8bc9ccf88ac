"""Mixture YAML -> per-source datasets, blend files that parse back, a summary with epochs, and
a blend that megatron's BlendedMegatronDatasetBuilder turns into a GPT training dataset."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from megatron_blackmamba.data_prep import load_tokenizer, read_blend, read_megatron_blend
from megatron_blackmamba.data_prep.issues import InputError
from megatron_blackmamba.data_prep.mixture import load_mixture, summary_table
from megatron_blackmamba.data_prep.readers import READERS
from megatron_blackmamba.data_prep.writer import read_index

from .prep_helpers import REPO, jsonl_bytes, make_texts, pile_records, run_cli, write_compressed


@pytest.fixture()
def mixture_dir(tmp_path, tokenizer_path):
    write_compressed(
        tmp_path / "raw" / "pile" / "00.jsonl.zst",
        jsonl_bytes(pile_records(make_texts(40, 1), ["Pile-CC", "ArXiv"] * 20)),
    )
    write_compressed(
        tmp_path / "raw" / "pes2o" / "train-0.json.gz",
        jsonl_bytes([{"text": t, "source": "s2orc"} for t in make_texts(30, 2)]),
    )
    config = tmp_path / "mix.yaml"
    config.write_text(f"""
token_budget: 1e5
tokenizer: {tokenizer_path}
sources:
  - name: pile
    reader: pile
    inputs: ["{tmp_path}/raw/pile/*.jsonl.zst"]
    weight: 3
    filters: {{exclude_subsets: [ArXiv]}}
  - name: papers
    reader: pes2o
    inputs: "$MIX_ROOT/pes2o"
    weight: 1
""")
    result = run_cli(
        "mixture",
        str(config),
        "--output-dir",
        str(tmp_path / "out"),
        "--no-progress",
        env={"MIX_ROOT": str(tmp_path / "raw")},
    )
    assert result.returncode == 0, result.stderr
    return tmp_path / "out", result.stdout


def test_blend_files_parse_back(mixture_dir):
    out, stdout = mixture_dir
    pairs = read_blend(str(out / "blend.txt"))
    assert pairs == read_blend(str(out / "blend.json"))
    assert json.loads((out / "blend.json").read_text()) == {"blend": [list(p) for p in pairs]}
    prefixes = [
        str(out / "pile" / "pile_text_document"),
        str(out / "papers" / "papers_text_document"),
    ]
    assert pairs == [(3.0, prefixes[0]), (1.0, prefixes[1])]
    assert read_megatron_blend(str(out / "blend.txt")) == (prefixes, [3.0, 1.0])
    # megatron-LM's own parser of --data-path reads the text form the same way
    from megatron.core.datasets.utils import get_blend_from_list

    assert get_blend_from_list((out / "blend.txt").read_text().split()) == (prefixes, [3.0, 1.0])


def test_summary_reports_share_and_epochs(mixture_dir):
    out, stdout = mixture_dir
    _, lengths, _ = read_index(str(out / "pile" / "pile_text_document"))
    pile_tokens = int(lengths.sum())
    summary = (out / "summary.txt").read_text()
    assert summary in stdout and "token budget 1e+05" in summary
    row = next(line.split() for line in summary.splitlines() if line.startswith("pile"))
    assert row[1] == "20" and row[2] == f"{pile_tokens:,}"  # ArXiv filtered out
    assert row[3] == "75.00%" and row[4] == "7.5e+04"
    assert float(row[5]) == pytest.approx(0.75e5 / pile_tokens, abs=0.01)


def test_relative_blend_prefixes_and_errors(tmp_path):
    (tmp_path / "b.txt").write_text("0.5 a/x 1.5 /abs/y\n")
    assert read_blend(str(tmp_path / "b.txt")) == [
        (0.5, str(tmp_path / "a" / "x")),
        (1.5, "/abs/y"),
    ]
    for bad in ("0.5 a 1", "w a", "0 a", "", "nan a", '{"blend": [[1]]}', "{not json"):
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises(InputError):
            read_blend(str(tmp_path / "bad.txt"))


def test_megatron_builds_a_gpt_blend(mixture_dir, tokenizer_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    out, _ = mixture_dir
    tokenizer = load_tokenizer(tokenizer_path)
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=32,
        blend=read_megatron_blend(str(out / "blend.txt")),
        split="1,0,0",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [200, 0, 0], lambda: True, config
    ).build()
    assert valid is None and test is None and len(train) >= 200
    sources = np.bincount(np.asarray(train.dataset_index[: len(train)]), minlength=2)
    assert sources[0] > 2 * sources[1] > 0  # weights 3:1
    sample = train[0]
    assert sample["tokens"].shape == (32,)
    assert int(sample["tokens"].max()) < tokenizer.vocab_size


def test_paper_mixture_config_is_valid():
    mixture = load_mixture(str(REPO / "configs" / "data" / "blackmamba_paper_mixture.yaml"))
    assert [s.reader for s in mixture.sources] == [
        "pile",
        "slimpajama",
        "starcoder",
        "pes2o",
        "proofpile",
        "pg19",
    ]
    assert set(s.reader for s in mixture.sources) == set(READERS) - {
        "jsonl"
    }  # jsonl: the generic reader
    assert mixture.token_budget == 300e9 and all(s.weight > 0 for s in mixture.sources)
    table = summary_table(
        [(s.name, s.weight, f"/nonexistent/{s.name}") for s in mixture.sources],
        mixture.token_budget,
    )
    assert table.count("not built") == 6


@pytest.mark.parametrize(
    "body, message",
    [
        ("sources: []", "non-empty 'sources'"),
        ("sources: [{name: a, reader: nope, inputs: x, weight: 1}]", "unknown reader"),
        ("sources: [{name: a, reader: pile, inputs: x, weight: -1}]", "weight must be > 0"),
        ("sources: [{name: a, reader: pile, inputs: x, wieght: 1}]", "unknown keys"),
        ("sources: [{name: a b, reader: pile, inputs: x, weight: 1}]", "must match"),
    ],
)
def test_bad_mixture_configs(tmp_path, body, message):
    (tmp_path / "m.yaml").write_text(body)
    with pytest.raises(InputError, match=message):
        load_mixture(str(tmp_path / "m.yaml"))
