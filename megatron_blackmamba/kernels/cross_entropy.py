"""Per-token cross-entropy of vocab-parallel logits: megatron's ``vocab_parallel_cross_entropy``
(no label smoothing) without materialising fp32 logits or a saved softmax.

Each tensor-parallel rank holds logits [s, b, V / tp] for its slice of the vocabulary. The loss
needs three numbers per token from every rank: its max, its sum of exp(x - max) and the label's
logit (if the label falls in its slice). Those are all-reduced (MAX, then SUM: the same three
all-reduces megatron makes), giving log-sum-exp and the loss; the backward recomputes the
softmax from the logits and the saved log-sum-exp, one pass. The per-row work runs

* as Triton kernels (kernels/cross_entropy_triton.py) for CUDA logits when Triton imports,
* as PyTorch ops on an fp32 copy otherwise (CPU, fp64, no Triton): the definition the kernels
  are tested against.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from megatron_blackmamba.kernels.triton_support import takes, triton_kernels

_MODULE = "cross_entropy_triton"
_kernels = partial(triton_kernels, _MODULE)  # the Triton module, or None without Triton


def fused_applies(logits: Tensor) -> bool:
    """Whether the Triton kernels take ``logits``: a non-empty CUDA tensor of at most fp32
    precision."""
    return takes(_MODULE, logits)


def _label_columns(labels: Tensor, vocab_start: int, width: int) -> tuple[Tensor, Tensor]:
    """(each label's column in this rank's slice, clamped into it, as [N, 1]; whether it is
    there)."""
    local = labels - vocab_start
    return local.clamp(0, width - 1)[:, None], (local >= 0) & (local < width)


def _row_stats_torch(
    logits: Tensor, labels: Tensor, vocab_start: int
) -> tuple[Tensor, Tensor, Tensor]:
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    row_max = x.amax(dim=-1)
    sumexp = torch.exp(x - row_max[:, None]).sum(dim=-1)
    column, in_shard = _label_columns(labels, vocab_start, x.shape[-1])
    target = x.gather(-1, column)[:, 0] * in_shard
    return row_max, sumexp, target


def _grad_torch(
    logits: Tensor, labels: Tensor, lse: Tensor, dloss: Tensor, vocab_start: int
) -> Tensor:
    x = logits.to(lse.dtype)
    grad = torch.exp(x - lse[:, None])
    column, in_shard = _label_columns(labels, vocab_start, x.shape[-1])
    grad.scatter_add_(-1, column, -in_shard.to(grad.dtype)[:, None])
    return (grad * dloss[:, None]).to(logits.dtype)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, tp_group) -> Tensor:
        shape = labels.shape
        rows = logits.reshape(-1, logits.shape[-1]).contiguous()
        flat_labels = labels.reshape(-1).contiguous()
        tp_size = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
        vocab_start = 0 if tp_size == 1 else torch.distributed.get_rank(tp_group) * rows.shape[-1]
        fused = fused_applies(rows)
        stats = _kernels().row_stats if fused else _row_stats_torch
        row_max, sumexp, target = stats(rows, flat_labels, vocab_start)
        if tp_size > 1:
            global_max = row_max.clone()
            torch.distributed.all_reduce(
                global_max, op=torch.distributed.ReduceOp.MAX, group=tp_group
            )
            sumexp = sumexp * torch.exp(row_max - global_max)
            torch.distributed.all_reduce(sumexp, group=tp_group)
            torch.distributed.all_reduce(target, group=tp_group)
            row_max = global_max
        lse = row_max + torch.log(sumexp)
        # megatron's convention for a label in no rank's slice: its logit counts as the row max.
        valid = (flat_labels >= 0) & (flat_labels < rows.shape[-1] * tp_size)
        target = torch.where(valid, target, row_max)
        ctx.save_for_backward(rows, flat_labels, lse)
        ctx.fused, ctx.vocab_start, ctx.logits_shape = fused, vocab_start, logits.shape
        return (lse - target).view(shape)

    @staticmethod
    def backward(ctx, dloss: Tensor):
        rows, labels, lse = ctx.saved_tensors
        grad_fn = _kernels().grad if ctx.fused else _grad_torch
        dloss = dloss.reshape(-1).to(lse.dtype).contiguous()
        return grad_fn(rows, labels, lse, dloss, ctx.vocab_start).view(ctx.logits_shape), None, None


def vocab_parallel_cross_entropy(logits: Tensor, labels: Tensor, tp_group=None) -> Tensor:
    """Loss per token (fp32, fp64 for fp64 logits), shaped like ``labels``, for logits [..., V / tp]
    holding this rank's contiguous vocabulary slice. A label outside the vocabulary gets
    megatron's treatment (its logit taken as the row max, no one-hot in the gradient).
    ``tp_group`` None means the whole vocabulary is here."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"cross entropy: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}"
        )
    return _CrossEntropy.apply(logits, labels, tp_group)
