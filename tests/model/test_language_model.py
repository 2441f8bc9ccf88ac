"""model/language_model.py: the fused loss equals megatron's, and the builder picks it."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.mamba import MambaModel

from megatron_blackmamba.config import load_config
from megatron_blackmamba.kernels.cross_entropy import vocab_parallel_cross_entropy
from megatron_blackmamba.model.builder import build_model
from megatron_blackmamba.model.language_model import BlackMambaModel

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.vocab_size=97", "model.num_experts=2"]


def test_loss_and_gradient_equal_megatrons(single_rank):
    g = torch.Generator().manual_seed(11)
    device = (
        "cuda" if torch.cuda.is_available() else "cpu"
    )  # megatron all-reduces over its TP group
    logits = (3 * torch.randn(7, 2, 97, generator=g)).to(device)
    labels = torch.randint(0, 97, (7, 2), generator=g)
    labels[0, 0] = 97  # outside the vocabulary: megatron's convention applies
    labels, dloss = labels.to(device), torch.randn(7, 2, generator=g).to(device)
    results = []
    for fn in (vocab_parallel_cross_entropy, tensor_parallel.vocab_parallel_cross_entropy):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels)
        loss.backward(dloss)
        results.append((loss.detach(), x.grad))
    (ours, our_grad), (theirs, their_grad) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-6, atol=1e-7)


def test_builder_picks_the_loss_and_models_agree(single_rank):
    """The same weights give the same per-token loss through either model class."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {}
    for fused in (True, False):
        job = load_config(None, TINY + [f"model.fused_cross_entropy={str(fused).lower()}"])
        models[fused] = build_model(job).to(device)
    assert type(models[True]) is BlackMambaModel and type(models[False]) is MambaModel
    models[False].load_state_dict(models[True].state_dict())
    g = torch.Generator().manual_seed(2)
    tokens, labels = (torch.randint(0, 97, (2, 8), generator=g).to(device) for _ in range(2))
    fused, plain = (models[f](tokens, None, None, labels=labels) for f in (True, False))
    assert fused.shape == (2, 8)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
