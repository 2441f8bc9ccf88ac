"""Where metrics go: a tqdm progress bar, log lines, tensorboard, W&B (offline by default), JSONL.

A job is one run however often it is requeued: the W&B run id is made once and kept in the
checkpoint folder (``wandb_run_id``), so every restart reopens the same run; tensorboard writes to
the same folder; the resolved config is written beside the logs at every start.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from megatron_blackmamba.checkpointing.store import write_text_atomic
from megatron_blackmamba.config import JobConfig, to_yaml

logger = logging.getLogger("megatron_blackmamba.train")

WANDB_ID_FILE = "wandb_run_id"
RUN_CONFIG_FILE = "config.yaml"


def log_dirs(job: JobConfig) -> list[Path]:
    """The folders this run writes logs to (checkpoints, tensorboard, the metrics file's)."""
    dirs = [
        job.checkpoint.save,
        job.logging.tensorboard_dir,
        os.path.dirname(job.logging.metrics_jsonl) if job.logging.metrics_jsonl else None,
    ]
    unique: list[Path] = []
    for d in dirs:
        if d and Path(d).resolve() not in [u.resolve() for u in unique]:
            unique.append(Path(d))
    return unique


def write_run_config(job: JobConfig) -> None:
    """The resolved config as ``config.yaml`` in every log folder (rank 0, at start)."""
    text = to_yaml(job)
    for folder in log_dirs(job):
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / RUN_CONFIG_FILE, text)


def wandb_run_id(job: JobConfig) -> str:
    """This run's W&B id: read from the checkpoint folder, else made once and written there.

    Resuming from another folder (``checkpoint.load``) continues that folder's run unless
    ``checkpoint.finetune`` starts a new one. Without ``checkpoint.save`` each start is a new run.
    """
    ck = job.checkpoint
    for folder in (ck.save, None if ck.finetune else ck.load):
        if folder and (Path(folder) / WANDB_ID_FILE).is_file():
            return (Path(folder) / WANDB_ID_FILE).read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if ck.save:
        Path(ck.save).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(ck.save) / WANDB_ID_FILE, run_id + "\n")
    else:
        logger.warning(
            "checkpoint.save is null: W&B run %s cannot be reopened by a restart", run_id
        )
    return run_id


class MetricsLogger:
    """Rank-0 sink for scalar metrics; other ranks get an inert instance."""

    def __init__(self, job: JobConfig, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Optional[tqdm] = None
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        lg = job.logging
        if lg.metrics_jsonl:
            Path(lg.metrics_jsonl).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(lg.metrics_jsonl, "a")
        if lg.progress_bar:
            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )
        if lg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=lg.tensorboard_dir)
        if lg.wandb_project and lg.wandb_mode != "disabled":
            import wandb

            run_dir = lg.wandb_dir or str(Path(job.checkpoint.save or "runs") / "wandb")
            os.makedirs(run_dir, exist_ok=True)
            self.wandb = wandb.init(
                project=lg.wandb_project,
                name=lg.run_name,
                mode=lg.wandb_mode,
                dir=run_dir,
                config=job.to_dict(),
                id=wandb_run_id(job),
                resume="allow",
            )
            logger.info("W&B run %s (%s, %s)", self.wandb.id, lg.wandb_mode, run_dir)

    def step(self, step: int, metrics: dict[str, float], log_line: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                tok_s=f"{metrics['tokens_per_s']:.0f}",
                mfu=f"{metrics['mfu_percent']:.1f}%",
                refresh=False,
            )
        if log_line:
            logger.info(f"step {step} | " + " | ".join(_shown(k, v) for k, v in metrics.items()))
        self.scalars(step, metrics, prefix="train/")
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()

    def scalars(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(prefix + k, v, step)
        if self.wandb is not None:
            self.wandb.log({prefix + k: v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl is not None:
            self.jsonl.close()


def _shown(name: str, value: float) -> str:
    if name == "mfu_percent":
        return f"mfu {value:.1f}%"
    if name in ("consumed_samples", "consumed_tokens"):
        return f"{name} {int(value):,}"
    return f"{name} {value:.4g}"
