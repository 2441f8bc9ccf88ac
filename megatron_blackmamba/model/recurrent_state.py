"""Per-layer recurrent state for generation: what makes BlackMamba's decoding constant-memory.

Each Mamba layer keeps a conv window (batch, d_inner, d_conv) and an SSM state
(batch, d_inner, d_state) instead of a KV cache that grows with the context. The class extends
megatron's ``StaticInferenceContext`` so ``MambaModel``/``MambaStack`` accept it unchanged:
``sequence_len_offset == 0`` means prefill (full-sequence scan that leaves the final state),
``> 0`` means single-token decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from megatron.core.inference.contexts import StaticInferenceContext


@dataclass
class LayerState:
    conv: torch.Tensor  # (batch, d_inner_local, d_conv), model dtype
    ssm: (
        torch.Tensor
    )  # (batch, d_inner_local, d_state), fp32 like the scan's accumulator (fp64 models: fp64)


class RecurrentState(StaticInferenceContext):
    def __init__(self, max_batch_size: int, max_sequence_length: int, all_logits: bool = False):
        super().__init__(max_batch_size, max_sequence_length)
        self.materialize_only_last_token_logits = not all_logits
        self.layers: dict[int, LayerState] = {}
        self._derived: dict[int, tuple[torch.Tensor, ...]] = {}

    @property
    def seqlen_offset(self) -> int:
        return self.sequence_len_offset

    @seqlen_offset.setter
    def seqlen_offset(self, value: int) -> None:
        # megatron's MambaStack mirrors sequence_len_offset into this (mamba-ssm) name every
        # forward.
        self.sequence_len_offset = value

    def layer_state(self, mixer, batch_size: int, dtype: torch.dtype) -> LayerState:
        """The state of ``mixer``'s layer, allocated (zeroed) on first use."""
        state = self.layers.get(mixer.layer_number)
        if state is None or state.conv.shape[0] != batch_size:
            conv_shape, ssm_shape = mixer.state_shapes(batch_size)
            device = mixer.A_log.device
            state = LayerState(
                conv=torch.zeros(conv_shape, dtype=dtype, device=device),
                ssm=torch.zeros(
                    ssm_shape, dtype=torch.promote_types(dtype, torch.float32), device=device
                ),
            )
            self.layers[mixer.layer_number] = state
        return state

    def derived(
        self, mixer, compute: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """``compute()`` for ``mixer``'s layer, evaluated on first use and kept with this state.

        For values derived from the layer's weights alone (the scan's fp32 A = -exp(A_log), D and
        dt bias): weights do not change while a state is decoded, so each decode step reads them
        instead of launching the casts and exp again per token (and a captured decode graph reads
        them at a fixed address)."""
        values = self._derived.get(mixer.layer_number)
        if values is None:
            values = self._derived[mixer.layer_number] = compute()
        return values

    def state_bytes(self) -> int:
        """Memory held by all recurrent states (independent of how many tokens were seen)."""
        return sum(
            s.conv.numel() * s.conv.element_size() + s.ssm.numel() * s.ssm.element_size()
            for s in self.layers.values()
        )

    def reset(self) -> None:
        super().reset()
        self.layers.clear()
        self._derived.clear()
