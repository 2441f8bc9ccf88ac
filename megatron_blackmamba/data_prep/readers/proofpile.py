"""ProofPile: JSON lines (``.jsonl``/``.jsonl.gz``/``.jsonl.zst``) with ``text`` and ``meta``.

The subset is read from ``meta.set_name``; records without it are counted under "(none)".
"""

from .jsonl import JsonlReader


class ProofPileReader(JsonlReader):
    name = "proofpile"
    description = "ProofPile (jsonl / jsonl.zst; subset = meta.set_name)"
    subset_keys = ("meta", "set_name")
