"""Single-token decode steps replayed from one CUDA graph: one launch per generated token.

Why: an eager decode step launches a few dozen small kernels per layer from Python, and at small
batch the GPU mostly waits for the host to launch them (bench/results/h100_generation_latency.md:
~80 ms/token eager for the 30-layer 340M model on the H100 host). A decode step is an ideal
graph: its shapes are fixed ([b, 1] tokens), it never syncs with the host, and everything it
carries (each layer's conv window and SSM state) is updated in place at a fixed address by the
decode kernels. So the step is captured once, from the live state right after prefill, and
replayed per token. The replay runs the eager kernels, so its logits equal eager ones bit for bit.

Off a GPU, where some layer would read values on the host (``graph_blocker``), or with
``use_graph=False``, the step runs eagerly; ``backend`` says which, and is logged with the
reason. A capture that fails raises, naming the eager switch: a failed capture can leave the
CUDA context unusable, so it is not silently retried.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from megatron.core.models.mamba import MambaModel
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_blackmamba.cuda_graph import capture
from megatron_blackmamba.model.local_dispatcher import LocalTokenDispatcher
from megatron_blackmamba.model.recurrent_state import RecurrentState

logger = logging.getLogger(__name__)


def graph_blocker(model: MambaModel) -> Optional[str]:
    """Why ``model``'s decode step cannot be captured (it would read values on the host), or
    None."""
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            if not isinstance(module.token_dispatcher, LocalTokenDispatcher):
                return (
                    f"{name} uses megatron's {type(module.token_dispatcher).__name__}, which waits"
                    " on the host for token counts (parallel.moe_dispatcher=auto picks the local"
                    " one at ep=tp=1)"
                )
            if not isinstance(module.experts, GroupedMLP):
                return (
                    f"{name}'s per-expert MLPs split tokens by counts read on the host (set"
                    " model.moe_grouped_gemm=true)"
                )
    return None


def last_logits(model: MambaModel, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
    """tokens [b, s] -> last-position logits [b, V] (fp32), updating ``state``'s layers in place
    (the caller advances ``state.sequence_len_offset``)."""
    logits = model(tokens, None, None, inference_context=state, runtime_gather_output=True)
    return logits[:, -1].float()


class DecodeStep:
    """``step(tokens [b, 1]) -> logits [b, V] (fp32)``, advancing ``state`` by one token.

    With the CUDA-graph backend the returned logits live in the graph's static output buffer:
    they are valid until the next call (clone them to keep them).
    """

    def __init__(
        self, model: MambaModel, state: RecurrentState, use_graph: Optional[bool] = None
    ) -> None:
        if state.sequence_len_offset <= 0 or not state.layers:
            raise ValueError("DecodeStep needs a prefilled RecurrentState (run prefill first)")
        self.model = model
        self.state = state
        self.batch_size = next(iter(state.layers.values())).ssm.shape[0]
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        device = next(model.parameters()).device
        blocker = f"model on {device.type}" if device.type != "cuda" else graph_blocker(model)
        if use_graph and blocker:
            raise ValueError(f"cannot replay the decode step from a CUDA graph: {blocker}")
        use_graph = blocker is None if use_graph is None else use_graph
        if use_graph:
            try:
                self._capture(device)
            except RuntimeError as error:
                raise RuntimeError(
                    f"CUDA-graph capture of the decode step failed: {error}. Decode eagerly"
                    " instead: generate(..., cuda_graph=False) or blackmamba-generate"
                    " --no-cuda-graph."
                ) from error
        logger.info("decode step backend: %s%s", self.backend, f" ({blocker})" if blocker else "")

    @property
    def backend(self) -> str:
        return "cuda-graph" if self.graph is not None else "eager"

    def _capture(self, device: torch.device) -> None:
        """Capture one step; the warm-up steps' effects on the state (and router counters) are
        undone."""
        mutated = [t for s in self.state.layers.values() for t in (s.conv, s.ssm)] + list(
            self.model.buffers()
        )
        saved = [t.clone() for t in mutated]
        self.tokens = torch.zeros(self.batch_size, 1, dtype=torch.long, device=device)
        try:
            self.graph, self.logits = capture(
                lambda: last_logits(self.model, self.tokens, self.state), device, warmup=2
            )
        finally:
            for tensor, value in zip(mutated, saved):
                tensor.copy_(value)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape != (self.batch_size, 1):
            raise ValueError(
                f"decode step takes tokens of shape ({self.batch_size}, 1), got"
                f" {tuple(tokens.shape)}"
            )
        if self.graph is None:
            logits = last_logits(self.model, tokens, self.state)
        else:
            self.tokens.copy_(tokens)
            self.graph.replay()
            logits = self.logits
        self.state.sequence_len_offset += 1
        return logits
