"""Start torch.distributed and megatron's model-parallel groups from a JobConfig.

Works the same under torchrun/srun (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment) and as
a plain single process (a one-rank group on a free localhost port), on CUDA with NCCL or on CPU
with gloo, so every code path (and every test) runs the real megatron parallel machinery.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.tensor_parallel.random import initialize_rng_tracker
from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

from megatron_blackmamba import patches
from megatron_blackmamba.config import ParallelConfig
from megatron_blackmamba.parallel.env import launch_env

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    parallel: ParallelConfig, seed: int, timeout_minutes: int = 30, cuda_graphs: bool = False
) -> None:
    """torch.distributed + megatron parallel_state; idempotent within a process.

    ``cuda_graphs`` (training.cuda_graphs) makes megatron's RNG tracker graph-safe, which its CUDA
    graph manager requires."""
    patches.apply()
    if not dist.is_initialized():
        rank, world, local_rank, launched = launch_env()
        backend = parallel.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if launched:
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                raise RuntimeError(
                    "MASTER_ADDR/MASTER_PORT unset: launch with torchrun, launch/local.sh or"
                    " launch/*.sbatch"
                )
            init_method = "env://"
        else:
            # A plain single process: its own free port, never one inherited from a parent job.
            init_method = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=timeout_minutes),
        )
        logger.info("torch.distributed: rank %d/%d, backend %s", rank, world, backend)
    world = dist.get_world_size()
    model_parallel = parallel.tp * parallel.pp
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by parallel.tp*parallel.pp = {model_parallel}"
        )
    expert_ranks = parallel.ep * parallel.resolved_etp()
    if (world // parallel.pp) % expert_ranks:
        raise ValueError(
            f"parallel.ep * etp = {expert_ranks} must divide world/pp = {world // parallel.pp}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            expert_model_parallel_size=parallel.ep,
            expert_tensor_parallel_size=parallel.resolved_etp(),
        )
    seed_everything(seed, cuda_graphs)


def seed_everything(seed: int, cuda_graphs: bool = False) -> None:
    """Same seed on every rank for replicated weights; megatron's tracker varies it per TP rank.

    Without CUDA there are no per-device generators to track: megatron's inference tracker, whose
    ``fork()`` is a no-op, stands in (dropout is 0 in BlackMamba, so nothing random is forked).
    """
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(
            seed, use_cudagraphable_rng=cuda_graphs, force_reset_rng=True
        )
    else:
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def destroy() -> None:
    if torch.cuda.is_available():
        # Resets megatron's global graph state (the graphs-created flag, records, memory-pool
        # handle) so a later model in this process starts clean; captured graphs stay with their
        # layers, i.e. live as long as the model.
        delete_cuda_graphs()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
