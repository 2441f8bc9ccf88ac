"""Autoregressive generation with BlackMamba's recurrent state: constant memory per token.

Each prompt is *prefilled* with one full-sequence forward pass (the parallel scan), which leaves
every Mamba layer's final conv window and SSM state in a ``RecurrentState``. Generation then feeds
one token per step; each Mamba layer advances its state in O(1) (``Mamba1Mixer._decode``) and the
MoE layers route that one token (plain top-1 in eval mode). Nothing grows with the context. On a
GPU the decode step is replayed from a CUDA graph (generation/decode_graph.py).

Batches of prompts with different lengths: padding is wrong for an SSM. There is no attention
mask, so pad tokens on the left would flow through the recurrence and change the state the prompt
starts from; pads on the right would be absorbed into the state after the prompt. Instead prompts
of equal length are prefilled together (one batch per distinct length, exact), their per-layer
states are stacked along the batch dimension in the caller's order, and all sequences then decode
in lock-step. Prefill costs one forward per distinct length; decoding, the long part, is batched.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
from megatron.core.models.mamba import MambaModel

from megatron_blackmamba.generation.decode_graph import DecodeStep, last_logits
from megatron_blackmamba.generation.sampling import SamplingParams, sample
from megatron_blackmamba.model.recurrent_state import LayerState, RecurrentState

EOS_CHECK_INTERVAL = 16  # decode steps between host-side "all sequences stopped?" checks


def advance(model: MambaModel, tokens: torch.Tensor, state: RecurrentState) -> torch.Tensor:
    """tokens [b, s] -> last-position logits [b, V] (fp32); advances ``state`` by s tokens."""
    logits = last_logits(model, tokens, state)
    state.sequence_len_offset += tokens.shape[1]
    return logits


def prefill(
    model: MambaModel,
    tokens: torch.Tensor,
    max_sequence_length: int,
    chunk_size: Optional[int] = None,
) -> tuple[RecurrentState, torch.Tensor]:
    """Full-sequence pass over equal-length prompts tokens [b, s]: (their state, last logits [b,
    V]).

    With ``chunk_size`` the pass runs over chunks of that many tokens, each continuing from the
    state the previous one left: the same result, with one chunk's activations in memory at a
    time (a 64 x 64k prompt in one forward would hold tens of GiB)."""
    state = RecurrentState(tokens.shape[0], max_sequence_length)
    if chunk_size is None:
        return state, advance(model, tokens, state)
    for start in range(0, tokens.shape[1], chunk_size):
        logits = advance(model, tokens[:, start : start + chunk_size], state)
    return state, logits


def stack_states(
    states: Sequence[RecurrentState], order: torch.Tensor, max_sequence_length: int
) -> RecurrentState:
    """One state whose batch rows are the rows of ``states`` (concatenated), permuted by ``order``.

    Rows may have seen different numbers of tokens: decode steps only need offset > 0, and each
    row's conv window and SSM state already summarise its own prefix.
    """
    merged = RecurrentState(len(order), max_sequence_length)
    for layer in states[0].layers:
        merged.layers[layer] = LayerState(
            conv=torch.cat([s.layers[layer].conv for s in states])[order],
            ssm=torch.cat([s.layers[layer].ssm for s in states])[order],
        )
    merged.sequence_len_offset = max(s.sequence_len_offset for s in states)
    return merged


@torch.no_grad()
def generate(
    model: MambaModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),  # noqa: B008 (frozen dataclass)
    eos_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    cuda_graph: Optional[bool] = None,
) -> list[list[int]]:
    """New token ids for each prompt (up to ``max_new_tokens``, stopping after ``eos_id``).

    ``vocab_size`` (the tokenizer's) keeps the model's padded vocabulary rows from being sampled.
    ``cuda_graph``: replay decode steps from a CUDA graph (default: when the model is on a GPU).
    """
    if model.training:
        raise ValueError(
            "call model.eval() first: in training mode the router balances experts over the batch"
        )
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    max_len = max(len(p) for p in prompts) + max_new_tokens

    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    states, logits, rows = [], [], []
    for indices in by_length.values():
        tokens = torch.tensor([prompts[i] for i in indices], dtype=torch.long, device=device)
        state, last = prefill(model, tokens, max_len)
        states.append(state)
        logits.append(last)
        rows += indices
    order = torch.argsort(torch.tensor(rows, device=device))
    state = stack_states(states, order, max_len)
    next_logits = torch.cat(logits)[order]

    step = DecodeStep(model, state, use_graph=cuda_graph) if max_new_tokens > 1 else None
    generated: list[torch.Tensor] = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        if vocab_size is not None:
            next_logits[:, vocab_size:] = float("-inf")
        tokens = sample(next_logits, params, generator)
        generated.append(tokens)
        if eos_id is not None:
            done |= tokens == eos_id
            # Reading `done` syncs with the GPU, so only every few tokens: the host keeps queueing
            # steps ahead of the GPU, and the few extra tokens are trimmed below.
            if (i + 1) % EOS_CHECK_INTERVAL == 0 and bool(done.all()):
                break
        if i < max_new_tokens - 1:
            next_logits = step(tokens.unsqueeze(1))
    rows = torch.stack(generated, dim=1).tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
