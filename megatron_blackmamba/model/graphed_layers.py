"""megatron's Mamba and MoE layers, whose CUDA graphs replay training forwards only.

With training.cuda_graphs megatron captures each graphed layer's training forward and backward,
then replays that forward for every later call whose inputs match, validation included. The MoE
layer's forward is not the same function in evaluation: training routes each token by the
Sinkhorn-balanced plan, evaluation by the plain top-k of its gates (model/router.py). And once one
layer runs eagerly the next cannot replay either: a graph chained to the previous graph's output
buffer expects its input there. So evaluation runs every layer eagerly.

The MoE layer's norm reads its input in the model's dtype, as megatron's MambaLayer does: with
model.residual_in_fp32 the stream between layers is fp32 (model/residual.py).
"""

from __future__ import annotations

import torch
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.transformer.transformer_layer import MoETransformerLayer


class _GraphsInTrainingOnly:
    def _should_call_local_cudagraph(self, *args, **kwargs) -> bool:
        return self.training and super()._should_call_local_cudagraph(*args, **kwargs)


class TrainingGraphedMambaLayer(_GraphsInTrainingOnly, MambaLayer):
    """megatron's MambaLayer; its CUDA graph (if any) replays in training mode only."""


class TrainingGraphedMoETransformerLayer(_GraphsInTrainingOnly, MoETransformerLayer):
    """megatron's MoETransformerLayer; its CUDA graph (if any) replays in training mode only."""

    def _forward_pre_mlp_layernorm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super()._forward_pre_mlp_layernorm(hidden_states.to(self.config.params_dtype))
