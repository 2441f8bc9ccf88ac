"""data_prep: raw corpora -> Megatron indexed datasets (``PREFIX.bin/.idx``) and blend files.

Command line: ``blackmamba-prep --help`` (subcommands build, merge, mixture, readers,
sample). Python API for the training side:

* :func:`ensure_sample_dataset` ``(cache_dir) -> prefix`` - the bundled sample, built once.
* :func:`sample_tokenizer_path` ``() -> path`` - the tokenizer that sample is encoded with.
* :func:`load_tokenizer` ``(path, eod_token="<|endoftext|>") -> TextTokenizer`` - has
  ``vocab_size``, ``eod``, ``tokenize``, ``detokenize``; usable as ``GPTDatasetConfig.tokenizer``.
* :func:`read_blend` ``(path) -> [(weight, prefix), ...]`` and :func:`read_megatron_blend`
  ``(path) -> (prefixes, weights)`` - a blend file written by ``mixture``.
"""

from .mixture import read_blend, read_megatron_blend
from .sample import ensure_sample_dataset, sample_tokenizer_path
from .tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "TextTokenizer",
    "ensure_sample_dataset",
    "load_tokenizer",
    "read_blend",
    "read_megatron_blend",
    "sample_tokenizer_path",
]
