"""One optimizer step through megatron's pipeline schedules (the same code at any TP/PP/EP/DP).

Batches are dicts of CPU tensors ``tokens``, ``labels``, ``loss_mask`` ([b, s]), pinned on CUDA
machines so their copies to the GPU do not wait for its queue to drain; megatron's schedule pulls
one micro-batch per forward from ``data_iterator``. Loss is the token-mean LM loss
of each micro-batch, averaged over micro-batches and data-parallel ranks: a run split across ranks
computes exactly what one process computes on the same global batch.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

from megatron_blackmamba.kernels.grouped_gemm import refresh_fp8_weights

Batch = dict[str, torch.Tensor]


def device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
    """megatron schedule callback: (per-token losses or hidden states, loss function)."""
    batch = next(data_iterator)
    dev = device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    position_ids = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, batch["loss_mask"].to(dev, non_blocking=True))


def forward_backward(
    model: list[torch.nn.Module],
    data_iterator: Iterator[Batch],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> Optional[float]:
    """Runs the schedule; returns the mean LM loss on the last pipeline stage (None elsewhere)."""
    if not forward_only:  # training.fp8: this step's weights in e4m3, before any forward reads them
        for chunk in model:
            refresh_fp8_weights(chunk.parameters())
    schedule = get_forward_backward_func()
    losses = schedule(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    clear_aux_losses_tracker()
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return float(torch.stack([d["lm loss"] for d in losses]).mean())


def global_loss(loss: Optional[float]) -> float:
    """The step's loss on every rank: from the last pipeline stage, averaged over data-parallel
    ranks (each saw different micro-batches), i.e. the loss of the whole global batch."""
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    t = torch.tensor([loss if loss is not None else 0.0], dtype=torch.float64, device=device())
    torch.distributed.broadcast(
        t, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group
    )
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return float(t.item()) / parallel_state.get_data_parallel_world_size()


def train_step(model, optimizer, data_iterator, num_microbatches, seq_length, micro_batch_size):
    """zero grads -> forward/backward -> finalize grads (DP/EP/PP reductions) -> optimizer step."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = forward_backward(model, data_iterator, num_microbatches, seq_length, micro_batch_size)
    update_ok, grad_norm, _ = optimizer.step()
    return global_loss(loss), grad_norm, update_ok
