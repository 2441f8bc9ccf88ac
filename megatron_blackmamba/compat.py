"""The few places where megatron-core 0.16.1 assumes CUDA or Transformer Engine, patched here.

megatron-core is written for CUDA machines with Transformer Engine (TE). BlackMamba must also run
on CPU (tests, the tiny main job, CI) and on CUDA machines without TE. Rather than forking
megatron code, this module patches exactly the assumptions that break, and nothing is patched on
a machine that has what megatron expects:

Without Transformer Engine (CPU or CUDA):
  * ``MambaStack`` builds its final norm with ``TENorm`` unconditionally -> this project's
    sequence-parallel-aware torch ``RMSNorm`` (model/norm.py).
  * ``moe_utils`` only binds ``te_general_gemm`` inside its TE import branch, yet the router
    gating reads the name -> bind it to ``None`` so the plain ``torch.mm`` path runs.

Without the ``grouped_gemm`` package (CPU or CUDA):
  * megatron's ``GroupedMLP`` (``model.moe_grouped_gemm=true``) needs it -> kernels/grouped_gemm.py,
    the same op on ``torch._grouped_mm`` (or a per-expert loop where that kernel does not apply).

Without apex or Transformer Engine (CPU or CUDA), i.e. where megatron falls back to its local
multi-tensor helpers:
  * ``local_multi_tensor_l2_norm`` (gradient-norm for clipping) reads every tensor's norm back to
    the host, one device sync per parameter -> one ``torch._foreach_norm`` with no host sync.
  * ``local_multi_tensor_scale`` (main -> model param copies, grad clipping) launches two kernels
    per tensor -> ``torch._foreach_mul`` + ``torch._foreach_copy_``.
  (megatron's torch AdamW fallback is switched to its fused kernel by
  ``training.setup.build_optimizer``.)

Everywhere (a host sync in megatron's unfused token permutation):
  * ``moe_utils.permute`` finds each expert's tokens with ``masked_select``, whose output size is
    data-dependent, so every MoE layer's forward waited twice for the GPU. Dropless dispatchers
    already pass the output size (tokens x top-k) -> ``torch.nonzero_static`` with that size, the
    same indices in the same order, no sync. Other calls (token dropping, fused, padded) are
    unchanged.

Without CUDA:
  * ``torch.cuda.current_device()`` is used as a device for buffers (global memory buffer, router
    weights, MoE token counters, DDP grad buffers) -> returns the CPU device.
  * ``torch.cuda.synchronize()`` is called unconditionally by dist_checkpointing's save path ->
    a no-op (there is no device work to wait for).
  * ``Tensor.cuda()`` is called on the tied embedding when pipeline stages sync it -> returns
    the tensor itself (on a CPU-only build it could only raise).
  * the pipeline schedules, the optimizer, gradient clipping and megatron.core.utils' local
    multi-tensor fallbacks allocate small bookkeeping
    tensors with ``device="cuda"`` -> those modules see a ``torch`` whose tensor factories map
    that device to the CPU.
  * ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'`` ->
    the optimizer calls a CPU version that scales the same grads by the same coefficient.
  * megatron's DistributedOptimizer checks parameter types against ``torch.cuda.*Tensor`` names,
    which no patch here can satisfy -> not patched: ``use_distributed_optimizer`` resolves to
    the replicated optimizer on CPU (see ``model.builder.use_distributed_optimizer``).
  * ``torch.cuda.Stream``/``Event`` used by some dispatch and timing paths -> not patched: callers
    must pick the ``allgather`` dispatcher on CPU (``resolve_moe_dispatcher`` does that).

Call :func:`apply` once, before building models; it is idempotent and returns what it patched.
"""

from __future__ import annotations

import logging
import types

import torch

logger = logging.getLogger(__name__)

_applied: list[str] | None = None


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def apply() -> list[str]:
    """Patch what this machine lacks; returns the names of the patches applied."""
    global _applied
    if _applied is not None:
        return _applied
    patches: list[str] = []
    if not have_transformer_engine():
        patches += _patch_no_te()
    patches += _patch_local_multi_tensor_ops()
    patches += _patch_grouped_gemm()
    patches += _patch_sync_free_permute()
    if not torch.cuda.is_available():
        patches += _patch_no_cuda()
    if patches:
        logger.info("megatron-core compatibility patches: %s", ", ".join(patches))
    _applied = patches
    return patches


