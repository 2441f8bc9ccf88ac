"""Tokenisation with HF ``tokenizers`` from a local ``tokenizer.json`` (never downloaded).

Stored documents are ``encode(text, add_special_tokens=False).ids + [EOD]``: no BOS or other
post-processor tokens, and the EOD id taken from the tokenizer itself (``<|endoftext|>`` by
default, as in GPT-NeoX-20B), so the training side finds document ends with ``tokenizer.eod``.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Sequence

import numpy as np

from .issues import InputError

EOD_TOKEN = "<|endoftext|>"


def optimal_dtype(vocab_size: int) -> type:
    """Token dtype for a vocabulary: megatron's ``DType.optimal_dtype`` rule."""
    return np.uint16 if vocab_size < 65500 else np.int32


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the EOD id and storage dtype data_prep needs.

    It also carries what megatron's GPT datasets read from a tokenizer (``vocab_size``, ``eod``,
    ``unique_identifiers``), so it can be passed as ``GPTDatasetConfig.tokenizer``.
    """

    def __init__(self, path: str, eod_token: str = EOD_TOKEN) -> None:
        from tokenizers import Tokenizer

        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise InputError(f"tokenizer file not found: {path}")
        try:
            self.hf = Tokenizer.from_file(self.path)
        except Exception as error:  # tokenizers raises a bare Exception on bad files
            raise InputError(f"{path}: not a tokenizers tokenizer.json ({error})") from None
        eod = self.hf.token_to_id(eod_token)
        if eod is None:
            raise InputError(
                f"{path}: tokenizer has no token {eod_token!r}; "
                "pass --eod-token with the end-of-document token it does have"
            )
        self.eod_token = eod_token
        self.eod: int = eod
        self.vocab_size: int = self.hf.get_vocab_size(with_added_tokens=True)
        self.dtype = optimal_dtype(self.vocab_size)

    @property
    def unique_identifiers(self) -> Dict[str, str]:
        """What megatron hashes to name its dataset index caches."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "tokenizer_path": self.path,
            "eod_token": self.eod_token,
        }

    def tokenize(self, text: str) -> List[int]:
        """Ids of one text, without EOD."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_documents(self, texts: Sequence[str]) -> List[List[int]]:
        """Batch-encode documents, each followed by EOD (the ids that go into ``.bin``)."""
        encodings = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        documents = []
        for encoding in encodings:
            ids = encoding.ids
            ids.append(self.eod)
            documents.append(ids)
        return documents


def load_tokenizer(path: str, eod_token: str = EOD_TOKEN) -> TextTokenizer:
    """Load a local ``tokenizer.json`` (e.g. GPT-NeoX-20B's, or ``data/sample/tokenizer.json``)."""
    return TextTokenizer(path, eod_token)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path: str) -> None:
    """Train a byte-level BPE tokenizer (GPT-NeoX style, with ``<|endoftext|>``) and save it.

    Used for the bundled sample tokenizer and the tests' tiny tokenizer, so neither needs a
    download.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(path, pretty=False)
