"""kernels/cross_entropy against a float64 reference: PyTorch path, Triton kernels, two TP ranks."""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.kernels import cross_entropy as ce
from tests.multiproc import run_ranks


def _reference64(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss in float64 over the full vocabulary; a label outside it scores the row max
    (treated as a constant, so its gradient is the softmax alone), as megatron does."""
    x = logits.double()
    V = x.shape[-1]
    valid = (labels >= 0) & (labels < V)
    label_logit = x.gather(-1, labels.clamp(0, V - 1)[..., None])[..., 0]
    return torch.logsumexp(x, dim=-1) - torch.where(valid, label_logit, x.amax(dim=-1).detach())


def _draw(shape: tuple[int, ...], vocab: int, seed: int, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)).to(device, dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    outside = torch.tensor([-1, vocab])[: labels.numel()]
    labels.view(-1)[: len(outside)] = outside  # labels outside the vocabulary
    dloss = torch.randn(*shape, generator=g, dtype=torch.float64)
    return logits, labels.to(device), dloss.to(device)


def _loss_and_grad(fn, logits, labels, dloss):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, labels)
    loss.backward(dloss.to(loss.dtype))
    return loss.detach(), x.grad


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want.double()) / torch.linalg.norm(want.double()))


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_path_matches_float64(seed: int):
    logits, labels, dloss = _draw((5, 3), 37, seed)
    loss, grad = _loss_and_grad(ce.vocab_parallel_cross_entropy, logits, labels, dloss)
    want_loss, want_grad = _loss_and_grad(_reference64, logits.double(), labels, dloss)
    assert (
        loss.dtype == torch.float32 and grad.dtype == torch.float32 and loss.shape == labels.shape
    )
    assert _rel(loss, want_loss) <= 1e-6 and _rel(grad, want_grad) <= 1e-6


def test_float64_stays_float64():
    logits, labels, dloss = _draw((4, 2), 11, 3, dtype=torch.float64)
    loss, grad = _loss_and_grad(ce.vocab_parallel_cross_entropy, logits, labels, dloss)
    want_loss, want_grad = _loss_and_grad(_reference64, logits, labels, dloss)
    assert _rel(loss, want_loss) <= 1e-12 and _rel(grad, want_grad) <= 1e-12


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"logits \(4, 2, 7\) do not match labels \(2, 4\)"):
        ce.vocab_parallel_cross_entropy(torch.randn(4, 2, 7), torch.zeros(2, 4, dtype=torch.long))


def _tp_worker(vocab: int) -> None:
    """Two ranks, each with half of the vocabulary: loss and this rank's gradient slice equal the
    full-vocabulary float64 reference on every rank."""
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logits, labels, dloss = _draw((6, 2), vocab, seed=7)  # same draw on every rank
    part = vocab // world
    shard = logits[..., rank * part : (rank + 1) * part]
    loss, grad = _loss_and_grad(
        lambda x, y: ce.vocab_parallel_cross_entropy(x, y, torch.distributed.group.WORLD),
        shard,
        labels,
        dloss,
    )
    want_loss, want_grad = _loss_and_grad(_reference64, logits.double(), labels, dloss)
    assert _rel(loss, want_loss) <= 1e-6, _rel(loss, want_loss)
    assert _rel(grad, want_grad[..., rank * part : (rank + 1) * part]) <= 1e-6
    torch.distributed.destroy_process_group()


def test_two_tensor_parallel_ranks_match_the_full_vocabulary():
    run_ranks(2, _tp_worker, 24, timeout=300)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on GPUs")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows,vocab", [(1, 7), (37, 4096), (300, 5003), (64, 50304)])
def test_triton_kernels_match_float64(dtype: torch.dtype, tol: float, rows: int, vocab: int):
    """Fresh random inputs; vocab sizes below, at and off multiples of the kernel's block."""
    logits, labels, dloss = _draw((rows,), vocab, seed=rows + vocab, device="cuda", dtype=dtype)
    assert ce.fused_applies(logits)
    loss, grad = _loss_and_grad(ce.vocab_parallel_cross_entropy, logits, labels, dloss)
    want_loss, want_grad = _loss_and_grad(_reference64, logits.double(), labels, dloss)
    assert grad.dtype == dtype
    assert _rel(loss, want_loss) <= 1e-6  # fp32 statistics of the (rounded) inputs
    assert _rel(grad, want_grad) <= tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on GPUs")
def test_triton_row_statistics_of_a_vocabulary_slice():
    """A rank's slice (vocab_start > 0, labels in and outside it): kernels equal the PyTorch
    path."""
    from megatron_blackmamba.kernels import cross_entropy_triton as kernels

    logits, labels, dloss = _draw((96,), 2 * 3001, seed=5, device="cuda")
    shard = logits[:, 3001:].contiguous()
    got = kernels.row_stats(shard, labels, 3001)
    want = ce._row_stats_torch(shard, labels, 3001)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    lse = want[0] + torch.log(want[1])
    torch.testing.assert_close(
        kernels.grad(shard, labels, lse, dloss.float(), 3001),
        ce._grad_torch(shard, labels, lse, dloss.float(), 3001),
        rtol=1e-5,
        atol=1e-7,
    )
