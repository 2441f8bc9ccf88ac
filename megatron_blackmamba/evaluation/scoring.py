"""Log-probabilities of token sequences under a BlackMamba model: what every evaluation reads.

``score_continuations`` runs batched full forwards (sorted by length, padded on the right: the
recurrence is causal, so right padding never reaches the positions that are read).
``score_rolling`` scores a document longer than one window by feeding it window by window and
carrying each Mamba layer's conv window and SSM state across (``RecurrentState``), so no context
is re-encoded and the sum equals one forward over the whole document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from megatron.core.models.mamba import MambaModel

from megatron_blackmamba.model.recurrent_state import RecurrentState


@dataclass
class Scored:
    logprob: float  # sum over the scored tokens
    is_greedy: bool  # every scored token is the argmax at its position
    tokens: int


def log_probs(
    model: MambaModel, tokens: torch.Tensor, state: RecurrentState | None = None
) -> torch.Tensor:
    """tokens [b, s] -> log-softmax [b, s, V] in the model's dtype (float32 at least)."""
    logits = model(tokens, None, None, inference_context=state, runtime_gather_output=True)
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


@torch.no_grad()
def score_continuations(
    model: MambaModel,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    max_length: int,
    vocab_size: int,
) -> list[Scored]:
    """For each (context, continuation) token list: the continuation's log-probability given the
    context and whether greedy decoding would produce it. Contexts are cut on the left to fit
    ``max_length`` tokens of input; ``vocab_size`` (the tokenizer's) masks padded vocab rows."""
    device = next(model.parameters()).device
    inputs = []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("an empty continuation has no log-probability")
        whole = (list(context) + list(continuation))[-(max_length + 1) :]
        inputs.append(whole[:-1])
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    results: list[Scored | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(inputs[rows[0]])
        batch = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for r, i in enumerate(rows):
            batch[r, : len(inputs[i])] = torch.tensor(inputs[i], device=device)
        logprobs = log_probs(model, batch)[..., :vocab_size]
        for r, i in enumerate(rows):
            continuation = pairs[i][1]
            end = len(inputs[i])
            rows_lp = logprobs[r, end - len(continuation) : end]
            target = torch.tensor(continuation, device=device)
            picked = rows_lp.gather(1, target[:, None])[:, 0]
            results[i] = Scored(
                float(picked.sum()), bool((rows_lp.argmax(-1) == target).all()), len(continuation)
            )
    return results  # type: ignore[return-value]


@torch.no_grad()
def score_rolling(
    model: MambaModel, tokens: Sequence[int], prefix_token: int, window: int, vocab_size: int
) -> Scored:
    """Log-probability of every token of a document, the first given ``prefix_token`` (the EOD,
    lm-eval's convention), fed ``window`` tokens at a time with the recurrent state carried."""
    device = next(model.parameters()).device
    inputs = torch.tensor([prefix_token, *tokens[:-1]], device=device)[None]
    targets = torch.tensor(list(tokens), device=device)
    state = RecurrentState(1, len(tokens) + 1, all_logits=True)
    total, greedy = 0.0, True
    for start in range(0, len(tokens), window):
        chunk = inputs[:, start : start + window]
        logprobs = log_probs(model, chunk, state)[0, :, :vocab_size]
        state.sequence_len_offset += chunk.shape[1]
        want = targets[start : start + chunk.shape[1]]
        total += float(logprobs.gather(1, want[:, None]).sum())
        greedy &= bool((logprobs.argmax(-1) == want).all())
    return Scored(total, greedy, len(tokens))
