"""The BlackMamba layer stack as megatron-core ModuleSpecs.

megatron's ``MambaStack`` already interleaves layer types from a pattern string ('M' Mamba,
'E' MoE) and splits them across pipeline stages; ``BlackMambaStack`` (model/stack.py) adds the
final norm from the spec (``model.final_norm``: RMSNorm, or Zyphra's biased LayerNorm). BlackMamba
only swaps in
the Mamba-1 mixer, the Sinkhorn router, the grouped experts' fused gated activation and, when
all experts are local, a sync-free dispatcher. Linear classes come from megatron's backend
providers (Transformer Engine where it is installed, megatron's local modules otherwise); the
norm is TE's or this project's sequence-parallel-aware torch RMSNorm.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.ssm.mamba_layer import MambaLayerSubmodules
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_blackmamba.config import ModelConfig
from megatron_blackmamba.kernels.cuda import have_transformer_engine
from megatron_blackmamba.model.experts import FusedGLUGroupedMLP
from megatron_blackmamba.model.graphed_layers import (
    TrainingGraphedMambaLayer,
    TrainingGraphedMoETransformerLayer,
)
from megatron_blackmamba.model.local_dispatcher import LocalDispatchMoELayer
from megatron_blackmamba.model.mamba1_mixer import Mamba1Mixer, Mamba1MixerSubmodules
from megatron_blackmamba.model.norm import LayerNorm, RMSNorm
from megatron_blackmamba.model.residual import fp32_bias_dropout_add
from megatron_blackmamba.model.router import BlackMambaRouter
from megatron_blackmamba.model.stack import BlackMambaStack, BlackMambaStackSubmodules


def backend_provider(use_te: bool) -> BackendSpecProvider:
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def norm_module(use_te: bool) -> type:
    """TE's fused RMSNorm, or the torch RMSNorm that also handles sequence parallelism."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def residual_add(model: ModelConfig) -> Callable:
    """Each layer's bias-dropout-add: megatron's, which adds in the layer output's dtype, or
    the fp32 one of model.residual_in_fp32."""
    return fp32_bias_dropout_add if model.residual_in_fp32 else get_bias_dropout_add


def mamba_layer_spec(model: ModelConfig, backend: BackendSpecProvider, norm: type) -> ModuleSpec:
    mixer = ModuleSpec(
        module=Mamba1Mixer,
        params=dict(
            d_state=model.d_state,
            d_conv=model.d_conv,
            expand=model.expand,
            dt_rank=model.resolved_dt_rank(),
            dt_min=model.dt_min,
            dt_max=model.dt_max,
            dt_init_floor=model.dt_init_floor,
            bias=model.add_bias_linear,
        ),
        submodules=Mamba1MixerSubmodules(
            in_proj=backend.column_parallel_linear(),
            # dt_proj is tiny (dt_rank -> d_inner) and its bias feeds the scan, not the matmul.
            dt_proj=ColumnParallelLinear,
            out_proj=backend.row_parallel_linear(),
        ),
    )
    return ModuleSpec(
        module=TrainingGraphedMambaLayer,
        submodules=MambaLayerSubmodules(norm=norm, mixer=mixer, mamba_bda=residual_add(model)),
    )


def moe_layer_spec(
    model: ModelConfig, backend: BackendSpecProvider, norm: type, local_dispatch: bool
) -> ModuleSpec:
    moe = get_moe_module_spec_for_backend(
        backend, num_experts=model.num_experts, moe_grouped_gemm=model.moe_grouped_gemm
    )
    if local_dispatch:
        moe.module = LocalDispatchMoELayer
    if model.fused_glu and moe.submodules.experts.module is GroupedMLP:
        moe.submodules.experts.module = FusedGLUGroupedMLP
    moe.submodules.router = partial(
        BlackMambaRouter,
        routing=model.routing,
        temperature=model.sinkhorn_temperature,
        init=model.sinkhorn_init,
        tol=model.sinkhorn_tol,
        max_iters=model.sinkhorn_max_iters,
        bias=model.router_bias,
    )
    return ModuleSpec(
        module=TrainingGraphedMoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm, mlp=moe, mlp_bda=residual_add(model)
        ),
    )


def blackmamba_stack_spec(
    model: ModelConfig, use_te: bool | None = None, local_dispatch: bool = False
) -> ModuleSpec:
    """The stack spec; ``use_te=None`` picks Transformer Engine modules when TE imports;
    ``local_dispatch``: MoE layers use the sync-free LocalTokenDispatcher (all experts local)."""
    if use_te is None:
        use_te = have_transformer_engine()
    backend, norm = backend_provider(use_te), norm_module(use_te)
    return ModuleSpec(
        module=BlackMambaStack,
        # For the final norm's input (model/stack.py); megatron hands it on to its Mamba layers.
        params={"residual_in_fp32": model.residual_in_fp32},
        submodules=BlackMambaStackSubmodules(
            mamba_layer=mamba_layer_spec(model, backend, norm),
            moe_layer=moe_layer_spec(model, backend, norm, local_dispatch),
            final_norm=LayerNorm if model.final_norm == "layernorm" else norm,
        ),
    )
