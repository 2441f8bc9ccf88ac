"""The Pile: ``NN.jsonl.zst`` lines ``{"text": ..., "meta": {"pile_set_name": ...}}``."""

from .jsonl import JsonlReader


class PileReader(JsonlReader):
    name = "pile"
    description = "The Pile (jsonl.zst; subset = meta.pile_set_name)"
    subset_keys = ("meta", "pile_set_name")
