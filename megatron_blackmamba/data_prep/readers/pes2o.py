"""peS2o: JSON lines (``.jsonl``, ``.json.gz``/``.jsonl.gz``) with ``text`` and ``source``
(``s2orc`` full papers or ``s2ag`` titles+abstracts)."""

from .jsonl import JsonlReader


class PeS2oReader(JsonlReader):
    name = "pes2o"
    description = "peS2o (jsonl / jsonl.gz; subset = source)"
    subset_keys = ("source",)
