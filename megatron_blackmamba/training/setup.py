"""Model, DDP wrapper, optimizer and LR scheduler for one rank, all from megatron-core."""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.moe.experts import GroupedMLP

from megatron_blackmamba.config import ConfigError, JobConfig
from megatron_blackmamba.kernels.fp8 import fp8_blocker
from megatron_blackmamba.model.builder import build_model, params_dtype, use_distributed_optimizer
from megatron_blackmamba.training.optimizer_state import inner_optimizers, make_checkpointable
from megatron_blackmamba.training.step import device


def _expert_weights_always_expert_parallel(model: torch.nn.Module) -> None:
    """Give expert weights their own grad buffers and optimizer at every EP size.

    megatron only separates them when EP > 1, which makes the optimizer a single one at EP=1 and a
    chain of two at EP>1, so optimizer checkpoints would not load across EP sizes. At EP=1 the
    expert-data-parallel group is the data-parallel group, so gradient reduction is unchanged.
    """
    for name, param in model.named_parameters():
        if ".experts." in name:
            param.allreduce = False


def _expert_wgrad_into_main_grad(model: torch.nn.Module) -> None:
    """Let the grouped experts' GEMMs accumulate their weight gradients into DDP's fp32 main
    grads (kernels/grouped_gemm.py) instead of producing bf16 gradients for DDP to add."""
    for module in model.modules():
        if isinstance(module, GroupedMLP):
            module.weight1.wgrad_into_main_grad = module.weight2.wgrad_into_main_grad = True


def _require_fp8_device(recipe: str) -> None:
    """Refuse training.fp8 where its kernels do not run, before the model or any data is built."""
    blocker = fp8_blocker()
    if blocker:
        raise ConfigError([f"training.fp8={recipe}: {blocker}; use training.fp8=none"])


def _experts_in_fp8(model: torch.nn.Module, recipe: str) -> None:
    """Mark the grouped experts' weights for fp8 GEMMs (kernels/grouped_gemm.py)."""
    for module in model.modules():
        if isinstance(module, GroupedMLP):
            experts, hidden = module.num_local_experts, module.config.hidden_size
            module.weight1.fp8_recipe = module.weight2.fp8_recipe = recipe
            # The [E, k, n] views GroupedMLP.forward multiplies by.
            module.weight1.fp8_view, module.weight2.fp8_view = (
                (experts, hidden, -1),
                (experts, -1, hidden),
            )


def build_training_model(job: JobConfig) -> torch.nn.Module:
    """The model as training builds it: with training.cuda_graphs honoured (generation and
    checkpoint conversion build without graphs)."""
    return build_model(job, cuda_graphs=job.training.cuda_graphs)


def build_ddp_model(
    job: JobConfig, build: Callable[[JobConfig], torch.nn.Module] = build_training_model
) -> list[DistributedDataParallel]:
    """This rank's model chunk on its device, wrapped in megatron DDP (grad buffers, DP/EP reduce).

    ``build`` makes the bare model (benchmarks pass baselines built from the same config)."""
    if job.training.fp8 != "none":
        _require_fp8_device(job.training.fp8)
    model = build(job).to(device())
    _expert_weights_always_expert_parallel(model)
    config = model.config
    use_dist_opt = use_distributed_optimizer(job)
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            # Off: the reduction must not wait on per-parameter hooks, which the grouped experts'
            # weights never fire (their gradients go straight into the main grads:
            # kernels/grouped_gemm.py).
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_dist_opt,
        ),
        module=model,
    )
    if job.training.fused_wgrad_accumulation:
        _expert_wgrad_into_main_grad(model)
    if job.training.fp8 != "none":
        _experts_in_fp8(model, job.training.fp8)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return [ddp]


def _no_weight_decay(param: torch.nn.Parameter) -> bool:
    """Biases, norm weights (1-D) and the SSM's A_log / D (marked by the mixer) are not decayed."""
    return param.dim() == 1 or getattr(param, "_no_weight_decay", False)


def build_optimizer(job: JobConfig, model: list[DistributedDataParallel]):
    t = job.training
    dtype = params_dtype(job)
    config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        # Whatever the DDP wrapper resolved (the distributed optimizer needs its grad buffers).
        use_distributed_optimizer=model[0].ddp_config.use_distributed_optimizer,
    )
    overrides = {
        ParamKey(predicate=ParamPredicate(name="no_weight_decay", fn=_no_weight_decay)): {
            "wd_mult": 0.0
        }
    }
    optimizer = get_megatron_optimizer(config, model, config_overrides=overrides)
    _use_fused_torch_adam(optimizer)
    make_checkpointable(optimizer)
    return optimizer


def _use_fused_torch_adam(optimizer) -> None:
    """Without apex/TE megatron falls back to torch's AdamW in its default multi-tensor (foreach)
    mode; its single fused kernel (CUDA and CPU) does the same update in one pass over the state."""
    from megatron.core import optimizer as megatron_optim

    if not megatron_optim.USING_PYTORCH_OPTIMIZER:
        return
    for inner in inner_optimizers(optimizer):
        for group in inner.optimizer.param_groups:
            group["fused"], group["foreach"] = True, False


def build_scheduler(job: JobConfig, optimizer) -> OptimizerParamScheduler:
    """Linear warmup then cosine (or linear/constant) decay to min_lr, counted in samples."""
    t = job.training
    iters = t.resolved_train_iters()
    gbs = t.global_batch_size
    warmup = min(t.warmup_iters, max(iters - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup * gbs,
        lr_decay_steps=max(iters, 1) * gbs,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(iters, 1) * gbs,
        wd_incr_style="constant",
    )


def num_microbatches(job: JobConfig, data_parallel_size: int) -> int:
    t = job.training
    per_step = t.micro_batch_size * data_parallel_size
    if t.global_batch_size % per_step:
        raise ValueError(
            f"training.global_batch_size={t.global_batch_size} must be a multiple of "
            f"micro_batch_size*data_parallel_size={per_step}"
        )
    return t.global_batch_size // per_step
