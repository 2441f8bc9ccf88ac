"""The shard manifest: a build's settings plus each shard's range, status, counts and hashes.

It is the resume state, kept as ``PREFIX.shards/manifest.json`` beside the shard outputs and
rewritten atomically (every few seconds and at the end), so a killed run always leaves a
consistent version behind. A shard is reused only if it is recorded ``done`` with the same
range and its files are present with the recorded sizes; anything else is redone, which is
safe because shard outputs are deterministic and written atomically.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

from .fileio import write_json_atomic
from .issues import InputError
from .readers.base import Locator
from .stats import Stats
from .writer import OutputInfo, bin_path, idx_path

FORMAT = "data_prep-manifest/1"
_SAVE_INTERVAL_S = 2.0


def shard_id(file_index: int, shard_index: int) -> str:
    """Shard names sort in input order: ``f00003-s000012`` is file 3's 13th shard."""
    return f"f{file_index:05d}-s{shard_index:06d}"


class ConfigMismatchError(InputError):
    """The output folder holds a build made with other settings or other inputs."""


class Manifest:
    """``manifest.json`` of one build: ``config`` (what the output depends on), ``files`` (per
    fully read input: shard count, records lost while reading it), ``shards`` (per shard:
    input, locator, status, stats, output sizes and sha256) and ``merged`` (the final output)."""

    def __init__(self, work_dir: str, config: Dict[str, Any]) -> None:
        self.work_dir = work_dir
        self.path = os.path.join(work_dir, "manifest.json")
        self.data: Dict[str, Any] = {
            "format": FORMAT,
            "config": config,
            "files": {},
            "shards": {},
            "merged": None,
            "complete": False,
            "started_at": time.time(),
            "updated_at": None,
        }
        self._saved_at = 0.0

    @classmethod
    def open(cls, work_dir: str, config: Dict[str, Any], restart: bool) -> "Manifest":
        """Resume the manifest in ``work_dir`` if it was made with ``config``, else refuse
        (``restart`` discards it instead)."""
        manifest = cls(work_dir, config)
        if os.path.exists(manifest.path):
            with open(manifest.path, encoding="utf-8") as f:
                old = json.load(f)
            old_config = old.get("config", {})
            if restart:
                for entry in os.listdir(work_dir):
                    path = os.path.join(work_dir, entry)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    elif entry != "lock":
                        os.remove(path)
            elif old.get("format") != FORMAT or old_config != config:
                changed = sorted(
                    k for k in set(config) | set(old_config) if config.get(k) != old_config.get(k)
                ) or ["format"]
                raise ConfigMismatchError(
                    f"{work_dir} holds a build made with different {', '.join(changed)}; rerun "
                    "the original command to resume it, or add --restart to discard it"
                )
            else:
                manifest.data = old
        return manifest

    @classmethod
    def load(cls, path: str) -> "Manifest":
        """Read a manifest as is (for ``merge --manifest``)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read manifest {path}: {error}") from None
        manifest = cls(os.path.dirname(os.path.abspath(path)), data.get("config", {}))
        manifest.data = data
        return manifest

    def complete_shard_prefixes(self, file_indices: Optional[List[int]] = None) -> List[str]:
        """Every shard of every input (or of ``file_indices``) in order, checking that each is
        finished and present."""
        inputs = self.data["config"]["inputs"]
        prefixes = []
        for index in range(len(inputs)) if file_indices is None else file_indices:
            source = inputs[index]
            record = self.data["files"].get(str(index))
            if record is None:
                raise InputError(
                    f"{self.path}: {source['path']} was not fully read; "
                    "rerun the build command to finish it"
                )
            for shard in range(record["shards"]):
                sid = shard_id(index, shard)
                entry = self.data["shards"].get(sid)
                if (
                    not entry
                    or entry["status"] != "done"
                    or not output_intact(self.shard_prefix(sid), entry["output"])
                ):
                    raise InputError(
                        f"{self.path}: shard {sid} is unfinished or its files are "
                        "gone (built without --keep-shards?); rerun the build"
                    )
                prefixes.append(self.shard_prefix(sid))
        return prefixes

    def shard_prefix(self, sid: str) -> str:
        return os.path.join(self.work_dir, sid)

    def finished(self, sid: str, locator: Locator) -> Optional[Dict[str, Any]]:
        """The shard's record if it can be reused as is, else None."""
        entry = self.data["shards"].get(sid)
        if not entry or entry["status"] != "done" or entry["locator"] != locator:
            return None
        return entry if output_intact(self.shard_prefix(sid), entry["output"]) else None

    def start_shard(self, sid: str, input_path: str, locator: Locator) -> None:
        self.data["shards"][sid] = {"input": input_path, "locator": locator, "status": "pending"}

    def finish_shard(self, sid: str, stats: Stats, output: OutputInfo) -> None:
        entry = self.data["shards"][sid]
        entry.update(
            status="done", stats=stats.to_json(), output=output.to_json(), finished_at=time.time()
        )
        self.save()

    def record_file(self, index: int, path: str, shards: int, stats: Stats) -> None:
        """A fully split input: its shard count and the records lost while reading it."""
        self.data["files"][str(index)] = {"path": path, "shards": shards, "stats": stats.to_json()}

    @property
    def complete(self) -> bool:
        """Every file of this manifest's build (or task) is split and every shard done."""
        return bool(self.data.get("complete"))

    @complete.setter
    def complete(self, value: bool) -> None:
        self.data["complete"] = value
        self.save(force=True)

    @property
    def merged(self) -> Optional[Dict[str, Any]]:
        return self.data["merged"]

    @merged.setter
    def merged(self, value: Optional[Dict[str, Any]]) -> None:
        self.data["merged"] = value
        self.save(force=True)

    def save(self, force: bool = False) -> None:
        """Write atomically; without ``force`` at most every few seconds (a lost update only
        means a finished shard is redone)."""
        now = time.monotonic()
        if force or now - self._saved_at >= _SAVE_INTERVAL_S:
            self.data["updated_at"] = time.time()
            write_json_atomic(self.path, self.data)
            self._saved_at = now

    def remove_temp_files(self) -> None:
        """Temp files left by a killed run (we hold the lock, so no live writer owns them)."""
        for path in glob.glob(os.path.join(glob.escape(self.work_dir), "*.tmp-*")):
            os.remove(path)


class FileLock:
    """An exclusive ``flock`` on ``path``: one build per output folder at a time."""

    def __init__(self, path: str, wait: bool) -> None:
        self._file = open(path, "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            self._file.close()
            raise InputError(f"another data_prep run holds {path}; wait for it to finish") from None

    def release(self) -> None:
        self._file.close()


def output_intact(prefix: str, output: Dict[str, Any]) -> bool:
    """Both files of a recorded output exist with their recorded sizes."""
    return (
        _size(bin_path(prefix)) == output["bin_bytes"]
        and _size(idx_path(prefix)) == output["idx_bytes"]
    )


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def remove_outputs(prefixes: List[str]) -> None:
    for prefix in prefixes:
        for path in (bin_path(prefix), idx_path(prefix)):
            if os.path.exists(path):
                os.remove(path)
