"""Where this process sits in a launch, read from torchrun's or SLURM's environment variables.

No torch import: the config loader and the logging set-up ask before anything heavy is loaded.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional


class LaunchEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    launched: bool  # started by torchrun or srun (False: a plain single process)


def launch_env(env: Optional[dict] = None) -> LaunchEnv:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else srun's SLURM_PROCID/NTASKS/LOCALID, else
    alone."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), True
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            True,
        )
    return LaunchEnv(0, 1, 0, False)
