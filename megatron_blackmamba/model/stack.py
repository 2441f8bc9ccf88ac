"""megatron's ``MambaStack`` with its final norm taken from the spec.

megatron-core 0.16.1's ``MambaStack`` builds the norm before the output layer as Transformer
Engine's ``TENorm`` whatever the spec says, so without TE it cannot be built and the final norm's
type cannot be chosen (Zyphra's released models end with a biased LayerNorm). ``BlackMambaStack``
asks megatron for no final norm and builds ``submodules.final_norm`` itself; megatron's forward
applies ``self.final_norm`` whenever ``post_layer_norm`` is set, so nothing else changes, the
checkpoint keys included (``decoder.final_norm.*``). With ``residual_in_fp32`` the final norm, like
every layer's, reads the fp32 residual stream in the model's dtype.

Generation (a forward with an inference context and no autograd) walks the layers itself, as
mamba-ssm's blocks do: each layer's output joins the residual stream in the next layer's norm
(kernels/rms_norm.add_rms_norm), one kernel where megatron's layer boundary puts three (the add,
the cast to the model's dtype, the norm), each a launch of its own in a decode step. Layer by layer
it computes what megatron's layers compute: norm, mixer or MoE MLP, residual add; anything it
cannot walk (pipeline stages, Transformer Engine norms, attention layers) runs megatron's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import WrappedTensor

from megatron_blackmamba.kernels.rms_norm import add_rms_norm
from megatron_blackmamba.model.norm import RMSNorm


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
        # False runs generation through megatron's forward, to measure one beside the other.
        self.fused_residual = True

    def _stream_in_params_dtype(self, norm, args: tuple) -> tuple:
        """Forward pre-hook of the final norm: the fp32 residual stream [s, b, h] in the model's
        dtype, as megatron's MambaLayer casts it for its own norm."""
        return (args[0].to(self.config.params_dtype), *args[1:])

    def forward(self, hidden_states, attention_mask, inference_context=None, *args, **kwargs):
        walk = self._generation_walk(inference_context, args, kwargs)
        if walk is not None:
            return self._generation_forward(hidden_states, inference_context, walk)
        return super().forward(hidden_states, attention_mask, inference_context, *args, **kwargs)

    def _generation_walk(self, inference_context, args: tuple, kwargs: dict) -> list | None:
        """Each layer's (norm, block) when this forward is generation the stack can walk layer by
        layer (see module), else None."""
        if not (
            self.fused_residual
            and inference_context is not None
            and not self.training
            and not torch.is_grad_enabled()
            and self.pre_process
            and self.post_process
            and self.post_layer_norm
            and not args
            and all(value is None for value in kwargs.values())
            and len(self.layers) > 0
        ):
            return None
        walk = [self._parts(layer) for layer in self.layers]
        return None if any(parts is None for parts in walk) else walk

    @staticmethod
    def _parts(layer) -> tuple | None:
        """(norm, fn(x, inference_context) -> (output, bias)) of a Mamba or MoE-only layer with
        this project's RMSNorm, else None."""
        if isinstance(layer, MambaLayer):
            norm, block = layer.norm, layer.mixer
            return (norm, block) if isinstance(norm, RMSNorm) else None
        only_mlp = all(
            isinstance(getattr(layer, name, None), IdentityOp)
            for name in ("input_layernorm", "self_attention", "pre_cross_attn_layernorm")
        )
        norm = getattr(layer, "pre_mlp_layernorm", None)
        if not (only_mlp and isinstance(norm, RMSNorm)):
            return None
        return norm, lambda x, inference_context: layer.mlp(x)

    def _generation_forward(self, hidden_states, inference_context, walk: list) -> torch.Tensor:
        """[s, b, h] embeddings -> [s, b, h] final-norm output through ``walk``'s (norm, block)
        per layer, the stream carried between layers as ``residual`` (fp32 with
        residual_in_fp32, else the model's dtype)."""
        if isinstance(hidden_states, WrappedTensor):
            hidden_states = hidden_states.unwrap()
        dtype = self.config.params_dtype
        # A copy in any dtype: the stream is added to in place.
        residual = hidden_states.to(torch.float32 if self.residual_in_fp32 else dtype, copy=True)
        delta = None
        for norm, block in walk:
            x = add_rms_norm(delta, residual, norm.weight, norm.eps, dtype)
            delta, bias = block(x, inference_context=inference_context)
            if bias is not None:
                delta = delta + bias
        residual += delta
        return self.final_norm(residual)


def set_fused_residual(model: torch.nn.Module, enabled: bool) -> None:
    """Let generation walk the layers with the residual add in the next norm (the default), or
    run megatron's forward, so that one can be measured beside the other
    (bench/generation_latency.py)."""
    for module in model.modules():
        if isinstance(module, BlackMambaStack):
            module.fused_residual = enabled
