"""Held-out loss and perplexity over the validation split of a job's data (data_prep output).

The samples are the training pipeline's own (megatron's GPTDataset through training.data), and
the loss is computed here from the logits in float32 or wider, independently of the training
step's loss kernel; ``exp`` of the mean token loss is the perplexity.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from megatron_blackmamba.config import JobConfig
from megatron_blackmamba.evaluation.scoring import log_probs
from megatron_blackmamba.training.data import build_datasets


@torch.no_grad()
def heldout_loss(job: JobConfig, model, max_samples: int = 0, batch_size: int = 8) -> dict:
    """{"loss", "perplexity", "tokens", "samples", "tokens_per_s"} over the validation split."""
    data = build_datasets(job, 1, max_samples or 1 << 30)
    if data.valid is None:
        raise ValueError(f"data.split={job.data.split!r} holds out no validation data")
    count = min(len(data.valid), max_samples) if max_samples else len(data.valid)
    device = next(model.parameters()).device
    total, tokens, start = 0.0, 0, time.perf_counter()
    bar = tqdm(total=count, desc="held-out", unit="seq")
    for first in range(0, count, batch_size):
        samples = [data.valid[i] for i in range(first, min(first + batch_size, count))]
        batch = {
            k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device)
            for k in ("tokens", "labels", "loss_mask")
        }
        nll = -log_probs(model, batch["tokens"]).gather(-1, batch["labels"][..., None])[..., 0]
        mask = batch["loss_mask"].to(nll.dtype)
        total += float((nll * mask).sum())
        tokens += int(mask.sum())
        bar.update(len(samples))
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):,.0f}", refresh=False)
    bar.close()
    loss = total / max(tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": tokens,
        "samples": count,
        "tokens_per_s": tokens / (time.perf_counter() - start),
    }
