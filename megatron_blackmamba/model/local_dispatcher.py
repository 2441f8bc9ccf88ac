"""Token dispatch when every expert lives on this rank: no communication, so no host syncs.

With expert parallelism and expert tensor parallelism both 1 (single GPU, or data parallelism
only), megatron's alltoall dispatcher still copies the per-expert token counts to the host and
waits on that copy in every MoE layer (an event sync, which ``torch.cuda.set_sync_debug_mode`` does
not report), then re-sorts the tokens by local expert, an identity copy with one rank. Each wait
drains the GPU queue, so the host can never run ahead of the kernels, and the wait also makes the
layer impossible to capture in a CUDA graph. Here the layer permutes once (dropless, so the output
size is known: ``model.token_order.permute_known_size``), hands the counts to the grouped GEMM on
the device
(``kernels/grouped_gemm.py`` turns them into offsets there), and unpermutes. Expert weights, the
router and the layer's checkpoint format are megatron's MoELayer's, unchanged.

With top-1 routing (BlackMamba's) every token goes to exactly one expert, so the permutation is
invertible and both directions are row gathers (``_PermuteRows``), forward and backward; megatron's
general path backs the gather with an atomic index_add and unpermutes by scatter_add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection, unpermute
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_blackmamba.kernels import top1_experts
from megatron_blackmamba.model.token_order import dropless_order, permute_known_size


class _PermuteRows(torch.autograd.Function):
    """y = x[order] for a permutation ``order`` of x's rows; dx = dy[inverse]: a gather each way.

    index_select's own backward is an index_add with atomics: 0.33 ms per MoE layer at 32k bf16
    tokens on an H100 (bench/results/h100_profile_step.md), several times a gather of the same rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return dy.index_select(0, inverse), None, None


class LocalTokenDispatcher(MoETokenDispatcher):
    """megatron's dispatcher interface for EP = expert-TP = 1, dropless routing."""

    def __init__(self, num_local_experts: int, config, pg_collection) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if self.ep_size != 1 or self.tp_size != 1:
            raise ValueError(
                "the local token dispatcher needs expert-parallel and expert-tensor-parallel size"
                f" 1 (got ep={self.ep_size}, expert tp={self.tp_size}); use"
                " parallel.moe_dispatcher=alltoall"
            )
        if (
            config.moe_expert_capacity_factor is not None
            or config.moe_router_padding_for_quantization
        ):
            raise ValueError(
                "the local token dispatcher is dropless: unset the expert capacity factor and"
                " padding"
            )
        self.num_local_experts = num_local_experts
        self.inverse: torch.Tensor | None = None  # top-1 routing: the inverse of the permutation

    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ):
        self.hidden_shape = hidden_states.shape
        self.routing_map = routing_map
        tokens = hidden_states.view(-1, hidden_states.shape[-1])
        self.tokens_per_expert = routing_map.sum(dim=0).long()  # stays on the device
        num_out = routing_map.shape[0] * self.config.moe_router_topk
        if self.config.moe_router_topk == 1:
            order, permuted_probs = dropless_order(routing_map, num_out, probs)
            self.inverse = torch.empty_like(order).scatter_(
                0, order, torch.arange(num_out, device=order.device)
            )
            self.reverse_map = order
            return _PermuteRows.apply(tokens, order, self.inverse), permuted_probs
        permuted, permuted_probs, self.reverse_map = permute_known_size(
            tokens, routing_map, probs=probs, num_out_tokens=num_out
        )
        return permuted, permuted_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.inverse is not None:  # top-1: undo the permutation by gathering with its inverse
            output = _PermuteRows.apply(hidden_states, self.inverse, self.reverse_map)
        else:
            restore_shape = (self.routing_map.shape[0], self.hidden_shape[-1])
            output = unpermute(
                hidden_states,
                self.reverse_map,
                restore_shape=restore_shape,
                routing_map=self.routing_map,
            )
        self.routing_map = self.reverse_map = self.inverse = None
        return output.view(self.hidden_shape)


class LocalDispatchMoELayer(MoELayer):
    """megatron's MoELayer whose token dispatcher is the sync-free ``LocalTokenDispatcher``.

    megatron picks its dispatcher from ``config.moe_token_dispatcher_type``; the builder sets that
    to ``allgather`` (cheap to construct, device-agnostic) and this layer replaces it.

    Inference calls of at most ``top1_experts.MAX_TOKENS`` tokens (decode steps) skip the
    dispatcher: the router names each token's expert and ``kernels/top1_experts`` runs that
    expert's MLP per token, with no sorting, counting or grouped-GEMM offsets (where routing and
    experts allow it: ``_direct_activation``).
    """

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None) -> None:
        if pg_collection is None:  # what MoELayer itself falls back to
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        self.token_dispatcher = LocalTokenDispatcher(self.num_local_experts, config, pg_collection)
        self._direct_activation = self._direct_path_activation()
        self.per_token_max_tokens = top1_experts.MAX_TOKENS  # 0 turns the per-token path off

    def _direct_path_activation(self) -> str | None:
        """The experts' activation name if the per-token path computes this layer exactly as the
        dispatcher path does, else None."""
        config = self.config
        activation = {F.silu: "silu", F.gelu: "gelu"}.get(config.activation_func)
        direct = (
            getattr(self.router, "routes_top1_directly", False)
            and isinstance(self.experts, GroupedMLP)
            and getattr(self, "shared_experts", None) is None
            and not config.moe_apply_probs_on_input
            and not config.moe_latent_size
        )
        return activation if direct else None

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        tokens = hidden_states.numel() // hidden_states.shape[-1]
        if (
            self._direct_activation is not None
            and intermediate_tensors is None
            and padding_mask is None
            and not self.training
            and not torch.is_grad_enabled()
            and tokens <= self.per_token_max_tokens
        ):
            return self._forward_top1(hidden_states), None
        return super().forward(hidden_states, intermediate_tensors, padding_mask)

    def _forward_top1(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> [s, b, h]: each token through the expert the router picks for it."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        expert, gate = self.router.route_top1(x)
        experts = self.experts
        y = top1_experts.top1_expert_mlp(
            x.contiguous(),
            expert,
            gate,
            experts.weight1.view(experts.num_local_experts, x.shape[-1], -1),
            experts.weight2.view(experts.num_local_experts, -1, x.shape[-1]),
            activation=self._direct_activation,
            gated=self.config.gated_linear_unit,
        )
        return y.view(hidden_states.shape)


def set_per_token_inference(model: torch.nn.Module, enabled: bool) -> None:
    """Turn the MoE layers' per-token inference path on (the default) or off, so that decode
    through the dispatcher can be measured beside it (bench/generation_latency.py)."""
    for module in model.modules():
        if isinstance(module, LocalDispatchMoELayer):
            module.per_token_max_tokens = top1_experts.MAX_TOKENS if enabled else 0
