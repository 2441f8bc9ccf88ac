"""The training loop: resume, step, log, validate, checkpoint, stop on a signal.

It resumes from the newest intact checkpoint in ``checkpoint.load`` (default
``checkpoint.save``), and on SIGTERM/SIGUSR1 (preemption, SLURM's pre-timeout signal) it saves a
checkpoint at the end of the current step and exits, so a requeued job continues where it
stopped, in the same tensorboard folder and the same W&B run.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_blackmamba import kernels
from megatron_blackmamba.checkpointing import load_checkpoint, save_checkpoint
from megatron_blackmamba.config import JobConfig
from megatron_blackmamba.model.builder import graphed_layers
from megatron_blackmamba.parallel.setup import init_distributed
from megatron_blackmamba.training.data import build_datasets, micro_batches, tokenizer_path
from megatron_blackmamba.training.expert_load import gather_expert_load, load_summary
from megatron_blackmamba.training.flops import device_peak_tflops, train_flops_per_token
from megatron_blackmamba.training.loggers import MetricsLogger, write_run_config
from megatron_blackmamba.training.setup import (
    build_ddp_model,
    build_optimizer,
    build_scheduler,
    num_microbatches,
)
from megatron_blackmamba.training.step import device, forward_backward, global_loss, train_step

logger = logging.getLogger("megatron_blackmamba.train")


class StopRequest:
    """Set by SIGTERM/SIGUSR1; all ranks agree on it once per step so they stop together."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Throughput:
    """Tokens/s and MFU (percent of the devices' peak) averaged over the last ``window`` steps."""

    def __init__(
        self, window: int, tokens_per_step: int, flops_per_token: float, peak_flops: float
    ) -> None:
        self.times: deque[float] = deque(maxlen=max(window, 1))
        self.tokens_per_step, self.flops_per_token, self.peak_flops = (
            tokens_per_step,
            flops_per_token,
            peak_flops,
        )

    def add(self, seconds: float) -> tuple[float, float]:
        """Record one step; returns (tokens/s, MFU %) over the window."""
        self.times.append(seconds)
        tokens_per_s = self.tokens_per_step * len(self.times) / sum(self.times)
        mfu = (
            100 * tokens_per_s * self.flops_per_token / self.peak_flops if self.peak_flops else 0.0
        )
        return tokens_per_s, mfu


def evaluate(job: JobConfig, model, dataset, eval_index: int) -> float:
    """Mean LM loss over ``eval_iters`` validation micro-batches (a fixed window per evaluation)."""
    t = job.training
    dp = parallel_state.get_data_parallel_world_size()
    n = t.eval_iters
    start = (eval_index * n * t.micro_batch_size * dp) % max(
        len(dataset) - n * t.micro_batch_size * dp, 1
    )
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        loss = forward_backward(
            model,
            micro_batches(dataset, start, t.micro_batch_size),
            n,
            t.seq_length,
            t.micro_batch_size,
            forward_only=True,
        )
    for chunk in model:
        chunk.train()
    return global_loss(loss)


