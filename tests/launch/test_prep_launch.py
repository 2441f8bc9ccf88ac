"""The data-preparation launchers: one job array per source plus an afterok finalize, a blend
job after every source, and the batch script itself run as array elements (simulated SLURM)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.data_prep.prep_helpers import jsonl_bytes, make_texts, pile_records, write_compressed

REPO = Path(__file__).resolve().parents[2]
PREP = REPO / "launch" / "prep.sbatch"
SUBMIT = REPO / "launch" / "prep_submit.sh"
MIXTURE = REPO / "configs" / "data" / "blackmamba_paper_mixture.yaml"


def _submit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SUBMIT), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def _sbatch_lines(stderr: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in stderr.splitlines() if line.startswith("sbatch ")]


def test_one_source_is_an_array_then_an_afterok_finalize():
    result = _submit(
        "--tasks",
        "8",
        "--cpus",
        "32",
        "build",
        "--reader",
        "pile",
        "--input",
        "/d/*.zst",
        "--tokenizer",
        "/t.json",
        "--output",
        "/shared/bin/pile",
    )
    assert result.returncode == 0, result.stderr
    array, final = _sbatch_lines(result.stderr)
    assert {"--array=0-7", "--cpus-per-task=32", "--job-name=prep-pile", str(PREP)} <= set(array)
    assert array[array.index(str(PREP)) + 1 :] == [
        "--reader",
        "pile",
        "--input",
        "/d/*.zst",
        "--tokenizer",
        "/t.json",
        "--output",
        "/shared/bin/pile",
    ]
    assert "--dependency=afterok:<prep-pile>" in final and final[-1] == "--finalize"


def test_a_mixture_is_one_array_and_finalize_per_source_then_the_blend():
    result = _submit(
        "--tasks",
        "4",
        "mixture",
        str(MIXTURE),
        "--output-dir",
        "/shared/bin",
        "--tokenizer",
        "/t.json",
    )
    assert result.returncode == 0, result.stderr
    jobs = _sbatch_lines(result.stderr)
    names = ["pile", "slimpajama", "starcoder", "pes2o", "proofpile", "pg19"]
    assert len(jobs) == 2 * len(names) + 1
    for i, name in enumerate(names):
        assert f"--job-name=prep-{name}" in jobs[2 * i] and "--array=0-3" in jobs[2 * i]
        assert f"--output=/shared/bin/{name}/{name}_text_document" in " ".join(jobs[2 * i]).replace(
            "--output ", "--output="
        )
        assert f"--dependency=afterok:<prep-{name}>" in jobs[2 * i + 1]
    blend = jobs[-1]
    deps = next(a for a in blend if a.startswith("--dependency="))
    assert deps == "--dependency=afterok:" + ":".join(f"<prep-{n}-finalize>" for n in names)
    wrap = next(a for a in blend if a.startswith("--wrap="))
    assert "mixture" in wrap and "--summary-only" in wrap and str(MIXTURE) in wrap


def test_submit_refuses_bad_usage():
    assert _submit("--tasks", "0", "build").returncode != 0
    assert "unknown option" in _submit("--frobnicate", "build").stderr


def test_the_batch_script_runs_array_elements_and_the_finalize(tmp_path):
    for k in range(3):
        write_compressed(
            tmp_path / "raw" / f"{k}.jsonl.zst",
            jsonl_bytes(pile_records(make_texts(20, k), ["ArXiv"] * 20)),
        )
    args = [
        "--reader",
        "pile",
        "--input",
        str(tmp_path / "raw"),
        "--tokenizer",
        str(REPO / "data" / "sample" / "tokenizer.json"),
        "--output",
        str(tmp_path / "out" / "pile"),
    ]
    base = {
        **os.environ,
        "PYTHON": sys.executable,
        "SLURM_JOB_ID": "900",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_CPUS_PER_TASK": "1",
    }
    outputs = []
    for index in (0, 1):
        env = {**base, "SLURM_ARRAY_TASK_ID": str(index)}
        run = subprocess.run(
            ["bash", str(PREP), *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    assert re.search(r"task-00000-of-00002 .* input files", outputs[0])
    final = subprocess.run(
        ["bash", str(PREP), *args, "--finalize"],
        env={**base},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert final.returncode == 0, final.stderr
    assert "60 documents" in final.stdout and (tmp_path / "out" / "pile.idx").is_file()
