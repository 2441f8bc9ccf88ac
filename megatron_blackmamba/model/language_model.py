"""megatron's language models with the loss from kernels/cross_entropy.py.

megatron's ``LanguageModule.compute_language_model_loss`` runs its vocab-parallel cross-entropy,
which copies the logits to fp32 and keeps an fp32 softmax for the backward (34 ms and ~13 GiB at
32k tokens x 50304 vocab on an H100). The mixin swaps in the one-pass version; inputs, output and
tensor-parallel behaviour are the same, so it composes with any megatron LanguageModule.
"""

from __future__ import annotations

from megatron.core.models.mamba import MambaModel
from torch import Tensor

from megatron_blackmamba.kernels.cross_entropy import vocab_parallel_cross_entropy


class FusedCrossEntropyMixin:
    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """labels [b, s], logits [s, b, V / tp] -> loss [b, s] (fp32), as megatron's."""
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()


class BlackMambaModel(FusedCrossEntropyMixin, MambaModel):
    """megatron's MambaModel whose training loss is kernels/cross_entropy.py's."""
