"""SlimPajama: ``chunkN/example_*.jsonl.zst`` lines
``{"text": ..., "meta": {"redpajama_set_name": ...}}``."""

from .jsonl import JsonlReader


class SlimPajamaReader(JsonlReader):
    name = "slimpajama"
    description = "SlimPajama (jsonl.zst; subset = meta.redpajama_set_name)"
    subset_keys = ("meta", "redpajama_set_name")
