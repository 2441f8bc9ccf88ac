"""Log lines for every entry point: timestamps, rank 0 at INFO, the others at WARNING.

Under torchrun or srun every rank would otherwise print every line; by default only rank 0 logs
at INFO (``logging.all_ranks=true`` shows all), and lines from other ranks carry their rank.
Lines go through ``tqdm.write`` so that they never tear a progress bar.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tqdm import tqdm

from megatron_blackmamba import EXPECTED_IMPORT_WARNINGS
from megatron_blackmamba.parallel.env import launch_env

# torch's deprecation notices for the ShardedTensor APIs megatron's dist_checkpointing calls on
# every save and load: nothing a user of this project can act on.
CHECKPOINT_API_WARNINGS = (
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "`load_state_dict` is deprecated and will be removed",
)


class _TqdmHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners and tools swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a closed stream at exit: as logging.StreamHandler does
            self.handleError(record)


def configure_logging(verbose: bool = False, all_ranks: bool = False) -> None:
    """Root logging for this process. ``verbose`` also shows megatron-core's INFO lines."""
    env = launch_env()
    shown = env.rank == 0 or all_ranks
    prefix = f"[rank {env.rank}] " if env.world_size > 1 else ""
    handler = _TqdmHandler()
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO if shown else logging.WARNING)
    logging.getLogger("megatron").setLevel(logging.INFO if verbose and shown else logging.WARNING)
    for message in CHECKPOINT_API_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    # The checkpoint writer's helper processes import megatron afresh; they read PYTHONWARNINGS.
    os.environ["PYTHONWARNINGS"] = ",".join(f"ignore:{m}" for m in EXPECTED_IMPORT_WARNINGS)