def train(job: JobConfig) -> dict:
    """Run the job; returns the last step's metrics with ``iteration`` and ``steps`` (how many
    steps this call trained: 0 when resumed at the end), for tests and the CLI's exit summary."""
    init_distributed(job.parallel, job.training.seed, cuda_graphs=job.training.cuda_graphs)
    rank0 = dist.get_rank() == 0
    t, ck = job.training, job.checkpoint
    total_steps = t.resolved_train_iters()
    dp = parallel_state.get_data_parallel_world_size()
    n_micro = num_microbatches(job, dp)
    if rank0:
        write_run_config(job)

    model = build_ddp_model(job)
    optimizer = build_optimizer(job, model)
    scheduler = build_scheduler(job, optimizer)
    iteration, consumed = 0, 0
    if ck.load or ck.save:
        # An explicit checkpoint.load must exist; the save dir is only resumed from if it has one.
        weights_only = ck.finetune
        state = load_checkpoint(
            ck.load or ck.save,
            model,
            None if weights_only else optimizer,
            None if weights_only else scheduler,
            required=bool(ck.load),
        )
        if state is not None and not weights_only:
            iteration, consumed = state["iteration"], state["consumed_samples"]

    eval_windows = (total_steps // t.eval_interval + 1) if t.eval_interval else 0
    data = build_datasets(
        job,
        total_steps * t.global_batch_size,
        eval_windows * t.eval_iters * t.micro_batch_size * dp,
    )
    batches = micro_batches(data.train, consumed, t.micro_batch_size, job.data.num_workers)

    graphed, why = graphed_layers(job, t.cuda_graphs)
    graphs_line = {"all": "every layer", "mamba": "Mamba layers", "none": "off"}[graphed] + (
        f" ({why})" if why else ""
    )
    flops_per_token = train_flops_per_token(job.model)
    peak_tflops, peak_source = device_peak_tflops(job.logging.peak_tflops)
    metrics_log = MetricsLogger(job, total_steps, iteration, enabled=rank0)
    logger.info(
        f"BlackMamba {job.model.resolved_layer_pattern()} | world {dist.get_world_size()} (tp"
        f" {job.parallel.tp}, pp {job.parallel.pp}, ep {job.parallel.ep}, dp {dp}) | kernels:"
        f" {kernels.kernel_backend(device())} | fp8 experts: {t.fp8} | cuda graphs: {graphs_line} |"
        f" {flops_per_token / 3 / 2 / 1e6:.1f}M active params/token | peak {peak_tflops:.2f}"
        f" TFLOP/s/device ({peak_source}) | start step {iteration}/{total_steps}"
    )

    stop = StopRequest()
    tokens_per_step = t.global_batch_size * t.seq_length
    throughput = Throughput(
        t.log_interval, tokens_per_step, flops_per_token, peak_tflops * 1e12 * dist.get_world_size()
    )
    load_every = job.logging.expert_load_interval or t.log_interval
    last = {"iteration": iteration, "steps": 0}
    stop_at = iteration + t.stop_after if t.stop_after else total_steps
    while iteration < total_steps:
        start = time.perf_counter()
        loss, grad_norm, update_ok = train_step(
            model, optimizer, batches, n_micro, t.seq_length, t.micro_batch_size
        )
        if update_ok:
            scheduler.step(increment=t.global_batch_size)
        iteration += 1
        consumed += t.global_batch_size
        elapsed = time.perf_counter() - start
        tokens_per_s, mfu = throughput.add(elapsed)
        metrics = {
            "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": optimizer.param_groups[0]["lr"],
            "tokens_per_s": tokens_per_s,
            "mfu_percent": mfu,
            "step_time_s": elapsed,
            "consumed_samples": consumed,
            "consumed_tokens": consumed * t.seq_length,
        }
        if torch.cuda.is_available():
            metrics["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        metrics_log.step(iteration, metrics, log_line=iteration % t.log_interval == 0)
        last = {**metrics, "iteration": iteration, "steps": last["steps"] + 1}

        if iteration % load_every == 0:
            load = gather_expert_load(model)
            summaries = {layer: load_summary(c) for layer, c in load.items()}
            per_layer = {
                f"expert_load/layer{layer}_{k}": v
                for layer, summary in summaries.items()
                for k, v in summary.items()
            }
            metrics_log.scalars(iteration, per_layer, prefix="")
            if iteration % t.log_interval == 0 and load:
                worst = max(summaries, key=lambda layer: summaries[layer]["max_over_mean"])
                dropped = max(summary["dropped_fraction"] for summary in summaries.values())
                logger.info(
                    f"  expert load: worst layer {worst} max/mean"
                    f" {summaries[worst]['max_over_mean']:.2f}"
                    f" counts {[int(c) for c in load[worst]['routed']]}"
                    + (f" | dropped for capacity: up to {dropped:.2%} per layer" if dropped else "")
                )
        if t.eval_interval and iteration % t.eval_interval == 0 and data.valid is not None:
            val = evaluate(job, model, data.valid, iteration // t.eval_interval - 1)
            logger.info(f"step {iteration} | validation loss {val:.4f}")
            metrics_log.scalars(iteration, {"loss": val}, prefix="valid/")
            last["valid_loss"] = val
        if t.eval_tasks and iteration % (t.eval_tasks_interval or t.eval_interval) == 0:
            from megatron_blackmamba.evaluation.during_training import downstream_scores

            scores = downstream_scores(job, model[0].module, tokenizer_path(job))
            logger.info(
                f"step {iteration} | downstream "
                + " | ".join(f"{k} {v:.4f}" for k, v in scores.items())
            )
            metrics_log.scalars(iteration, scores, prefix="downstream/")
            last["downstream"] = scores
        stopping = stop.agreed() or stop_at <= iteration < total_steps
        if ck.save and (iteration % ck.save_interval == 0 or iteration == total_steps or stopping):
            save_checkpoint(
                ck.save,
                iteration,
                model,
                optimizer,
                scheduler,
                job,
                consumed,
                ck.keep_last,
                tokenizer=tokenizer_path(job),
            )
        if stopping:
            logger.info(
                f"stopping at step {iteration} (signal or training.stop_after)"
                + ("; checkpoint saved" if ck.save else "; checkpoint.save is null: nothing saved")
            )
            break
    metrics_log.close()
    return last
