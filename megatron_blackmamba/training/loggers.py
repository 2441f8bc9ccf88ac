"""Where metrics go: a tqdm progress bar and log lines, tensorboard, wandb (offline by default)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from megatron_blackmamba.config import JobConfig

logger = logging.getLogger("megatron_blackmamba.train")


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
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if lg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=lg.tensorboard_dir)
        if lg.wandb_project and lg.wandb_mode != "disabled":
            import wandb

            run_dir = lg.wandb_dir or str(Path(job.checkpoint.save or "runs") / "wandb")
            os.makedirs(run_dir, exist_ok=True)
            self.wandb = wandb.init(
                project=lg.wandb_project, name=lg.run_name, mode=lg.wandb_mode, dir=run_dir,
                config=job.to_dict(), resume="allow",
            )

    def step(self, step: int, metrics: dict[str, float], log_line: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                 mfu=f"{100 * metrics['mfu']:.1f}%", refresh=False)
        if log_line:
            text = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            (self.bar.write if self.bar is not None else print)(f"step {step} | {text}")
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

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl is not None:
            self.jsonl.close()
