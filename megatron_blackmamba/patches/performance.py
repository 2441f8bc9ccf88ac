"""GPU performance patches: megatron code that is correct everywhere but waits for the device.

Both apply on CPU too (same results, checked there), so every path the GPU runs is tested in CI.
"""

from __future__ import annotations

import torch

from megatron_blackmamba.patches.registry import Patch, Target


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm (no per-tensor norms): ([total L2 norm] fp32, None)."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale) -> None:
    """Drop-in for amp_C.multi_tensor_scale: dst = src * scale, list-wise (dst may be src)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _megatron_local_multi_tensor_ops() -> bool:
    """megatron fell back to its local helpers (no apex, no TE)."""
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads

    return clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm


def _install_foreach_l2_norm() -> None:
    from megatron.core.optimizer import clip_grads

    clip_grads.l2_norm_impl = foreach_l2_norm


def _install_foreach_scale() -> None:
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer

    clip_grads.multi_tensor_scale_impl = megatron_optimizer.multi_tensor_scale_impl = foreach_scale


def _install_sync_free_permute() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # Imported before the swap: token_order keeps megatron's permute for the calls it passes on.
    from megatron_blackmamba.model import token_order

    moe_utils.permute = token_dispatcher.permute = token_order.permute_known_size


PATCHES = [
    Patch(
        name="clip_grads.l2_norm_impl->foreach",
        kind="performance",
        targets=(Target("megatron.core.optimizer.clip_grads", "l2_norm_impl"),),
        when="megatron uses its local multi-tensor helpers (no apex, no TE)",
        why=(
            "the local gradient-norm helper reads every tensor's norm back to the host (one device "
            "sync per parameter); one torch._foreach_norm, no host sync"
        ),
        applies=_megatron_local_multi_tensor_ops,
        install=_install_foreach_l2_norm,
        test="tests/patches/test_performance.py::test_foreach_l2_norm_matches_float64",
    ),
    Patch(
        name="multi_tensor_scale_impl->foreach",
        kind="performance",
        targets=(
            Target("megatron.core.optimizer.clip_grads", "multi_tensor_scale_impl"),
            Target("megatron.core.optimizer.optimizer", "multi_tensor_scale_impl"),
        ),
        when="megatron uses its local multi-tensor helpers (no apex, no TE)",
        why=(
            "the local scale helper (main -> model param copies, gradient clipping) launches two "
            "kernels per tensor; torch._foreach_mul + torch._foreach_copy_"
        ),
        applies=_megatron_local_multi_tensor_ops,
        install=_install_foreach_scale,
        test="tests/patches/test_performance.py::test_foreach_scale_matches_reference",
    ),
    Patch(
        name="moe_utils.permute->nonzero_static",
        kind="performance",
        targets=(
            Target("megatron.core.transformer.moe.moe_utils", "permute", own=True),
            Target("megatron.core.transformer.moe.token_dispatcher", "permute"),
        ),
        when="always",
        why=(
            "permute finds each expert's tokens with masked_select, whose output size is data"
            " dependent, so every MoE forward waited twice for the GPU; dropless dispatchers know"
            " the size, and torch.nonzero_static with it gives the same indices in the same order,"
            " no sync"
        ),
        applies=lambda: True,
        install=_install_sync_free_permute,
        test="tests/patches/test_performance.py::test_sync_free_permute_matches_megatron",
    ),
]
