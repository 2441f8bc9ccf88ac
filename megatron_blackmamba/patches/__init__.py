"""Every change this project makes to megatron-core (and to torch as megatron sees it), in one
place.

``apply()`` installs the patches this machine needs, once per process; it is called by
``parallel.setup.init_distributed`` and ``model.builder.build_model``, so any entry point that
builds a model has them. ``PATCHES`` lists them all (``python -m megatron_blackmamba.patches``
prints the table: name, kind, condition, whether it applies here, test). Kinds:

* ``cpu``: megatron code that assumes a CUDA device; shims scoped to the modules that do.
* ``no-te``: code that assumes Transformer Engine or the ``grouped_gemm`` package.
* ``performance``: correct everywhere but waits for the GPU; applied everywhere, so CPU CI runs it.
* ``correctness``: bugs in megatron-core 0.16.1 that this project's training paths hit.
"""

from __future__ import annotations

from megatron_blackmamba.patches import (
    cpu,
    cuda_graphs,
    distributed_optimizer,
    performance,
    without_te,
)
from megatron_blackmamba.patches.registry import WRITTEN_FOR, Patch, Target, install_patches

PATCHES: tuple[Patch, ...] = (
    *without_te.PATCHES,
    *performance.PATCHES,
    *cuda_graphs.PATCHES,
    *distributed_optimizer.PATCHES,
    *cpu.PATCHES,
)
BY_NAME = {patch.name: patch for patch in PATCHES}

_applied: list[str] | None = None


def apply() -> list[str]:
    """Install the patches this machine needs (idempotent); returns their names."""
    global _applied
    if _applied is None:
        _applied = install_patches(PATCHES)
    return _applied


__all__ = ["BY_NAME", "PATCHES", "WRITTEN_FOR", "Patch", "Target", "apply"]
