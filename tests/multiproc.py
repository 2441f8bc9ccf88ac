"""Run a function on N local ranks (gloo, spawned processes) the way torchrun would."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

from megatron_blackmamba.parallel.setup import free_port


def _entry(target: Callable, rank: int, world: int, port: int, args: tuple, errors) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        target(*args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def run_ranks(world: int, target: Callable, *args: Any, timeout: float = 600) -> None:
    """Start ``world`` processes running ``target(*args)``; raise with every rank's traceback on
    failure."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(target, r, world, port, args, errors))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    codes = [p.exitcode for p in procs]
    if failures or any(code != 0 for code in codes):
        raise RuntimeError(f"ranks failed (exit codes {codes}):\n" + "\n".join(failures))
