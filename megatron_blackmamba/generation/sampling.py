"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False  # argmax; the other fields are then ignored
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens; 0 = no limit
    top_p: float = (
        1.0  # keep the smallest set of most likely tokens holding this much mass; 1 = no limit
    )

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (got {self.temperature}); use greedy for argmax decoding"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits [..., V] with everything below each row's k-th largest value set to -inf.

    Tokens tied with the k-th value are all kept (no arbitrary tie-break among equals).
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """logits [..., V] keeping, per row, the most likely tokens until their probability reaches
    ``p``.

    A token is dropped when the tokens ranked above it already hold >= p of the mass, so the most
    likely token always survives and the kept mass is the smallest that reaches p.
    """
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """logits [b, V] -> next token ids [b]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    logits = top_p_filter(top_k_filter(logits, params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
