"""BlackMamba's router: megatron's TopKRouter with paper-initialised Sinkhorn and load statistics.

Used for every routing mode (megatron's own modes pass through to TopKRouter unchanged) so that
expert-load statistics are always available.

Training: the top-k experts of the Sinkhorn-balanced plan; the gate is sigmoid(logit) for top-1
(softmax for k > 1), as in megatron and the released BlackMamba code. Inference: plain top-k of
the gate, no balancing. Every forward also accumulates tokens-per-expert, and the tokens an
expert capacity factor dropped (parallel.moe_capacity_factor; megatron drops them after routing),
so the training loop can log per-layer expert load, routing entropy and the dropped fraction
(the paper's open question is imbalance in late layers). The gating GEMM of bf16 models runs on
tensor cores at fp32-router precision.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.cuda_graphs import is_graph_warmup
from megatron.core.transformer.moe.router import TopKRouter

from megatron_blackmamba.kernels import router_gating, top1_experts
from megatron_blackmamba.model.sinkhorn import sinkhorn_replayed


class BlackMambaRouter(TopKRouter):
    def __init__(
        self,
        config,
        pg_collection=None,
        *,
        routing: str,
        temperature: float,
        init: str,
        tol: float,
        max_iters: int,
        bias: bool,
    ) -> None:
        """``routing`` (model.routing), Sinkhorn parameters and ``bias`` as the spec passes them
        from ModelConfig (their one source of defaults). megatron's config says "none" for
        Sinkhorn (model.builder), so the balancing mode is this router's own."""
        super().__init__(config=config, pg_collection=pg_collection)
        self.routing_type = routing
        if bias and self.bias is None:
            # megatron adds a router bias only with add_bias_linear; Zyphra's released routers are
            # biased nn.Linear layers in models without linear biases. Zero-init = no bias.
            self.bias = torch.nn.Parameter(
                torch.zeros(config.num_moe_experts, dtype=config.params_dtype)
            )
            self.bias.sequence_parallel = config.sequence_parallel
        self.sinkhorn_temperature = temperature
        self.sinkhorn_init = init
        self.sinkhorn_tol = tol
        self.sinkhorn_max_iters = max_iters
        self.register_buffer(
            "load_counts",
            torch.zeros(config.num_moe_experts, dtype=torch.float64),
            persistent=False,
        )
        self.register_buffer(
            "dropped_count", torch.zeros((), dtype=torch.float64), persistent=False
        )

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """megatron's fp32 logits; for bf16 models on tensor cores (kernels/router_gating.py)."""
        if self.config.moe_router_dtype != "fp32" or not router_gating.applies(input, self.weight):
            return super().gating(input)
        logits = router_gating.router_logits(input, self.weight)
        return logits if self.bias is None else logits + self.bias.float()

    def _gate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.topk == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)

    def sinkhorn_load_balancing(self, logits: torch.Tensor):
        assert self.config.moe_aux_loss_coeff == 0, "Sinkhorn routing does not use an aux loss"
        if self.training:
            all_logits, first = self._micro_batch_logits(logits.detach())
            result = sinkhorn_replayed(
                all_logits,
                temperature=self.sinkhorn_temperature,
                init=self.sinkhorn_init,
                tol=self.sinkhorn_tol,
                max_iters=self.sinkhorn_max_iters,
            )
            plan = result.plan[first : first + logits.shape[0]]
            _, indices = torch.topk(plan, k=self.topk, dim=1)
            gates = self._gate(logits)
        else:
            gates = self._gate(logits)
            _, indices = torch.topk(gates, k=self.topk, dim=1)
        routing_map = torch.zeros_like(gates, dtype=torch.bool).scatter(1, indices, True)
        return gates * routing_map, routing_map

    @torch.no_grad()
    def _micro_batch_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Logits of every token of the micro-batch, and where this rank's tokens start.

        Sinkhorn balances over a set of tokens, so its choices depend on which tokens it sees.
        Under sequence parallelism each TP rank holds a slice of the sequence; balancing over the
        gathered micro-batch keeps routing identical at every TP size (and to a single process).
        """
        group = self.tp_group
        if not self.config.sequence_parallel or group.size() == 1:
            return logits, 0
        gathered = logits.new_empty((logits.shape[0] * group.size(), logits.shape[1]))
        torch.distributed.all_gather_into_tensor(gathered, logits.contiguous(), group=group)
        return gathered, group.rank() * logits.shape[0]

    def routing(self, logits: torch.Tensor, padding_mask=None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        # megatron warms a layer up on all-zero inputs before capturing its graph: not real tokens
        # (the patch "cuda_graphs._set_warmup_end->lowers the flag" makes it fall again afterwards).
        if not is_graph_warmup():
            with torch.no_grad():
                routed = routing_map.sum(dim=0).to(self.load_counts.dtype)
                self.load_counts += routed
                # Before dropping, every token had exactly topk experts.
                self.dropped_count += routing_map.shape[0] * self.topk - routed.sum()
        return probs, routing_map

    @property
    def routes_top1_directly(self) -> bool:
        """Whether ``route_top1`` gives what ``forward`` would at inference: Sinkhorn top-1 (whose
        inference choice is the top gate), no input jitter, capacity, expert bias or forced
        balancing."""
        config = self.config
        return (
            self.routing_type == "sinkhorn"
            and self.topk == 1
            and config.moe_input_jitter_eps is None
            and config.moe_expert_capacity_factor is None
            and not config.moe_router_enable_expert_bias
            and not config.moe_router_force_load_balancing
        )

    @torch.no_grad()
    def route_top1(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference routing without the [T, E] map: hidden_states [T, H] -> (expert [T] int64,
        gate [T] in the logits' dtype), counted into the load statistics as ``routing`` counts
        them. For the MoE layer's decode path (model/local_dispatcher.py); needs
        ``routes_top1_directly``."""
        counts = None if is_graph_warmup() else self.load_counts
        if self.config.moe_router_dtype == "fp32":
            return top1_experts.top1_route(hidden_states, self.weight, self.bias, counts)
        gate, expert = self._gate(self.gating(hidden_states)).max(dim=1)
        if counts is not None:
            top1_experts.count_tokens(counts, expert)
        return expert, gate

    def take_load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens routed to each expert [E], (token, expert) pairs dropped for capacity [])
        on this rank since the last call, float64; resets both counters.

        Ranks of the TP x DP group see disjoint tokens (TP > 1 implies sequence parallelism), so
        the sum over ``self.tp_dp_cp_group`` is the global load.
        """
        counts, dropped = self.load_counts.clone(), self.dropped_count.clone()
        self.load_counts.zero_()
        self.dropped_count.zero_()
        return counts, dropped
