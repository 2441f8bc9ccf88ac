"""megatron's ``MambaStack`` with its final norm taken from the spec.

megatron-core 0.16.1's ``MambaStack`` builds the norm before the output layer as Transformer
Engine's ``TENorm`` whatever the spec says, so without TE it cannot be built and the final norm's
type cannot be chosen (Zyphra's released models end with a biased LayerNorm). ``BlackMambaStack``
asks megatron for no final norm and builds ``submodules.final_norm`` itself; megatron's forward
applies ``self.final_norm`` whenever ``post_layer_norm`` is set, so nothing else changes, the
checkpoint keys included (``decoder.final_norm.*``). With ``residual_in_fp32`` the final norm, like
every layer's, reads the fp32 residual stream in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


@dataclass
class BlackMambaStackSubmodules(MambaStackSubmodules):
    """megatron's stack submodules plus the final norm: built as
    ``final_norm(config=, hidden_size=, eps=)``."""

    final_norm: Union[ModuleSpec, type] = IdentityOp


class BlackMambaStack(MambaStack):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: BlackMambaStackSubmodules,
        *args,
        post_layer_norm: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = build_module(
                submodules.final_norm,
                config=self.config,
                hidden_size=self.config.hidden_size,
                eps=self.config.layernorm_epsilon,
            )
            if self.residual_in_fp32:
                self.final_norm.register_forward_pre_hook(self._stream_in_params_dtype)

    def _stream_in_params_dtype(self, norm, args: tuple) -> tuple:
        """Forward pre-hook of the final norm: the fp32 residual stream [s, b, h] in the model's
        dtype, as megatron's MambaLayer casts it for its own norm."""
        return (args[0].to(self.config.params_dtype), *args[1:])
