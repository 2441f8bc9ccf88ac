"""Cross-field checks of a job config: what would otherwise fail after the queue, or mid-run.

``check_job`` runs inside ``load_config`` (so the trainer, the launch scripts and every tool see
the same rules) and in ``launch/print_layout.py``, which also prints the derived numbers. It
imports no torch or megatron, so it runs in a fraction of a second on a login node.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_blackmamba.config.schema import JobConfig

# Environment variables with a fixed set of values (read by megatron_blackmamba.kernels).
ENV_CHOICES = {
    "BLACKMAMBA_KERNEL_BACKEND": ("auto", "torch", "cuda"),
    "BLACKMAMBA_SCAN_KERNEL": ("auto", "blackmamba", "mamba_ssm"),
}


@dataclass
class CheckResult:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def closest(name: str, choices: Sequence[str]) -> str:
    """' (did you mean X?)' for the nearest of ``choices``, or '' if none is near."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def check_job(
    job: JobConfig, world_size: Optional[int] = None, gpus_per_node: Optional[int] = None
) -> CheckResult:
    """Every problem of ``job``; with ``world_size`` also the layout's divisibility rules."""
    result = CheckResult()
    _check_ranges(job, result.errors)
    _check_model(job, result)
    _check_schedule(job, result.errors)
    _check_data(job, result.errors)
    _check_logging(job, result.errors)
    _check_environment(result.errors)
    if world_size is not None:
        _check_world(job, world_size, gpus_per_node, result)
    return result


