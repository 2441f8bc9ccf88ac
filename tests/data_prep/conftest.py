"""Session fixtures for data_prep tests: a tiny BPE tokenizer trained locally (no download)."""

from __future__ import annotations

import pytest

from megatron_blackmamba.data_prep.tokenizer import train_bpe_tokenizer

from .prep_helpers import EXTRAS, make_texts


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny byte-level BPE (vocab 400, with <|endoftext|>) trained here, no download."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe_tokenizer(make_texts(300, seed=1) + EXTRAS, 400, str(path))
    return str(path)


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(tokenizer_path)
