"""Resumability and determinism: a SIGKILLed build rerun with the same command reuses finished
shards and ends byte-identical to an uninterrupted build; worker count and shard size never
change the output."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_blackmamba.data_prep.build import BuildSpec, build

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
    names = ["Pile-CC", "ArXiv", "Github"]
    for k in range(3):
        texts = make_texts(60, 20 + k)
        write_compressed(
            tmp_path / "raw" / f"{k:02d}.jsonl.zst",
            jsonl_bytes(pile_records(texts, [names[i % 3] for i in range(60)])),
        )
    return str(tmp_path / "raw" / "*.jsonl.zst")


def _files(prefix: Path):
    return [Path(str(prefix) + ext).read_bytes() for ext in (".bin", ".idx")]


def _done_shards(manifest: Path) -> int:
    try:
        shards = json.loads(manifest.read_text())["shards"].values()
    except (OSError, ValueError):
        return 0
    return sum(s["status"] == "done" for s in shards)


def test_kill_and_resume_is_byte_identical(tmp_path, corpus, tokenizer_path):
    reference = run_cli(*build_args(corpus, tokenizer_path, tmp_path / "ref" / "out"))
    assert reference.returncode == 0, reference.stderr
    total = int(re.search(r"(\d+) shards", reference.stdout).group(1))
    assert total >= 20

    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    threshold = rng.randint(2, total // 3)
    output = tmp_path / "run" / "out"
    args = build_args(corpus, tokenizer_path, output, "--workers", "2")
    env = dict(os.environ, PYTHONPATH=str(REPO), DATA_PREP_TEST_SHARD_DELAY="0.3")
    victim = subprocess.Popen(
        [sys.executable, "-m", "megatron_blackmamba.data_prep", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    manifest = Path(str(output) + ".shards") / "manifest.json"
    deadline = time.monotonic() + 60
    while _done_shards(manifest) < threshold and victim.poll() is None:
        assert time.monotonic() < deadline, "the build never recorded finished shards"
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 0.5))
    os.killpg(victim.pid, signal.SIGKILL)  # the CLI and its workers: a hard crash
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, f"finished before the kill (seed {seed})"
    assert not Path(str(output) + ".idx").exists()
    done_before = _done_shards(manifest)

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    reused = int(re.search(r"\((\d+) reused", resumed.stdout).group(1))
    assert done_before <= reused < total, (seed, done_before, reused)
    print(f"kill after {done_before} done shards; rerun reused {reused} of {total} (seed {seed})")
    assert _files(output) == _files(tmp_path / "ref" / "out"), f"seed {seed}"
    assert sorted(os.listdir(Path(str(output) + ".shards"))) == ["lock", "manifest.json"]


def test_output_independent_of_workers_and_shard_size(tmp_path, corpus, tokenizer_path):
    outputs = []
    for workers, shard_bytes in ((1, 2000), (2, 2000), (2, 5000), (1, 1 << 20)):
        prefix = tmp_path / f"w{workers}-s{shard_bytes}"
        build(
            BuildSpec(
                reader="pile",
                inputs=(corpus,),
                tokenizer=tokenizer_path,
                output=str(prefix),
                workers=workers,
                shard_bytes=shard_bytes,
                progress=False,
            )
        )
        outputs.append(_files(prefix))
    assert all(o == outputs[0] for o in outputs[1:])


def test_rerun_is_a_no_op_and_settings_changes_are_refused(tmp_path, corpus, tokenizer_path):
    args = build_args(corpus, tokenizer_path, tmp_path / "out")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    again = run_cli(*args)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    changed = run_cli(*args, "--exclude-subset", "Github")
    assert changed.returncode == 1
    assert "different exclude_subsets" in changed.stderr and "--restart" in changed.stderr
    restarted = run_cli(*args, "--exclude-subset", "Github", "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert "(0 reused" in restarted.stdout and "filtered out by subset: Github" in restarted.stdout


def test_merge_cli(tmp_path, corpus, tokenizer_path):
    whole = build(
        BuildSpec(
            reader="pile",
            inputs=(corpus,),
            tokenizer=tokenizer_path,
            output=str(tmp_path / "whole"),
            shard_bytes=3000,
            keep_shards=True,
            progress=False,
        )
    )
    assert whole.shards > 3
    manifest = str(tmp_path / "whole.shards" / "manifest.json")
    merged = run_cli("merge", "--output", str(tmp_path / "again"), "--manifest", manifest)
    assert merged.returncode == 0, merged.stderr
    assert _files(tmp_path / "again") == _files(tmp_path / "whole")
    twice = run_cli(
        "merge",
        "--output",
        str(tmp_path / "twice"),
        str(tmp_path / "whole"),
        str(tmp_path / "again"),
    )
    assert twice.returncode == 0 and f"{2 * whole.output.documents:,} documents" in twice.stdout
    (tmp_path / "whole.shards" / "f00000-s000001.bin").unlink()
    broken = run_cli("merge", "--output", str(tmp_path / "x"), "--manifest", manifest)
    assert (
        broken.returncode == 1
        and "f00000-s000001 is unfinished or its files are gone" in broken.stderr
    )


def test_readers_cli():
    listed = run_cli("readers")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        "pile",
        "slimpajama",
        "starcoder",
        "pes2o",
        "proofpile",
        "pg19",
        "jsonl",
    ]