def _check_ranges(job: JobConfig, errors: list[str]) -> None:
    at_least = {
        1: (
            "model.vocab_size",
            "model.hidden_size",
            "model.num_layers",
            "model.d_state",
            "model.d_conv",
            "model.expand",
            "model.num_experts",
            "model.sinkhorn_max_iters",
            "model.max_seq_length",
            "parallel.tp",
            "parallel.pp",
            "parallel.ep",
            "training.seq_length",
            "training.micro_batch_size",
            "training.global_batch_size",
            "training.log_interval",
            "checkpoint.save_interval",
        ),
        0: (
            "model.dt_rank",
            "model.ffn_hidden_size",
            "parallel.etp",
            "training.train_iters",
            "training.warmup_iters",
            "training.eval_interval",
            "training.eval_iters",
            "training.stop_after",
            "training.eval_tasks_interval",
            "training.eval_tasks_limit",
            "training.lr_wsd_decay_iters",
            "data.num_workers",
            "checkpoint.keep_last",
            "logging.expert_load_interval",
            "logging.peak_tflops",
            "training.weight_decay",
            "training.clip_grad",
            "training.min_lr",
            "model.aux_loss_coeff",
        ),
    }
    for low, names in at_least.items():
        for name in names:
            section, attr = name.split(".")
            value = getattr(getattr(job, section), attr)
            if value < low:
                errors.append(f"{name}={value} must be >= {low}")
    t = job.training
    for name in ("lr", "adam_eps"):
        if getattr(t, name) <= 0:
            errors.append(f"training.{name}={getattr(t, name)} must be > 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            errors.append(f"training.{name}={getattr(t, name)} must be in [0, 1)")
    if t.min_lr > t.lr:
        errors.append(f"training.min_lr={t.min_lr} is above training.lr={t.lr}")
    if not t.train_iters and t.train_tokens <= 0:
        errors.append(
            "training.train_iters=0 needs training.train_tokens > 0 to derive the step count"
        )
    m = job.model
    if not 0 < m.dt_min <= m.dt_max:
        errors.append(
            f"model.dt_min={m.dt_min} and dt_max={m.dt_max} must satisfy 0 < dt_min <= dt_max"
        )
    if (
        m.sinkhorn_tol <= 0
        or m.sinkhorn_temperature <= 0
        or m.norm_epsilon <= 0
        or m.init_method_std <= 0
    ):
        errors.append(
            "model.sinkhorn_tol, sinkhorn_temperature, norm_epsilon and init_method_std must be > 0"
        )


def _check_model(job: JobConfig, result: CheckResult) -> None:
    m, p, t = job.model, job.parallel, job.training
    errors = result.errors
    try:
        result.info["pattern"] = m.resolved_layer_pattern()
    except ValueError as exc:
        errors.append(str(exc))
        result.info["pattern"] = ""
    try:
        etp = p.resolved_etp()
    except ValueError as exc:
        errors.append(str(exc))
        etp = p.tp
    result.info.update(tp=p.tp, pp=p.pp, ep=p.ep, etp=etp)
    if min(p.tp, p.ep, etp) < 1:
        return
    if m.num_experts % p.ep:
        errors.append(f"parallel.ep={p.ep} must divide model.num_experts={m.num_experts}")
    else:
        result.info["local_experts"] = m.num_experts // p.ep
    if not 1 <= m.moe_topk <= m.num_experts:
        errors.append(f"model.moe_topk={m.moe_topk} must be in 1..num_experts={m.num_experts}")
    d_inner = m.expand * m.hidden_size
    if d_inner % p.tp:
        errors.append(f"parallel.tp={p.tp} must divide d_inner = expand*hidden = {d_inner}")
    if m.resolved_ffn_hidden_size() % etp:
        errors.append(
            f"expert tp={etp} must divide the expert ffn width {m.resolved_ffn_hidden_size()}"
        )
    if m.vocab_size % p.tp:
        errors.append(f"parallel.tp={p.tp} must divide model.vocab_size={m.vocab_size}")
    if m.vocab_size % 128:
        result.warnings.append(
            f"model.vocab_size={m.vocab_size} is not a multiple of 128 (slower GEMMs)"
        )
    if result.info["pattern"] and p.pp > 1 and len(result.info["pattern"]) % p.pp:
        result.warnings.append(f"{m.num_layers} layers do not split evenly over pp={p.pp} stages")
    if m.routing == "sinkhorn" and m.aux_loss_coeff:
        errors.append(
            "model.aux_loss_coeff must be 0 with model.routing=sinkhorn (Sinkhorn balances instead)"
        )
    if p.moe_capacity_factor is not None and p.moe_capacity_factor <= 0:
        errors.append(
            f"parallel.moe_capacity_factor={p.moe_capacity_factor} must be > 0 (null = dropless)"
        )
    if p.moe_capacity_factor is not None and p.moe_dispatcher == "local":
        errors.append(
            "parallel.moe_dispatcher=local is dropless: with parallel.moe_capacity_factor use"
            " auto, allgather or alltoall"
        )
    if p.moe_dispatcher == "local" and (p.ep > 1 or etp > 1):
        errors.append(
            "parallel.moe_dispatcher=local needs every expert on the rank (ep=1, etp=1; got"
            f" ep={p.ep}, etp={etp}): use auto, allgather or alltoall"
        )
    if t.global_batch_size % t.micro_batch_size:
        errors.append(
            f"training.global_batch_size={t.global_batch_size} must be a multiple of "
            f"training.micro_batch_size={t.micro_batch_size}"
        )
    if t.fp8 != "none":
        _check_fp8(job, errors)


def _check_fp8(job: JobConfig, errors: list[str]) -> None:
    """What training.fp8 needs of the model; the GPU itself is checked where training starts."""
    m, t = job.model, job.training
    needs = {
        "model.moe_grouped_gemm=true (the fp8 GEMMs are the grouped ones)": m.moe_grouped_gemm,
        "training.fused_wgrad_accumulation=true (weight gradients go into fp32 main grads)": (
            t.fused_wgrad_accumulation
        ),
        "training.precision bf16 or auto (fp8 replaces bf16 GEMMs)": t.precision != "fp32",
        "model.hidden_size and the expert ffn width multiples of 16 (fp8 GEMM alignment)": (
            m.hidden_size % 16 == 0 and m.resolved_ffn_hidden_size() % 16 == 0
        ),
    }
    for need, met in needs.items():
        if not met:
            errors.append(f"training.fp8={t.fp8} needs {need}")


def _check_schedule(job: JobConfig, errors: list[str]) -> None:
    t = job.training
    if t.global_batch_size < 1 or t.seq_length < 1 or (not t.train_iters and t.train_tokens <= 0):
        return
    iters = t.resolved_train_iters()
    if t.lr_decay_style == "WSD" and not 0 < t.lr_wsd_decay_iters <= iters:
        errors.append(
            "training.lr_decay_style=WSD needs 0 < training.lr_wsd_decay_iters <= train iters"
            f" ({iters}); got {t.lr_wsd_decay_iters}"
        )
    if t.eval_tasks:
        if importlib.util.find_spec("lm_eval") is None:
            errors.append(
                "training.eval_tasks needs lm-evaluation-harness: pip install"
                " 'megatron_blackmamba[eval]'"
            )
        p = job.parallel
        if (p.tp, p.pp, p.ep) != (1, 1, 1):
            errors.append(
                "training.eval_tasks scores the model in memory, which needs parallel.tp=pp=ep=1"
                f" (got {p.tp}, {p.pp}, {p.ep}): evaluate this layout's checkpoints with"
                " blackmamba-eval"
            )
        if not (t.eval_tasks_interval or t.eval_interval):
            errors.append(
                "training.eval_tasks needs training.eval_tasks_interval (or eval_interval) > 0"
            )
        if t.eval_tasks_include and not os.path.isdir(t.eval_tasks_include):
            errors.append(f"training.eval_tasks_include={t.eval_tasks_include} is not a folder")
    if t.eval_interval and t.eval_iters < 1:
        errors.append(
            f"training.eval_interval={t.eval_interval} needs training.eval_iters >= 1 "
            "(or eval_interval=0 to disable validation)"
        )


def split_weights(text: str) -> Optional[list[float]]:
    """'969,30,1' -> [969, 30, 1]; None if it is not three non-negative numbers with a positive
    sum."""
    parts = text.replace("/", ",").split(",")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        return None
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        return None
    return weights


def _check_data(job: JobConfig, errors: list[str]) -> None:
    d, t = job.data, job.training
    if d.blend not in ("sample", "mock") and not d.tokenizer:
        errors.append(
            f"data.blend={d.blend} needs data.tokenizer: the tokenizer.json the data was prepared"
            " with"
        )
    weights = split_weights(d.split)
    if weights is None:
        errors.append(
            f"data.split={d.split!r} must be three non-negative numbers 'train,valid,test' (e.g."
            " 969,30,1)"
        )
    elif t.eval_interval and not d.valid_blend and weights[1] == 0 and d.blend != "mock":
        errors.append(
            f"training.eval_interval={t.eval_interval} but data.split={d.split!r} holds out no"
            " validation data: give the split a validation share, set data.valid_blend, or"
            " training.eval_interval=0"
        )


def _check_logging(job: JobConfig, errors: list[str]) -> None:
    lg = job.logging
    hint = "pip install 'megatron_blackmamba[logging]'"
    if lg.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        errors.append(
            f"logging.tensorboard_dir={lg.tensorboard_dir} but tensorboard is not installed:"
            f" {hint}, or logging.tensorboard_dir=null"
        )
    if (
        lg.wandb_project
        and lg.wandb_mode != "disabled"
        and importlib.util.find_spec("wandb") is None
    ):
        errors.append(
            f"logging.wandb_project={lg.wandb_project} but wandb is not installed: {hint}, "
            "or logging.wandb_project=null"
        )


def _check_environment(errors: list[str]) -> None:
    for name, choices in ENV_CHOICES.items():
        value = os.environ.get(name)
        if value is not None and value.strip().lower() not in choices:
            errors.append(
                f"environment {name}={value!r} is not one of"
                f" {' | '.join(choices)}{closest(value, choices)}"
            )


def _check_world(
    job: JobConfig, world: int, gpus_per_node: Optional[int], result: CheckResult
) -> None:
    p, t = job.parallel, job.training
    etp = result.info["etp"]
    result.info["world"] = world
    if min(p.tp, p.pp, p.ep, etp) < 1:
        return
    if world % (p.tp * p.pp):
        result.errors.append(
            f"world size {world} is not divisible by parallel.tp*pp = {p.tp * p.pp}"
        )
        return
    if (world // p.pp) % (p.ep * etp):
        result.errors.append(
            f"parallel.ep*etp = {p.ep * etp} must divide world/pp = {world // p.pp}"
        )
        return
    dp = world // (p.tp * p.pp)
    result.info.update(dp=dp, expert_dp=world // (p.pp * p.ep * etp))
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        result.errors.append(
            f"training.global_batch_size={t.global_batch_size} must be a multiple of "
            f"micro_batch_size*dp = {t.micro_batch_size}*{dp} = {per_step} at world size {world}"
        )
    else:
        result.info["microbatches"] = t.global_batch_size // per_step
    if gpus_per_node:
        if p.tp > gpus_per_node:
            result.warnings.append(
                f"tp={p.tp} spans nodes (gpus_per_node={gpus_per_node}): TP traffic leaves NVLink"
            )
        if p.ep * etp > gpus_per_node:
            result.warnings.append(
                f"ep*etp={p.ep * etp} spans nodes: the MoE all-to-all leaves NVLink"
            )