def _patch_no_te() -> list[str]:
    from megatron.core.ssm import mamba_block
    from megatron.core.transformer.moe import moe_utils

    from megatron_blackmamba.model.norm import RMSNorm

    mamba_block.TENorm = RMSNorm
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return ["mamba_block.TENorm->RMSNorm", "moe_utils.te_general_gemm=None"]


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm (no per-tensor norms): ([total L2 norm] fp32, None)."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale) -> None:
    """Drop-in for amp_C.multi_tensor_scale: dst = src * scale, list-wise (dst may be src)."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _patch_grouped_gemm() -> list[str]:
    from megatron.core.transformer.moe import grouped_gemm_util

    if grouped_gemm_util.grouped_gemm_is_available():
        return []
    from megatron_blackmamba.kernels import grouped_gemm

    grouped_gemm_util.grouped_gemm = grouped_gemm.package
    grouped_gemm_util.ops = grouped_gemm.ops
    return ["grouped_gemm->torch._grouped_mm"]


def dropless_order(routing_map: torch.Tensor, num_out_tokens: int, probs: torch.Tensor | None = None):
    """(token index, its prob or None) of every routed (token, expert) pair, expert by expert and
    tokens in order within an expert: megatron's permute order, without a host sync."""
    num_tokens = routing_map.shape[0]
    # Row-major nonzeros of the [experts, tokens] mask, exactly what megatron's masked_select yields.
    flat = torch.nonzero_static(routing_map.bool().T.contiguous().view(-1), size=num_out_tokens).view(-1)
    permuted_probs = None if probs is None else probs.T.contiguous().view(-1).index_select(0, flat)
    return flat % num_tokens, permuted_probs


def permute_known_size(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
    """megatron's ``permute`` (same signature and results) without a host sync when the dropless
    output size ``num_out_tokens`` is a Python int; anything else goes to megatron's version."""
    if fused or drop_and_pad or not isinstance(num_out_tokens, int):
        return _MEGATRON_PERMUTE(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad)
    sorted_indices, permuted_probs = dropless_order(routing_map, num_out_tokens, probs)
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


_MEGATRON_PERMUTE = None  # megatron's own permute, for the calls permute_known_size passes on


def _patch_sync_free_permute() -> list[str]:
    global _MEGATRON_PERMUTE
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if moe_utils.permute is permute_known_size:
        return []
    _MEGATRON_PERMUTE = moe_utils.permute
    moe_utils.permute = token_dispatcher.permute = permute_known_size
    return ["moe_utils.permute->nonzero_static (no host sync)"]


def _patch_local_multi_tensor_ops() -> list[str]:
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer

    patched = []
    if clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
        patched.append("clip_grads.l2_norm_impl->foreach")
    for module in (clip_grads, megatron_optimizer):
        if module.multi_tensor_scale_impl is megatron_utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _foreach_scale
            patched.append(f"{module.__name__.rsplit('.', 1)[-1]}.multi_tensor_scale_impl->foreach")
    return patched


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_device_sync(device=None) -> None:
    return None


class _TorchOnCpu(types.ModuleType):
    """``torch`` as seen by a few megatron modules: identical, except tensor factories called
    with ``device="cuda"`` allocate on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def _cpu(device):
        return "cpu" if device in ("cuda", torch.device("cuda")) else device

    def tensor(self, *args, device=None, **kwargs):
        return torch.tensor(*args, device=self._cpu(device), **kwargs)

    def zeros(self, *args, device=None, **kwargs):
        return torch.zeros(*args, device=self._cpu(device), **kwargs)


def _clip_grad_by_total_norm_cpu(parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False) -> None:
    """megatron's clip_grad_by_total_norm_fp32 without its CUDA tensor-type assertion."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _stay_on_cpu(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def _patch_no_cuda() -> list[str]:
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads, grad_scaler
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.pipeline_parallel import schedules

    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_device_sync
    torch.Tensor.cuda = _stay_on_cpu
    for module in (schedules, megatron_optimizer, clip_grads, grad_scaler, megatron_utils):
        module.torch = _TorchOnCpu()
    megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    return [
        "torch.cuda.current_device->cpu",
        "torch.cuda.synchronize->no-op",
        "Tensor.cuda->identity",
        "schedules/optimizer/clip_grads/grad_scaler/utils: torch factories(cuda)->cpu",
        "optimizer.clip_grad_by_total_norm_fp32->cpu version",
    ]


def resolve_moe_dispatcher(requested: str, experts_local: bool) -> str:
    """The token dispatcher to build: 'local', 'allgather' or 'alltoall'.

    'auto' -> 'local' (model/local_dispatcher.py: no communication, no host syncs) when every
    expert is on this rank (``experts_local``: EP = expert-TP = 1), else megatron's alltoall on
    CUDA and allgather on CPU (alltoall needs CUDA streams).
    """
    if requested == "auto":
        if experts_local:
            return "local"
        return "alltoall" if torch.cuda.is_available() else "allgather"
    if requested == "local" and not experts_local:
        raise ValueError(
            "parallel.moe_dispatcher=local needs every expert on this rank (parallel.ep=1 and tp=1); "
            "use parallel.moe_dispatcher=auto"
        )
    if requested == "alltoall" and not torch.cuda.is_available():
        raise ValueError(
            "parallel.moe_dispatcher=alltoall needs CUDA (megatron creates torch.cuda streams); "
            "use parallel.moe_dispatcher=allgather or auto on CPU"
        )
    if requested not in ("local", "allgather", "alltoall"):
        raise ValueError(f"parallel.moe_dispatcher={requested!r}: choose auto, local, allgather or alltoall")
    return requested
