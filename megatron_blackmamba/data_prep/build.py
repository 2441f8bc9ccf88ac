"""``build``: one corpus (one reader, many input files) -> one Megatron indexed dataset.

The main process streams each input once through its reader's ``split``, which cuts it into
shards by a content-only rule. Shards finished by an earlier run (per the manifest) are
skipped; the others go to worker processes, each of which parses, filters, tokenises and
writes one shard's ``.bin/.idx`` atomically. At most ``2 * workers`` shards are in flight, so
memory stays bounded whatever the input size. Finally the shards are merged in input order.
The output bytes therefore depend only on the inputs, tokenizer and filters - never on the
worker count, timing, or how often the run was interrupted.

Test hook: ``DATA_PREP_TEST_SHARD_DELAY=<seconds>`` makes every shard sleep that long after
it is written, so tests can kill a run mid-way.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Set, Tuple

import numpy as np

from .fileio import file_sha256
from .issues import BadRecordError, InputError, IssueLog
from .merge import merge_indexed_datasets
from .readers import Document, Reader, Split, get_reader
from .shards import FileLock, Manifest, output_intact, remove_outputs, shard_id
from .stats import NO_SUBSET, Stats, format_table
from .tokenizer import EOD_TOKEN, TextTokenizer, load_tokenizer
from .writer import IndexedDatasetWriter, OutputInfo

logger = logging.getLogger("megatron_blackmamba.data_prep")

DEFAULT_SHARD_BYTES = 64 << 20
_BATCH_DOCS = 256
_BATCH_CHARS = 4 << 20
_DELAY_ENV = "DATA_PREP_TEST_SHARD_DELAY"


@dataclass(frozen=True)
class BuildSpec:
    """Everything that defines a build (the CLI's ``build`` arguments)."""

    reader: str
    inputs: Tuple[str, ...]
    tokenizer: str
    output: str
    eod_token: str = EOD_TOKEN
    workers: int = 1
    shard_bytes: int = DEFAULT_SHARD_BYTES
    include_subsets: Tuple[str, ...] = ()
    exclude_subsets: Tuple[str, ...] = ()
    strict: bool = False
    keep_shards: bool = False
    restart: bool = False
    progress: bool = True


@dataclass(frozen=True)
class _Job:
    """What a worker needs besides the shard itself (small, pickled with every task)."""

    reader: str
    tokenizer: str
    eod_token: str
    include: Tuple[str, ...]
    exclude: Tuple[str, ...]
    strict: bool

    def keeps(self, subset: str) -> bool:
        name = subset or NO_SUBSET
        return (not self.include or name in self.include) and name not in self.exclude


@dataclass(frozen=True)
class _Task:
    shard_id: str
    path: str
    split: Split
    prefix: str


@dataclass
class _Result:
    shard_id: str
    stats: Stats
    output: OutputInfo


@dataclass
class BuildResult:
    """A finished build: the output, its counts, and how much of it an earlier run had done."""

    reader: str
    prefix: str
    output: OutputInfo
    stats: Stats
    dtype: str
    eod: int
    shards: int
    reused_shards: int
    inputs: int = 0
    notes: List[str] = field(default_factory=list)

    def report(self) -> str:
        """Human-readable summary: per-subset counts, skipped records, filtered subsets."""
        lines = [f"{self.reader}: {self.prefix}.bin/.idx - {self.output.documents:,} documents, "
                 f"{self.output.tokens:,} tokens ({self.dtype}, EOD id {self.eod})",
                 f"inputs: {self.inputs} files, {self.shards} shards "
                 f"({self.reused_shards} reused from an earlier run)"]
        total = max(self.stats.tokens, 1)
        rows = [(name, docs, tokens, f"{100 * tokens / total:.1f}%")
                for name, (docs, tokens) in sorted(self.stats.subsets.items())]
        rows.append(("total", self.stats.documents, self.stats.tokens, "100.0%"))
        lines.append(format_table(("subset", "documents", "tokens", "share"), rows))
        if self.stats.skipped:
            lines.append("skipped records (not in the output): " + ", ".join(
                f"{reason} {count:,}" for reason, count in sorted(self.stats.skipped.items())))
            lines.extend(f"  e.g. {messages[0]}"
                         for _, messages in sorted(self.stats.examples.items()) if messages)
        else:
            lines.append("skipped records: none")
        if self.stats.filtered:
            lines.append("filtered out by subset: " + ", ".join(
                f"{name} {count:,}" for name, count in sorted(self.stats.filtered.items())))
        return "\n".join(lines + self.notes)


def build(spec: BuildSpec) -> BuildResult:
    """Build (or resume, or find already built) the indexed dataset ``spec.output``."""
    reader = get_reader(spec.reader)
    inputs = reader.expand(spec.inputs)
    tokenizer = load_tokenizer(spec.tokenizer, spec.eod_token)
    output = os.path.abspath(spec.output)
    work_dir = output + ".shards"
    config = _config(spec, inputs, tokenizer)
    os.makedirs(work_dir, exist_ok=True)
    lock = FileLock(os.path.join(work_dir, "lock"), wait=False)
    try:
        manifest = Manifest.open(work_dir, config, spec.restart)
        if spec.restart:
            remove_outputs([output])
        merged = manifest.merged
        if merged and output_intact(output, merged["output"]):
            result = _result(spec, output, tokenizer, merged, len(inputs))
            result.notes.append("already built by an earlier run: nothing to do")
            return result
        manifest.merged = None
        manifest.remove_temp_files()
        return _build(spec, reader, inputs, tokenizer, output, manifest)
    finally:
        lock.release()


def _build(spec: BuildSpec, reader: Reader, inputs: List[str], tokenizer: TextTokenizer,
           output: str, manifest: Manifest) -> BuildResult:
    job = _Job(spec.reader, tokenizer.path, spec.eod_token, tuple(spec.include_subsets),
               tuple(spec.exclude_subsets), spec.strict)
    totals = Stats()
    progress = _Progress(spec.progress, f"{spec.reader} -> {os.path.basename(output)}")

    def tasks() -> Iterator[_Task]:
        for file_index, path in enumerate(inputs):
            file_issues = IssueLog(spec.strict)
            shards = 0
            for split in reader.split(path, spec.shard_bytes, file_issues):
                sid = shard_id(file_index, shards)
                shards += 1
                entry = manifest.finished(sid, split.locator)
                if entry is not None:
                    stats = Stats.from_json(entry["stats"])
                    if spec.strict and stats.skipped:
                        first = next(m for ms in stats.examples.values() for m in ms)
                        raise BadRecordError(f"{first} (found by an earlier run; --strict: "
                                            "stopping)")
                    totals.update(stats)
                    progress.reused()
                    continue
                manifest.start_shard(sid, path, split.locator)
                yield _Task(sid, path, split, manifest.shard_prefix(sid))
            file_stats = Stats(skipped=file_issues.counts, examples=file_issues.examples)
            _log_examples(file_stats)
            totals.update(file_stats)
            manifest.record_file(file_index, path, shards, file_stats)

    def on_result(result: _Result) -> None:
        _log_examples(result.stats)
        totals.update(result.stats)
        manifest.finish_shard(result.shard_id, result.stats, result.output)
        progress.add(result.output.documents, result.output.tokens)

    try:
        _run(tasks(), job, spec.workers, on_result)
    finally:
        manifest.save(force=True)
        progress.close()
    if not totals.documents:
        raise InputError(f"{spec.reader}: no documents left to write (skipped: {totals.skipped}, "
                         f"filtered: {totals.filtered}); see the messages above")
    shard_prefixes = manifest.complete_shard_prefixes()
    info = merge_indexed_datasets(shard_prefixes, output)
    manifest.merged = {"output": info.to_json(), "stats": totals.to_json(),
                       "shards": len(shard_prefixes), "reused_shards": progress.reused_shards}
    if not spec.keep_shards:
        remove_outputs(shard_prefixes)
    return _result(spec, output, tokenizer, manifest.merged, len(inputs))


def _config(spec: BuildSpec, inputs: List[str], tokenizer: TextTokenizer) -> Dict[str, object]:
    """What a build's output depends on; a resume is refused if any of it changed."""
    files = []
    for path in inputs:
        stat = os.stat(path)
        files.append({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"reader": spec.reader, "inputs": files, "shard_bytes": spec.shard_bytes,
            "tokenizer_sha256": file_sha256(tokenizer.path), "eod_token": spec.eod_token,
            "eod_id": tokenizer.eod, "dtype": np.dtype(tokenizer.dtype).name,
            "include_subsets": sorted(spec.include_subsets),
            "exclude_subsets": sorted(spec.exclude_subsets)}


def _result(spec: BuildSpec, output: str, tokenizer: TextTokenizer, merged: Dict,
            inputs: int) -> BuildResult:
    return BuildResult(spec.reader, output, OutputInfo(**merged["output"]),
                       Stats.from_json(merged["stats"]), np.dtype(tokenizer.dtype).name,
                       tokenizer.eod, merged["shards"], merged["reused_shards"], inputs)


# ---------------------------------------------------------------- worker side

_TOKENIZERS: Dict[Tuple[str, str], TextTokenizer] = {}


def _process_shard(task: _Task, job: _Job) -> _Result:
    """Parse, filter, tokenise and write one shard (runs in a worker process)."""
    key = (job.tokenizer, job.eod_token)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(*key)
    tokenizer = _TOKENIZERS[key]
    issues = IssueLog(job.strict)
    stats = Stats()
    writer = IndexedDatasetWriter(task.prefix, tokenizer.dtype)
    try:
        documents = get_reader(job.reader).read(task.path, task.split, issues)
        for batch in _batches(documents, job, stats):
            ids = tokenizer.encode_documents([doc.text for doc in batch])
            writer.add_documents(ids)
            for doc, doc_ids in zip(batch, ids):
                stats.add_document(doc.subset, len(doc_ids))
        output = writer.finalize()
    except BaseException:
        writer.abort()
        raise
    stats.skipped, stats.examples = issues.counts, issues.examples
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    return _Result(task.shard_id, stats, output)


def _batches(documents: Iterable[Document], job: _Job, stats: Stats) -> Iterator[List[Document]]:
    """Kept documents in batches of bounded size (for batch encoding)."""
    batch: List[Document] = []
    chars = 0
    for doc in documents:
        if not job.keeps(doc.subset):
            stats.add_filtered(doc.subset)
            continue
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _init_worker() -> None:
    """Workers run one tokenizer thread each and die with the main process (Linux), so a
    killed run leaves no orphans behind."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _run(tasks: Iterator[_Task], job: _Job, workers: int,
         on_result: Callable[[_Result], None]) -> None:
    """Process tasks in-process (workers <= 1) or on a pool, at most 2 * workers in flight."""
    if workers <= 1:
        for task in tasks:
            on_result(_process_shard(task, job))
        return
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)
    pending: Set[Future] = set()

    def drain(limit: int) -> None:
        nonlocal pending
        while len(pending) > limit:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_result(future.result())

    try:
        for task in tasks:
            drain(2 * workers - 1)
            pending.add(executor.submit(_process_shard, task, job))
        drain(0)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """tqdm bar of documents with tokens/s; reused shards are counted, not timed."""

    def __init__(self, enabled: bool, label: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(desc=label, unit="doc", unit_scale=True, disable=not enabled,
                         mininterval=0.5, dynamic_ncols=True)
        self._start = time.monotonic()
        self._tokens = 0
        self.processed_shards = 0
        self.reused_shards = 0

    def reused(self) -> None:
        self.reused_shards += 1

    def add(self, documents: int, tokens: int) -> None:
        self.processed_shards += 1
        self._tokens += tokens
        rate = self._tokens / max(time.monotonic() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{rate:,.0f} tok/s, shards {self.processed_shards} new "
                                  f"+ {self.reused_shards} reused", refresh=False)
        self._bar.update(documents)

    def close(self) -> None:
        self._bar.close()


def _log_examples(stats: Stats) -> None:
    for reason, messages in sorted(stats.examples.items()):
        for message in messages:
            logger.warning("data_prep: %s", message)
        more = stats.skipped.get(reason, 0) - len(messages)
        if more > 0:
            logger.warning("data_prep: ... and %d more %s record(s) there (counted in the "
                           "summary)", more, reason)
