"""Rank bodies for the parallel-equivalence tests (importable, so spawned processes can run them).

Gradients are compared through the checkpoint layout: each rank temporarily swaps its parameters'
data for their reduced gradients and saves a sharded checkpoint, which any other layout can load.
That makes the comparison layout-free and also exercises the TP/PP/EP sharding metadata.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_blackmamba.config import load_config
from megatron_blackmamba.parallel.setup import destroy, init_distributed
from megatron_blackmamba.training.setup import build_ddp_model
from megatron_blackmamba.training.step import forward_backward, global_loss

TINY = [
    "model.hidden_size=32",
    "model.num_layers=4",
    "model.vocab_size=128",
    "model.d_state=4",
    "model.max_seq_length=16",
    "model.num_experts=8",
    "training.precision=fp32",
    "training.seq_length=16",
    "training.micro_batch_size=2",
    "parallel.distributed_optimizer=false",
]
NUM_MICROBATCHES_TOTAL = 4


def make_microbatches(count: int, mbs: int, seq: int, vocab: int, seed: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        out.append(
            {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq)}
        )
    return out


@contextmanager
def params_replaced_by_grads(model):
    saved = {}
    for name, p in model.named_parameters():
        saved[name] = p.data
        p.data = p.main_grad.to(p.dtype).clone()
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            p.data = saved[name]


def _save(model, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.module.sharded_state_dict(), str(path))


def run_layout(workdir: str, layout: list[str], tag: str, save_weights: bool) -> None:
    """Build at ``layout``, (save or) load weights, one forward-backward, save loss and grads."""
    job = load_config(None, TINY + layout)
    init_distributed(job.parallel, seed=1234)
    work = Path(workdir)
    (model,) = build_ddp_model(job)
    if save_weights:
        _save(model, work / "weights")
    else:
        state = dist_checkpointing.load(model.module.sharded_state_dict(), str(work / "weights"))
        model.module.load_state_dict(state)
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = NUM_MICROBATCHES_TOTAL // dp
    batches = make_microbatches(
        NUM_MICROBATCHES_TOTAL,
        job.training.micro_batch_size,
        job.training.seq_length,
        job.model.vocab_size,
    )
    mine = batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    model.zero_grad_buffer()
    loss = global_loss(
        forward_backward(
            [model], iter(mine), per_rank, job.training.seq_length, job.training.micro_batch_size
        )
    )
    if torch.distributed.get_rank() == 0:
        (work / f"loss_{tag}.json").write_text(json.dumps({"loss": loss}))
    with params_replaced_by_grads(model):
        _save(model, work / f"grads_{tag}")
    destroy()


def _load_copy(model, path: Path) -> dict:
    loaded = dist_checkpointing.load(model.module.sharded_state_dict(), str(path))
    return {k: v.detach().clone() for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def compare_grads(workdir: str, tag_a: str, tag_b: str) -> None:
    """Load two gradient checkpoints into one single-process model; write per-tensor errors."""
    job = load_config(None, TINY)
    init_distributed(job.parallel, seed=1234)
    work = Path(workdir)
    (model,) = build_ddp_model(job)
    # load() fills the model's own parameter storage: copy each result out before the next load.
    a = _load_copy(model, work / f"grads_{tag_a}")
    b = _load_copy(model, work / f"grads_{tag_b}")
    errors = {}
    for key, ta in a.items():
        tb = b[key]
        ref = ta.double().norm().item()
        errors[key] = {
            "abs": (ta.double() - tb.double()).norm().item(),
            "ref": ref,
            "other": tb.double().norm().item(),
        }
    (work / f"compare_{tag_a}_{tag_b}.json").write_text(json.dumps(errors))
    destroy()
