"""A job killed mid-run and started again is one run: the same W&B run id, tensorboard folder and
consumed-token count continuing from the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.training.conftest import REPO, tiny_overrides, train_cli

STEPS, TOKENS_PER_STEP = 40, 4 * 32  # global batch 4 x seq 32 (conftest's TINY_TRAIN)


def test_kill_and_resume_is_one_run(sample_cache, tmp_path):
    overrides = tiny_overrides(
        sample_cache,
        tmp_path,
        f"training.train_iters={STEPS}",
        "logging.wandb_project=bm",
        "logging.wandb_mode=offline",
        f"logging.tensorboard_dir={tmp_path / 'tb'}",
    )
    env = {**os.environ, "WANDB_SILENT": "true"}
    victim = subprocess.Popen(
        train_cli(overrides),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = tmp_path / "ckpt" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(
        victim.pid, signal.SIGKILL
    )  # the trainer and its checkpoint-writer helpers: a hard crash
    assert victim.wait() == -signal.SIGKILL, "the first run ended before it could be killed"
    killed_at = int(latest.read_text().strip().removeprefix("iter_"))
    assert killed_at < STEPS

    result = subprocess.run(train_cli(overrides), cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    run_id = (tmp_path / "ckpt" / "wandb_run_id").read_text().strip()
    runs = sorted(p.name for p in (tmp_path / "ckpt" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)
    assert f"W&B run {run_id}" in result.stderr

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if r["step"] > killed_at]
    assert resumed[0]["step"] == killed_at + 1 and resumed[-1]["step"] == STEPS
    assert all(r["consumed_tokens"] == r["step"] * TOKENS_PER_STEP for r in rows)
    assert all(r["consumed_samples"] == r["step"] * 4 for r in rows)
    assert (
        len(list(Path(tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    )  # one folder, both processes
    assert (tmp_path / "ckpt" / "config.yaml").is_file()
    assert (tmp_path / "ckpt" / f"iter_{STEPS:07d}" / "config.yaml").is_file()
    assert (tmp_path / "ckpt" / f"iter_{STEPS:07d}" / "tokenizer.json").is_file()
