"""The bundled sample corpus (``data/sample/``, see ``megatron_blackmamba.resources``) as a ready
indexed dataset, built once per cache.

The "main job" trains a tiny model on CPU from this data; building it takes seconds, so it is
built on first use instead of being committed in tokenised form.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..resources import sample_dir
from .build import BuildSpec, build
from .fileio import file_sha256
from .issues import InputError
from .shards import FileLock
from .writer import bin_path, idx_path

SAMPLE_DIR = sample_dir()
_FORMAT = "1"  # bump when data_prep's output for the same input changes


def sample_tokenizer_path() -> str:
    """The BPE tokenizer (vocab 8192, ``<|endoftext|>``) trained on the sample corpus."""
    return str(SAMPLE_DIR / "tokenizer.json")


def ensure_sample_dataset(cache_dir: str) -> str:
    """Return the prefix of the sample corpus tokenised with the sample tokenizer, building it
    on the first call.

    The cache folder is named after a hash of the corpus files and tokenizer, so an updated
    sample is rebuilt rather than served stale. Safe to call from several processes at once
    (they wait on a file lock; the build itself writes atomically).
    """
    inputs = sorted(SAMPLE_DIR.glob("*.jsonl.zst"))
    tokenizer = Path(sample_tokenizer_path())
    if not inputs or not tokenizer.is_file():
        raise InputError(
            f"{SAMPLE_DIR}: sample corpus or tokenizer.json missing; "
            "regenerate with python -m megatron_blackmamba.data_prep.make_sample_corpus"
        )
    digest = hashlib.sha256(_FORMAT.encode())
    for path in inputs + [tokenizer]:
        digest.update(f"{path.name}:{file_sha256(str(path))}\n".encode())
    out_dir = os.path.join(os.path.abspath(cache_dir), f"sample-{digest.hexdigest()[:12]}")
    prefix = os.path.join(out_dir, "sample_text_document")
    if os.path.exists(idx_path(prefix)) and os.path.exists(bin_path(prefix)):
        return prefix
    os.makedirs(out_dir, exist_ok=True)
    lock = FileLock(os.path.join(out_dir, "sample.lock"), wait=True)
    try:
        build(
            BuildSpec(
                reader="pile",
                inputs=tuple(str(p) for p in inputs),
                tokenizer=str(tokenizer),
                output=prefix,
                progress=False,
            )
        )
    finally:
        lock.release()
    return prefix
