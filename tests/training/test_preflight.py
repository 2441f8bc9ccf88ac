"""``blackmamba-train --preflight``: every problem a job would hit later, listed at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from megatron_blackmamba.data_prep.sample import sample_tokenizer_path
from megatron_blackmamba.data_prep.writer import bin_path, idx_path
from megatron_blackmamba.training.preflight import largest_token_id

REPO = Path(__file__).resolve().parents[2]


def _preflight(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_blackmamba.train",
            "--preflight",
            "--config",
            "configs/tiny.yaml",
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"},
    )


def test_tiny_config_passes(tmp_path):
    result = _preflight(f"checkpoint.save={tmp_path / 'ckpt'}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "active /" in result.stdout and "total" in result.stdout
    )  # the model's size, from the meta device
    assert "preflight: ok" in result.stdout


def test_every_problem_is_listed(sample_cache, tmp_path):
    prefix = str(next(Path(sample_cache).glob("sample-*/sample_text_document.idx")))[: -len(".idx")]
    broken = tmp_path / "broken"
    shutil.copyfile(bin_path(prefix), bin_path(str(broken)))  # its .idx is missing
    blend = tmp_path / "blend.txt"
    blend.write_text(f"0.5 {prefix}\n0.5 {broken}\n")
    result = _preflight(
        f"data.blend={blend}",
        f"data.tokenizer={sample_tokenizer_path()}",
        "model.vocab_size=1024",  # the tokenizer has 8192 tokens
        "checkpoint.save=/proc/blackmamba-preflight/ckpt",
    )  # nobody can write there
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    text = "\n".join(problems)
    assert f"missing {idx_path(str(broken))}" in text
    assert "has 8192 tokens but model.vocab_size=1024" in text
    assert ">= model.vocab_size=1024" in text  # the dataset's token ids, from a sample of it
    assert "checkpoint.save: cannot write in /proc" in text
    assert len(problems) == 4 and "4 problem(s)" in result.stdout


def test_a_checkpoint_of_another_model_is_a_problem(sample_cache, tmp_path):
    from tests.training.conftest import run_train, tiny_overrides

    run_train(tiny_overrides(sample_cache, tmp_path, "training.train_iters=2"))
    result = _preflight(f"checkpoint.save={tmp_path / 'ckpt'}", f"data.cache_dir={sample_cache}")
    assert result.returncode == 1
    assert "holds another model (model.hidden_size: checkpoint 32, config 128" in result.stdout


def test_largest_token_id_samples_the_data(tmp_path):
    from megatron_blackmamba.data_prep.writer import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=int(n)).tolist() for n in rng.integers(1, 50, size=40)]
    docs[17][3] = 40000
    prefix = str(tmp_path / "d")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_documents(docs)
    writer.finalize()
    largest, how = largest_token_id(prefix, documents=40)
    assert largest == 40000 and "40 of 40 sequences" in how
