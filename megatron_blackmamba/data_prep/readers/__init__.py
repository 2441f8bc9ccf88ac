"""Corpus readers, one module per published format, and the registry that names them."""

from typing import Dict, Type

from ..issues import InputError
from .base import Document, Reader, Split
from .jsonl import JsonlReader
from .pes2o import PeS2oReader
from .pg19 import PG19Reader
from .pile import PileReader
from .proofpile import ProofPileReader
from .slimpajama import SlimPajamaReader
from .starcoder import StarcoderReader

READERS: Dict[str, Type[Reader]] = {
    cls.name: cls
    for cls in (
        PileReader,
        SlimPajamaReader,
        StarcoderReader,
        PeS2oReader,
        ProofPileReader,
        PG19Reader,
        JsonlReader,
    )
}


def get_reader(name: str, **options: str) -> Reader:
    """The reader registered under ``name`` with its options (``jsonl``: ``text_key``; ``pg19``:
    ``split``); a clear error lists the known readers otherwise."""
    try:
        cls = READERS[name]
    except KeyError:
        raise InputError(f"unknown reader {name!r}; known readers: {', '.join(READERS)}") from None
    return cls(**options)


__all__ = ["READERS", "Document", "InputError", "Reader", "Split", "get_reader"]
