"""The distributed optimizer's checkpoint state, made correct for bf16 training with torch's Adam.

megatron-core 0.16.1's DistributedOptimizer is exercised upstream with apex/TE's Adam and models
whose parameters share one dtype. BlackMamba on GPU has neither: without apex/TE megatron falls
back to torch's Adam, and the Mamba mixer keeps A_log and D in fp32 beside bf16 parameters. Three
gaps follow, each of which broke checkpointing on GPU (the CPU path uses megatron's replicated
optimizer, which has none of them): the first save crashed, and so would every resume. Two are
repaired here on each optimizer instance; the third is a method of the class, replaced by the
patch "DistributedOptimizer loads saved states only" (megatron_blackmamba/patches).
tests/training/test_optimizer_state_pairing.py checks the result on a GPU.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer


def inner_optimizers(optimizer) -> list:
    """The dense and expert optimizers (megatron chains them) or the one optimizer."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def make_checkpointable(optimizer) -> None:
    """Repair every distributed optimizer inside ``optimizer`` (call once, at build)."""
    for inner in inner_optimizers(optimizer):
        if isinstance(inner, DistributedOptimizer):
            _pair_mixed_dtype_params_with_their_state(inner)
            if not HAVE_APEX_OR_TE:
                _allocate_torch_adam_state(inner)


def _pair_mixed_dtype_params_with_their_state(optimizer: DistributedOptimizer) -> None:
    """Point megatron's checkpoint bookkeeping at each parameter's own main copy and Adam state.

    The optimizer records each parameter's position in its group, then reorders every group to
    [fp32 params, fp32 copies of 16-bit params] without updating the record
    (NVIDIA/Megatron-LM#2777,
    fixed upstream after 0.16.1). Optimizer steps never read it; checkpoint save and load do. A
    group
    mixing A_log and D with bf16 biases and norm weights made the first save crash on a size
    mismatch,
    and where two sizes agree one parameter's state would be saved and loaded as another's.
    """
    for group, (fp32, float16) in enumerate(
        zip(optimizer.model_fp32_groups, optimizer.model_float16_groups)
    ):
        for order, param in enumerate([*fp32, *float16]):  # the order the group now holds
            optimizer.model_param_group_index_map[param] = (group, order)


def _allocate_torch_adam_state(optimizer: DistributedOptimizer) -> None:
    """Give torch's Adam its state at build instead of at its first step.

    ``state_dict()`` takes the step from every parameter's torch Adam state and asserts there is
    exactly one value, so an optimizer that has not stepped yet (what a resuming job loads into)
    cannot build its checkpoint-load template. The state is what torch's Adam would create on its
    first step: zero moments (megatron's own init_state_fn) and step 0, on the parameter's device
    where the fused kernel keeps it. A fresh run's first step then holds the memory a resumed run's
    holds, so the peak it reports is the peak a resume needs.
    """
    if optimizer.optimizer.state:
        return
    optimizer.init_state_fn(optimizer.optimizer, optimizer.config)
    for group in optimizer.optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for param in group["params"]:
            device = param.device if on_device else torch.device("cpu")
            optimizer.optimizer.state[param]["step"] = torch.zeros(
                (), dtype=torch.float32, device=device
            )
