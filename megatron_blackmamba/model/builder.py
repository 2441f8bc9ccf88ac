"""JobConfig -> megatron TransformerConfig -> MambaModel with the BlackMamba stack spec."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.mamba import MambaModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from megatron_blackmamba import compat
from megatron_blackmamba.config import JobConfig
from megatron_blackmamba.cuda_graph import keep_layer_graph_inputs
from megatron_blackmamba.model.language_model import BlackMambaModel
from megatron_blackmamba.model.norm import LayerNorm
from megatron_blackmamba.model.spec import blackmamba_stack_spec

logger = logging.getLogger(__name__)

_ROUTING = {"sinkhorn": "sinkhorn", "aux_loss": "aux_loss", "none": "none"}
# Gate activation of the expert MLP; every choice but "gelu" is a gated linear unit.
_ACTIVATIONS = {"gelu": F.gelu, "swiglu": F.silu, "geglu": F.gelu}


def use_distributed_optimizer(job: JobConfig) -> bool:
    """megatron-core 0.16.1's DistributedOptimizer only accepts torch.cuda tensors, so on CPU the
    replicated (DDP all-reduce) optimizer runs instead; results are identical, memory is not."""
    wanted = job.parallel.distributed_optimizer
    if wanted and not torch.cuda.is_available():
        logger.info("parallel.distributed_optimizer=true needs CUDA; using the replicated optimizer on CPU")
        return False
    return wanted


def params_dtype(job: JobConfig) -> torch.dtype:
    precision = job.training.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"training.precision={precision!r}: choose auto, bf16 or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def transformer_config(job: JobConfig, cuda_graphs: bool = False) -> TransformerConfig:
    """The megatron config BlackMamba's layers read; attention fields are placeholders (no attention).

    ``cuda_graphs``: the Mamba layers replay megatron's per-layer training graphs (on CUDA only);
    training asks for them (training.setup.build_training_model), inference never does."""
    m, p = job.model, job.parallel
    if m.routing not in _ROUTING:
        raise ValueError(f"model.routing={m.routing!r}: choose one of {sorted(_ROUTING)}")
    if m.activation not in _ACTIVATIONS:
        raise ValueError(f"model.activation={m.activation!r}: choose one of {sorted(_ACTIVATIONS)}")
    if m.final_norm not in ("rmsnorm", "layernorm"):
        raise ValueError(f"model.final_norm={m.final_norm!r}: choose rmsnorm or layernorm")
    if m.routing == "sinkhorn" and m.aux_loss_coeff:
        raise ValueError("model.aux_loss_coeff must be 0 with model.routing=sinkhorn (Sinkhorn balances instead)")
    cuda = torch.cuda.is_available()
    graphs = cuda_graphs and cuda
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
        moe_router_load_balancing_type=_ROUTING[m.routing],
        moe_aux_loss_coeff=m.aux_loss_coeff,
        # Post-softmax top-1 would gate every token with weight 1.0; megatron needs pre-softmax.
        moe_router_pre_softmax=m.moe_topk == 1 and m.routing != "sinkhorn",
        moe_router_dtype="fp32",
        # The local dispatcher replaces megatron's inside LocalDispatchMoELayer; allgather is the
        # cheap, device-agnostic one megatron builds first.
        moe_token_dispatcher_type="allgather" if dispatcher == "local" else dispatcher,
        moe_grouped_gemm=m.moe_grouped_gemm,
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
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        bias_dropout_fusion=cuda,
        gradient_accumulation_fusion=False,
        recompute_granularity=None,
        # Per-layer graphs for the Mamba layers only: megatron refuses to graph dropless MoE
        # layers (their token counts vary), and their host-read expert sizes could not be replayed.
        cuda_graph_impl="local" if graphs else "none",
        cuda_graph_scope="mamba" if graphs else [],
    )


def moe_dispatcher(job: JobConfig) -> str:
    """'local', 'allgather' or 'alltoall' for this job's parallel layout (compat.resolve_moe_dispatcher)."""
    p = job.parallel
    return compat.resolve_moe_dispatcher(p.moe_dispatcher, experts_local=p.ep == 1 and p.resolved_etp() == 1)


def build_model(
    job: JobConfig,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    pg_collection: ProcessGroupCollection | None = None,
    cuda_graphs: bool = False,
) -> MambaModel:
    """This rank's model chunk (its pipeline stage, its TP/EP shards); ``cuda_graphs`` as in
    ``transformer_config``."""
    compat.apply()
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    m = job.model
    config = transformer_config(job, cuda_graphs)
    if config.cuda_graph_impl == "local":
        keep_layer_graph_inputs()
    model_class = BlackMambaModel if m.fused_cross_entropy else MambaModel
    model = model_class(
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
    if post_process and m.final_norm == "layernorm":
        # megatron's MambaStack always builds its final norm from config.normalization (RMSNorm).
        model.decoder.final_norm = LayerNorm(config, m.hidden_size, eps=m.norm_epsilon)
    return model
