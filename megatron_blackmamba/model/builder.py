"""JobConfig -> megatron TransformerConfig -> MambaModel with the BlackMamba stack spec."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.mamba import MambaModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from megatron_blackmamba import patches
from megatron_blackmamba.config import JobConfig
from megatron_blackmamba.model.language_model import BlackMambaModel
from megatron_blackmamba.model.spec import blackmamba_stack_spec

logger = logging.getLogger(__name__)

# Gate activation of the expert MLP; every choice but "gelu" is a gated linear unit.
_ACTIVATIONS = {"gelu": F.gelu, "swiglu": F.silu, "geglu": F.gelu}


def use_distributed_optimizer(job: JobConfig) -> bool:
    """megatron-core 0.16.1's DistributedOptimizer only accepts torch.cuda tensors, so on CPU the
    replicated (DDP all-reduce) optimizer runs instead; results are identical, memory is not."""
    wanted = job.parallel.distributed_optimizer
    if wanted and not torch.cuda.is_available():
        logger.info(
            "parallel.distributed_optimizer=true needs CUDA; using the replicated optimizer on CPU"
        )
        return False
    return wanted


def params_dtype(job: JobConfig) -> torch.dtype:
    precision = job.training.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def moe_graph_blocker(job: JobConfig) -> str | None:
    """Why this job's MoE layers cannot be replayed from CUDA graphs, or None if they can.

    A captured layer must neither wait for the host nor read a host value that changes between
    micro-batches (the expert sizes do). The MoE layer meets that on one path: all experts on the
    rank (the local dispatcher), Sinkhorn routing, bf16 grouped GEMMs on torch._grouped_mm and
    their weight gradients summed by the Triton kernel (kernels/grouped_gemm.py).
    """
    from megatron.core.transformer.moe import grouped_gemm_util

    from megatron_blackmamba.kernels import grouped_gemm
    from megatron_blackmamba.kernels.triton_support import triton_kernels

    m, t = job.model, job.training
    dispatcher = moe_dispatcher(job)
    if dispatcher == "alltoall" and job.parallel.moe_capacity_factor is not None:
        return (
            "the alltoall dispatcher padded to capacity has static shapes, but its replay from"
            " CUDA graphs is not verified yet (it needs a multi-GPU machine)"
        )
    if dispatcher != "local":
        return f"the {dispatcher} token dispatcher moves expert token counts through the host"
    if m.routing != "sinkhorn":
        return f"model.routing={m.routing} is not checked under graphs"
    if not m.moe_grouped_gemm:
        return "model.moe_grouped_gemm=false: the per-expert MLPs split the tokens on the host"
    if not t.fused_wgrad_accumulation:
        return (
            "training.fused_wgrad_accumulation=false: torch._grouped_mm's own backward is not"
            " checked under graphs"
        )
    blocker = grouped_gemm.torch_grouped_mm_blocker(
        params_dtype(job),
        torch.cuda.get_device_capability(),
        m.hidden_size,
        m.resolved_ffn_hidden_size(),
    )
    if blocker:
        return blocker
    if grouped_gemm_util.grouped_gemm not in (None, grouped_gemm.package):  # patches install ours
        return "the grouped_gemm package takes the expert sizes on the host"
    if triton_kernels("grouped_wgrad_triton") is None:
        return "Triton is not installed (the experts' weight gradients would be split on the host)"
    return None


def graphed_layers(job: JobConfig, cuda_graphs: bool) -> tuple[str, str]:
    """(which layers replay CUDA graphs: 'all', 'mamba' or 'none'; why not more, or '')."""
    wanted = job.training.cuda_graph_layers
    if not (cuda_graphs and torch.cuda.is_available()):
        return "none", ""
    if wanted == "mamba":
        return "mamba", ""
    blocker = moe_graph_blocker(job)
    return ("mamba", f"MoE layers eager: {blocker}") if blocker else ("all", "")


def transformer_config(job: JobConfig, cuda_graphs: bool = False) -> TransformerConfig:
    """The megatron config BlackMamba's layers read; attention fields are placeholders (no
    attention).

    ``cuda_graphs``: layers replay megatron's per-layer training graphs (on CUDA only; which ones:
    ``graphed_layers``); training asks for them (training.setup.build_training_model), inference
    never does."""
    m, p = job.model, job.parallel
    cuda = torch.cuda.is_available()
    graphs, _ = graphed_layers(job, cuda_graphs)
    dtype = params_dtype(job)
    dispatcher = moe_dispatcher(job)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=p.tp,  # unused (no attention); megatron checks it divides by TP
        ffn_hidden_size=m.resolved_ffn_hidden_size(),
        moe_ffn_hidden_size=m.resolved_ffn_hidden_size(),
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_topk,
        # The router owns Sinkhorn (model/router.py): megatron is told "none", which also lets it
        # accept an expert capacity factor (0.16.1 refuses one with its own Sinkhorn).
        moe_router_load_balancing_type="none" if m.routing == "sinkhorn" else m.routing,
        moe_aux_loss_coeff=m.aux_loss_coeff,
        # Post-softmax top-1 would gate every token with weight 1.0; megatron needs pre-softmax.
        # (The Sinkhorn router gates with its own sigmoid and never reads this.)
        moe_router_pre_softmax=m.moe_topk == 1,
        moe_router_dtype="fp32",
        # The local dispatcher replaces megatron's inside LocalDispatchMoELayer; allgather is the
        # cheap, device-agnostic one megatron builds first.
        moe_token_dispatcher_type="allgather" if dispatcher == "local" else dispatcher,
        moe_grouped_gemm=m.moe_grouped_gemm,
        moe_expert_capacity_factor=p.moe_capacity_factor,
        # Padding to capacity is the alltoall dispatcher's (allgather drops without padding).
        moe_pad_expert_input_to_capacity=p.moe_capacity_factor is not None
        and dispatcher == "alltoall",
        add_bias_linear=m.add_bias_linear,
        gated_linear_unit=m.activation != "gelu",
        activation_func=_ACTIVATIONS[m.activation],
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.resolved_etp(),
        # megatron's MoE layer refuses TP > 1 without sequence parallelism in training.
        sequence_parallel=p.sequence_parallel or p.tp > 1,
        # A stage hands on the residual stream, which model.residual_in_fp32 keeps in fp32.
        pipeline_dtype=torch.float32 if m.residual_in_fp32 else dtype,
        use_cpu_initialization=not cuda,
        bias_dropout_fusion=cuda,
        gradient_accumulation_fusion=False,
        recompute_granularity=None,
        # Per-layer graphs: an empty scope graphs every layer (megatron's 'moe' scope is for
        # padded MoE layers only; BlackMamba's dropless ones are graph-safe on their own path).
        cuda_graph_impl="none" if graphs == "none" else "local",
        cuda_graph_scope="mamba" if graphs == "mamba" else [],
    )


def moe_dispatcher(job: JobConfig) -> str:
    """'local', 'allgather' or 'alltoall' for this job's parallel layout
    (resolve_moe_dispatcher)."""
    p = job.parallel
    # The local dispatcher is dropless: with a capacity factor, experts on the rank or not, the
    # tokens go through megatron's dispatchers, which honour the router's drops.
    local = p.ep == 1 and p.resolved_etp() == 1 and p.moe_capacity_factor is None
    return resolve_moe_dispatcher(p.moe_dispatcher, experts_local=local)


def resolve_moe_dispatcher(requested: str, experts_local: bool) -> str:
    """The token dispatcher to build: 'local', 'allgather' or 'alltoall'.

    'auto' -> 'local' (model/local_dispatcher.py: no communication, no host syncs) when every
    expert is on this rank and no token is dropped (``experts_local``: EP = expert-TP = 1, no
    capacity factor), else megatron's alltoall on CUDA and allgather on CPU (alltoall needs CUDA
    streams).
    """
    if requested == "auto":
        if experts_local:
            return "local"
        return "alltoall" if torch.cuda.is_available() else "allgather"
    if requested == "local" and not experts_local:
        raise ValueError(
            "parallel.moe_dispatcher=local needs every expert on this rank (parallel.ep=1 and"
            " tp=1) and dropless routing (no parallel.moe_capacity_factor); use"
            " parallel.moe_dispatcher=auto"
        )
    if requested == "alltoall" and not torch.cuda.is_available():
        raise ValueError(
            "parallel.moe_dispatcher=alltoall needs CUDA (megatron creates torch.cuda streams); "
            "use parallel.moe_dispatcher=allgather or auto on CPU"
        )
    if requested not in ("local", "allgather", "alltoall"):
        raise ValueError(
            f"parallel.moe_dispatcher={requested!r}: choose auto, local, allgather or alltoall"
        )
    return requested


def build_model(
    job: JobConfig,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    pg_collection: ProcessGroupCollection | None = None,
    cuda_graphs: bool = False,
) -> MambaModel:
    """This rank's model chunk (its pipeline stage, its TP/EP shards); ``cuda_graphs`` as in
    ``transformer_config``."""
    patches.apply()
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    m = job.model
    config = transformer_config(job, cuda_graphs)
    model_class = BlackMambaModel if m.fused_cross_entropy else MambaModel
    return model_class(
        config=config,
        mamba_stack_spec=blackmamba_stack_spec(m, local_dispatch=moe_dispatcher(job) == "local"),
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_seq_length,
        pre_process=pre_process,
        post_process=post_process,
        hybrid_override_pattern=m.resolved_layer_pattern(),
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="none",
        pg_collection=pg_collection,
    )
