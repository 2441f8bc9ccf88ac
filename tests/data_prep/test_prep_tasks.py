"""A build split into tasks (as a SLURM job array runs it), then finalized: byte-identical to a
one-task build for any task count, refused until every task is complete, safe to kill and rerun,
one process per task."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_blackmamba.data_prep.tasks import assign_files

from .prep_helpers import (
    REPO,
    build_args,
    jsonl_bytes,
    make_texts,
    pile_records,
    run_cli,
    write_compressed,
)


@pytest.fixture()
def corpus(tmp_path) -> str:
    """Five files of uneven size (so the byte-balanced assignment matters)."""
    for k, count in enumerate((50, 10, 80, 30, 40)):
        texts = make_texts(count, 40 + k)
        write_compressed(
            tmp_path / "raw" / f"{k:02d}.jsonl.zst",
            jsonl_bytes(pile_records(texts, ["ArXiv", "Github"] * count)),
        )
    return str(tmp_path / "raw" / "*.jsonl.zst")


def _array_env(count: int, index: int, **extra: str) -> dict:
    """What SLURM sets in one element of `sbatch --array=0-(count-1)`."""
    return {
        "SLURM_ARRAY_JOB_ID": "777",
        "SLURM_ARRAY_TASK_ID": str(index),
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": str(count - 1),
        "SLURM_ARRAY_TASK_COUNT": str(count),
        **extra,
    }


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_blackmamba.data_prep", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _files(prefix: Path) -> list[bytes]:
    return [Path(str(prefix) + ext).read_bytes() for ext in (".bin", ".idx")]


def test_assignment_is_contiguous_balanced_and_covers_every_file():
    sizes = [100, 1, 1, 300, 50, 50, 200, 10]
    for count in (1, 2, 3, 8, 20):
        owners = assign_files(sizes, count)
        assert owners == sorted(owners) and all(0 <= o < count for o in owners)
    assert assign_files(sizes, 2) == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("count", [3])
def test_tasks_started_at_once_then_finalized_equal_one_build(
    tmp_path, corpus, tokenizer_path, count
):
    reference = run_cli(*build_args(corpus, tokenizer_path, tmp_path / "one" / "out"))
    assert reference.returncode == 0, reference.stderr
    output = tmp_path / "tasks" / "out"

    early = run_cli(*build_args(corpus, tokenizer_path, output, "--finalize"))
    assert early.returncode == 1 and "no task of this build has started" in early.stderr
    first = [
        _start(build_args(corpus, tokenizer_path, output), _array_env(count, i)) for i in (0, 2)
    ]
    assert [p.wait(120) for p in first] == [0, 0], [p.stderr.read() for p in first]
    refused = run_cli(*build_args(corpus, tokenizer_path, output, "--finalize"))
    assert refused.returncode == 1
    assert f"1 of {count} tasks are not complete" in refused.stderr
    assert "task-00001-of-00003: never started" in refused.stderr and ".jsonl.zst" in refused.stderr
    status = run_cli("status", str(output))
    assert (
        status.returncode == 0
        and "2 of 3 task(s) complete" in status.stdout
        and "not started" in status.stdout
    )

    last = _start(build_args(corpus, tokenizer_path, output), _array_env(count, 1))
    assert last.wait(120) == 0, last.stderr.read()
    done = run_cli(*build_args(corpus, tokenizer_path, output, "--finalize"))
    assert done.returncode == 0, done.stderr
    assert _files(output) == _files(tmp_path / "one" / "out")
    # counts and the per-subset table are the one-task build's
    assert done.stdout.splitlines()[2:] == reference.stdout.splitlines()[2:]
    assert "finalized: yes" in run_cli("status", str(output)).stdout


def _done_shards(manifest: Path) -> int:
    try:
        return sum(
            s["status"] == "done" for s in json.loads(manifest.read_text())["shards"].values()
        )
    except (OSError, ValueError):
        return 0


def test_a_killed_task_reruns_and_a_second_process_is_refused(tmp_path, corpus, tokenizer_path):
    output = tmp_path / "run" / "out"
    env = _array_env(2, 0, DATA_PREP_TEST_SHARD_DELAY="0.3")
    victim = _start(build_args(corpus, tokenizer_path, output), env)
    manifest = Path(f"{output}.shards") / "task-00000-of-00002" / "manifest.json"
    deadline = time.monotonic() + 60
    while _done_shards(manifest) < 2 and victim.poll() is None:
        assert time.monotonic() < deadline, "the task never recorded a finished shard"
        time.sleep(0.05)
    twin = run_cli(*build_args(corpus, tokenizer_path, output), env=_array_env(2, 0))
    assert twin.returncode == 1 and "being built by another process" in twin.stderr
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL

    for index in (0, 1):
        rerun = run_cli(*build_args(corpus, tokenizer_path, output), env=_array_env(2, index))
        assert rerun.returncode == 0, rerun.stderr
        if index == 0:  # the killed task keeps the shards it had finished
            assert int(re.search(r"\((\d+) reused\)", rerun.stdout).group(1)) >= 2
    assert run_cli(*build_args(corpus, tokenizer_path, output, "--finalize")).returncode == 0
    reference = run_cli(*build_args(corpus, tokenizer_path, tmp_path / "one" / "out"))
    assert reference.returncode == 0
    assert _files(output) == _files(tmp_path / "one" / "out")


def test_tasks_refuse_another_tasks_state_seen_under_another_path(tmp_path, corpus, tokenizer_path):
    output = tmp_path / "shared" / "out"
    assert (
        run_cli(*build_args(corpus, tokenizer_path, output), env=_array_env(2, 0)).returncode == 0
    )
    plan = Path(f"{output}.shards") / "plan.json"
    data = json.loads(plan.read_text())
    data["output"] = (
        "/node-local/scratch/out"  # as a task on a node with another mount would see it
    )
    plan.write_text(json.dumps(data))
    result = run_cli(*build_args(corpus, tokenizer_path, output), env=_array_env(2, 1))
    assert (
        result.returncode == 1 and "every task must see one shared output folder" in result.stderr
    )
    other_count = run_cli(
        *build_args(corpus, tokenizer_path, tmp_path / "x" / "out", "--num-tasks", "2")
    )
    assert other_count.returncode == 0
    changed = run_cli(
        *build_args(
            corpus, tokenizer_path, tmp_path / "x" / "out", "--num-tasks", "3", "--task-index", "0"
        )
    )
    assert changed.returncode == 1 and "started with --num-tasks 2, not 3" in changed.stderr
    bad_index = run_cli(
        *build_args(
            corpus, tokenizer_path, tmp_path / "y" / "out", "--num-tasks", "3", "--task-index", "3"
        )
    )
    assert bad_index.returncode == 1 and "--task-index 3 must be in 0..2" in bad_index.stderr


def test_generic_jsonl_reader_with_megatron_aliases(tmp_path, tokenizer_path, hf_tokenizer):
    """FineWeb-style records (text under 'content') in .jsonl.gz and .json.gz, built with
    Megatron's --json-keys / --output-prefix; a bad line is skipped and counted."""
    texts = make_texts(12, 7)
    lines = [
        json.dumps({"content": t, "url": f"http://x/{i}"}).encode() for i, t in enumerate(texts)
    ]
    write_compressed(tmp_path / "in" / "a.jsonl.gz", b"\n".join(lines[:6]) + b"\n{not json\n")
    write_compressed(tmp_path / "in" / "b.json.gz", b"\n".join(lines[6:]) + b"\n")
    result = run_cli(
        "build",
        "--input",
        str(tmp_path / "in"),
        "--tokenizer",
        tokenizer_path,
        "--json-keys",
        "content",
        "--output-prefix",
        str(tmp_path / "out" / "fineweb"),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    prefix = tmp_path / "out" / "fineweb_content_document"  # Megatron's naming rule
    from .prep_helpers import expected_ids, read_documents

    assert read_documents(str(prefix)) == expected_ids(hf_tokenizer, texts)
    assert "invalid_json 1" in result.stdout
    missing = run_cli(
        "build",
        "--input",
        str(tmp_path / "in"),
        "--tokenizer",
        tokenizer_path,
        "--text-key",
        "body",
        "--output",
        str(tmp_path / "o2"),
        "--no-progress",
    )
    assert (
        missing.returncode == 1
        and "no documents left" in missing.stderr
        and "no string 'body'" in missing.stderr
    )
    two = run_cli(
        "build",
        "--input",
        str(tmp_path / "in"),
        "--tokenizer",
        tokenizer_path,
        "--json-keys",
        "a",
        "b",
        "--output-prefix",
        str(tmp_path / "o3"),
    )
    assert two.returncode == 1 and "run once per key" in two.stderr


def test_pg19_root_folder_reads_one_split_with_titles(tmp_path, tokenizer_path):
    from .prep_helpers import write_pg19

    write_pg19(
        tmp_path / "pg19",
        "train",
        {"10": b"A fine book.", "11": b"\xff bad", "12": b"Another one."},
    )
    write_pg19(tmp_path / "pg19", "validation", {"20": b"A held-out book."})
    result = run_cli(
        "build",
        "--reader",
        "pg19",
        "--input",
        str(tmp_path / "pg19"),
        "--tokenizer",
        tokenizer_path,
        "--output",
        str(tmp_path / "out" / "train"),
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^train +2 ", result.stdout, re.M)  # the split is the subset
    assert "non_utf8 1" in result.stdout and "Title of 11, a novel" in result.stdout + result.stderr
    assert "titled from the corpus metadata: 2 of 2 documents" in result.stdout
    valid = run_cli(
        "build",
        "--reader",
        "pg19",
        "--input",
        str(tmp_path / "pg19"),
        "--split",
        "validation",
        "--tokenizer",
        tokenizer_path,
        "--output",
        str(tmp_path / "out" / "valid"),
        "--no-progress",
    )
    assert valid.returncode == 0 and "1 of 1 documents" in valid.stdout
    wrong = run_cli(
        "build",
        "--reader",
        "pg19",
        "--input",
        str(tmp_path / "pg19"),
        "--split",
        "dev",
        "--tokenizer",
        tokenizer_path,
        "--output",
        str(tmp_path / "out" / "x"),
    )
    assert wrong.returncode == 1 and "PG-19's splits are train, validation, test" in wrong.stderr
