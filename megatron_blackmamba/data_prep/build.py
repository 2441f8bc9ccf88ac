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
from .tasks import (
    TaskSpec,
    all_task_states,
    check_plan,
    finalize_problems,
    lock_task,
    merged_intact,
    ordered_shard_prefixes,
    task_files,
)
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
    reader_options: Tuple[Tuple[str, str], ...] = ()  # jsonl: text_key; pg19: split
    task: TaskSpec = TaskSpec()
    finalize: bool = False


@dataclass(frozen=True)
class _Job:
    """What a worker needs besides the shard itself (small, pickled with every task)."""

    reader: str
    reader_options: Tuple[Tuple[str, str], ...]
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
        lines = [
            (
                f"{self.reader}: {self.prefix}.bin/.idx - {self.output.documents:,} documents, "
                f"{self.output.tokens:,} tokens ({self.dtype}, EOD id {self.eod})"
            ),
            (
                f"inputs: {self.inputs} files, {self.shards} shards "
                f"({self.reused_shards} reused from an earlier run)"
            ),
        ]
        return "\n".join(lines + stats_lines(self.stats) + self.notes)


@dataclass
class TaskResult:
    """One finished task of a multi-task build (its shards; the merge is ``--finalize``'s)."""

    reader: str
    prefix: str
    task: TaskSpec
    files: int
    shards: int
    reused_shards: int
    stats: Stats
    notes: List[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [
            (
                f"{self.reader}: {self.task.name} of {self.prefix} - {self.files} input files,"
                f" {self.shards} shards ({self.reused_shards} reused), {self.stats.documents:,}"
                f" documents, {self.stats.tokens:,} tokens"
            ),
            "run the same command with --finalize once every task is complete",
        ]
        return "\n".join(lines + stats_lines(self.stats) + self.notes)


def stats_lines(stats: Stats) -> List[str]:
    """Per-subset counts, skipped records with an example each, filtered subsets."""
    total = max(stats.tokens, 1)
    rows = [
        (name, docs, tokens, f"{100 * tokens / total:.1f}%")
        for name, (docs, tokens) in sorted(stats.subsets.items())
    ]
    rows.append(("total", stats.documents, stats.tokens, "100.0%"))
    lines = [format_table(("subset", "documents", "tokens", "share"), rows)]
    if stats.skipped:
        lines.append(
            "skipped records (not in the output): "
            + ", ".join(f"{reason} {count:,}" for reason, count in sorted(stats.skipped.items()))
        )
        lines.extend(
            f"  e.g. {messages[0]}" for _, messages in sorted(stats.examples.items()) if messages
        )
    else:
        lines.append("skipped records: none")
    if stats.filtered:
        lines.append(
            "filtered out by subset: "
            + ", ".join(f"{name} {count:,}" for name, count in sorted(stats.filtered.items()))
        )
    if stats.titled:
        lines.append(
            f"titled from the corpus metadata: {stats.titled:,} of {stats.documents:,} documents"
        )
    return lines


def build(spec: BuildSpec) -> BuildResult | TaskResult:
    """Build (or resume, or find already built) the indexed dataset ``spec.output``; with
    ``spec.task.count > 1`` only this task's part, and with ``spec.finalize`` the merge of all."""
    reader = get_reader(spec.reader, **dict(spec.reader_options))
    inputs = reader.expand(spec.inputs)
    tokenizer = load_tokenizer(spec.tokenizer, spec.eod_token)
    output = os.path.abspath(spec.output)
    work_dir = output + ".shards"
    config = _config(spec, inputs, tokenizer)
    os.makedirs(work_dir, exist_ok=True)
    if spec.task.count > 1 and spec.restart:
        raise InputError(
            f"--restart discards the whole build: remove {work_dir} once, then submit the tasks"
            " again"
        )
    if spec.finalize:
        return _finalize(spec, inputs, tokenizer, output, work_dir, config)
    if spec.task.count > 1:
        return _build_task(spec, reader, inputs, tokenizer, output, work_dir, config)
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
        if os.path.exists(os.path.join(work_dir, "plan.json")):
            raise InputError(
                f"{work_dir} holds a build split into tasks: rerun with its --num-tasks, or "
                "--finalize, or --restart to discard it"
            )
        manifest.merged = None
        manifest.remove_temp_files()
        totals, progress = _build_shards(
            spec, reader, inputs, range(len(inputs)), tokenizer, manifest
        )
        return _merge(
            spec,
            tokenizer,
            output,
            len(inputs),
            manifest.complete_shard_prefixes(),
            totals,
            progress.reused_shards,
            manifest,
        )
    finally:
        lock.release()


def _build_task(
    spec: BuildSpec,
    reader: Reader,
    inputs: List[str],
    tokenizer: TextTokenizer,
    output: str,
    work_dir: str,
    config: Dict[str, object],
) -> TaskResult:
    """This task's files into its own folder; the merge waits for ``--finalize``."""
    check_plan(work_dir, output, config, spec.task.count, create=True)
    if merged_intact(work_dir, output):
        raise InputError(f"{output}.bin/.idx is already finalized from every task: nothing to do")
    folder, lock = lock_task(work_dir, spec.task)
    try:
        manifest = Manifest.open(
            folder, {**config, "task": [spec.task.index, spec.task.count]}, False
        )
        manifest.remove_temp_files()
        files = task_files(config, spec.task)
        totals, progress = _build_shards(spec, reader, inputs, files, tokenizer, manifest)
        manifest.complete_shard_prefixes(files)  # every shard there, or a clear error
        manifest.complete = True
        return TaskResult(
            spec.reader,
            output,
            spec.task,
            len(files),
            progress.processed_shards + progress.reused_shards,
            progress.reused_shards,
            totals,
        )
    finally:
        lock.release()


def _finalize(
    spec: BuildSpec,
    inputs: List[str],
    tokenizer: TextTokenizer,
    output: str,
    work_dir: str,
    config: Dict[str, object],
) -> BuildResult:
    """Merge every task's shards in input order, once all tasks are complete."""
    lock = FileLock(os.path.join(work_dir, "lock"), wait=False)
    try:
        manifest = Manifest.open(work_dir, config, False)
        merged = manifest.merged
        if merged and output_intact(output, merged["output"]):
            result = _result(spec, output, tokenizer, merged, len(inputs))
            result.notes.append("already finalized by an earlier run: nothing to do")
            return result
        plan = check_plan(
            work_dir, output, config, spec.task.count if spec.task.count > 1 else None, create=False
        )
        states = all_task_states(work_dir, config, plan["num_tasks"])
        problems = finalize_problems(states)
        if problems:
            raise InputError(
                f"cannot finalize {output}: {len(problems)} of {len(states)} tasks are not "
                "complete\n  " + "\n  ".join(problems)
            )
        totals = Stats()
        for state in states:
            totals.update(state.stats)
        prefixes = ordered_shard_prefixes(work_dir, config, plan["num_tasks"])
        return _merge(spec, tokenizer, output, len(inputs), prefixes, totals, 0, manifest)
    finally:
        lock.release()


def _merge(
    spec: BuildSpec,
    tokenizer: TextTokenizer,
    output: str,
    n_inputs: int,
    shard_prefixes: List[str],
    totals: Stats,
    reused: int,
    manifest: Manifest,
) -> BuildResult:
    if not totals.documents:
        raise InputError(
            f"{spec.reader}: no documents left to write (skipped: {totals.skipped}, "
            f"filtered: {totals.filtered}); see the messages above"
        )
    info = merge_indexed_datasets(shard_prefixes, output)
    manifest.merged = {
        "output": info.to_json(),
        "stats": totals.to_json(),
        "shards": len(shard_prefixes),
        "reused_shards": reused,
    }
    if not spec.keep_shards:
        remove_outputs(shard_prefixes)
    return _result(spec, output, tokenizer, manifest.merged, n_inputs)


def _build_shards(
    spec: BuildSpec,
    reader: Reader,
    inputs: List[str],
    file_indices: Iterable[int],
    tokenizer: TextTokenizer,
    manifest: Manifest,
) -> Tuple[Stats, "_Progress"]:
    """Every shard of the files ``file_indices`` (into ``inputs``) built or reused; returns the
    counts of them all."""
    job = _Job(
        spec.reader,
        spec.reader_options,
        tokenizer.path,
        spec.eod_token,
        tuple(spec.include_subsets),
        tuple(spec.exclude_subsets),
        spec.strict,
    )
    totals = Stats()
    label = os.path.basename(spec.output) + (f" {spec.task.name}" if spec.task.count > 1 else "")
    progress = _Progress(spec.progress, f"{spec.reader} -> {label}")

    def tasks() -> Iterator[_Task]:
        for file_index in file_indices:
            path = inputs[file_index]
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
                        raise BadRecordError(
                            f"{first} (found by an earlier run; --strict: stopping)"
                        )
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
    return totals, progress


def _config(spec: BuildSpec, inputs: List[str], tokenizer: TextTokenizer) -> Dict[str, object]:
    """What a build's output depends on; a resume is refused if any of it changed."""
    files = []
    for path in inputs:
        stat = os.stat(path)
        files.append({"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    options = {"reader_options": dict(spec.reader_options)} if spec.reader_options else {}
    return {
        "reader": spec.reader,
        **options,
        "inputs": files,
        "shard_bytes": spec.shard_bytes,
        "tokenizer_sha256": file_sha256(tokenizer.path),
        "eod_token": spec.eod_token,
        "eod_id": tokenizer.eod,
        "dtype": np.dtype(tokenizer.dtype).name,
        "include_subsets": sorted(spec.include_subsets),
        "exclude_subsets": sorted(spec.exclude_subsets),
    }


def _result(
    spec: BuildSpec, output: str, tokenizer: TextTokenizer, merged: Dict, inputs: int
) -> BuildResult:
    return BuildResult(
        spec.reader,
        output,
        OutputInfo(**merged["output"]),
        Stats.from_json(merged["stats"]),
        np.dtype(tokenizer.dtype).name,
        tokenizer.eod,
        merged["shards"],
        merged["reused_shards"],
        inputs,
    )


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
        documents = get_reader(job.reader, **dict(job.reader_options)).read(
            task.path, task.split, issues
        )
        for batch in _batches(documents, job, stats):
            ids = tokenizer.encode_documents([doc.text for doc in batch])
            writer.add_documents(ids)
            for doc, doc_ids in zip(batch, ids):
                stats.add_document(doc.subset, len(doc_ids))
                stats.titled += bool(doc.title)
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


def _run(
    tasks: Iterator[_Task], job: _Job, workers: int, on_result: Callable[[_Result], None]
) -> None:
    """Process tasks in-process (workers <= 1) or on a pool, at most 2 * workers in flight."""
    if workers <= 1:
        for task in tasks:
            on_result(_process_shard(task, job))
        return
    executor = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
    )
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

        self._bar = tqdm(
            desc=label,
            unit="doc",
            unit_scale=True,
            disable=not enabled,
            mininterval=0.5,
            dynamic_ncols=True,
        )
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
        self._bar.set_postfix_str(
            f"{rate:,.0f} tok/s, shards {self.processed_shards} new + {self.reused_shards} reused",
            refresh=False,
        )
        self._bar.update(documents)

    def close(self) -> None:
        self._bar.close()


def _log_examples(stats: Stats) -> None:
    for reason, messages in sorted(stats.examples.items()):
        for message in messages:
            logger.warning("data_prep: %s", message)
        more = stats.skipped.get(reason, 0) - len(messages)
        if more > 0:
            logger.warning(
                "data_prep: ... and %d more %s record(s) there (counted in the summary)",
                more,
                reason,
            )
