"""RMSNorm for machines without Transformer Engine that, unlike megatron's WrappedTorchNorm,
supports sequence parallelism.

Under sequence parallelism each TP rank normalises its own slice of the sequence with a replicated
weight, so the weight's gradient is a partial sum. Marking the weight ``sequence_parallel`` makes
megatron's ``finalize_model_grads`` all-reduce it across the TP group, which is all TE's norm
does differently. (megatron's MoE layer refuses TP without sequence parallelism in training, so
BlackMamba with TP > 1 needs this on CPU.) On GPUs it runs kernels/rms_norm's Triton kernels.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_blackmamba.kernels.rms_norm import rms_norm


class RMSNorm(torch.nn.RMSNorm):
    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused
    ) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    """LayerNorm with bias, sequence-parallel aware like RMSNorm above.

    Only used as the final norm (``model.final_norm=layernorm``): Zyphra's released BlackMamba
    models end with a biased LayerNorm although every block norm is an RMSNorm.
    """

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused
    ) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in (self.weight, self.bias):
            param.sequence_parallel = config.sequence_parallel
