"""Patches for machines without Transformer Engine or the ``grouped_gemm`` package (CPU or CUDA)."""

from __future__ import annotations

from megatron_blackmamba.kernels.cuda import have_transformer_engine
from megatron_blackmamba.patches.registry import Patch, Target


def _bind_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


def _grouped_gemm_missing() -> bool:
    from megatron.core.transformer.moe import grouped_gemm_util

    return not grouped_gemm_util.grouped_gemm_is_available()


def _install_torch_grouped_gemm() -> None:
    from megatron.core.transformer.moe import grouped_gemm_util

    from megatron_blackmamba.kernels import grouped_gemm

    grouped_gemm_util.grouped_gemm = grouped_gemm.package
    grouped_gemm_util.ops = grouped_gemm.ops


PATCHES = [
    Patch(
        name="moe_utils.te_general_gemm=None",
        kind="no-te",
        targets=(
            Target(
                "megatron.core.transformer.moe.moe_utils", "RouterGatingLinearFunction", own=True
            ),
        ),
        when="Transformer Engine does not import",
        why=(
            "moe_utils binds te_general_gemm only inside its TE import branch, yet the router's "
            "gating reads the name; bound to None, the plain torch.mm path runs"
        ),
        applies=lambda: not have_transformer_engine(),
        install=_bind_te_general_gemm,
        test="tests/model/test_router.py::test_blackmamba_router_uses_it_and_agrees_with_megatrons_gating",
    ),
    Patch(
        name="grouped_gemm->torch._grouped_mm",
        kind="no-te",
        targets=(
            Target("megatron.core.transformer.moe.grouped_gemm_util", "grouped_gemm"),
            Target("megatron.core.transformer.moe.grouped_gemm_util", "ops"),
        ),
        when="the grouped_gemm package is not installed",
        why=(
            "megatron's GroupedMLP (model.moe_grouped_gemm=true) needs grouped_gemm; "
            "kernels/grouped_gemm.py is the same op on torch._grouped_mm (or a per-expert loop)"
        ),
        applies=_grouped_gemm_missing,
        install=_install_torch_grouped_gemm,
        test="tests/patches/test_without_te.py::test_grouped_mlp_on_gmm_matches_sequential_mlp_and_float64",
    ),
]
