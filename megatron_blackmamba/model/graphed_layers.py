"""megatron's Mamba and MoE layers, whose CUDA graphs replay training forwards only.

With training.cuda_graphs megatron captures each graphed layer's training forward and backward,
then replays that forward for every later call whose inputs match, validation included. The MoE
layer's forward is not the same function in evaluation: training routes each token by the
Sinkhorn-balanced plan, evaluation by the plain top-k of its gates (model/router.py). And once one
layer runs eagerly the next cannot replay either: a graph chained to the previous graph's output
buffer expects its input there. So evaluation runs every layer eagerly.
"""

from __future__ import annotations

from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.transformer.transformer_layer import MoETransformerLayer


class _GraphsInTrainingOnly:
    def _should_call_local_cudagraph(self, *args, **kwargs) -> bool:
        return self.training and super()._should_call_local_cudagraph(*args, **kwargs)


class TrainingGraphedMambaLayer(_GraphsInTrainingOnly, MambaLayer):
    """megatron's MambaLayer; its CUDA graph (if any) replays in training mode only."""


class TrainingGraphedMoETransformerLayer(_GraphsInTrainingOnly, MoETransformerLayer):
    """megatron's MoETransformerLayer; its CUDA graph (if any) replays in training mode only."""
