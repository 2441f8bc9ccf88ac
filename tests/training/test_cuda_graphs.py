"""training.cuda_graphs: the Mamba layers replayed from megatron's per-layer CUDA graphs must train
as the eager layers do. A replay reuses static buffers, so a stale input, a gradient left in a
buffer or a kernel reading host state at capture time would show up as a wrong loss or gradient on
the micro-batches after the capture; each step here feeds new ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_blackmamba.config import load_config
from megatron_blackmamba.model.builder import transformer_config
from megatron_blackmamba.parallel.setup import destroy, init_distributed
from megatron_blackmamba.training.setup import build_ddp_model
from megatron_blackmamba.training.step import forward_backward
from tests.multiproc import run_ranks
from tests.parallel.workers import make_microbatches

MODEL = [
    "model.hidden_size=64", "model.num_layers=4", "model.vocab_size=256", "model.d_state=16",
    "model.max_seq_length=128", "model.num_experts=4", "model.moe_grouped_gemm=true",
    "training.precision=bf16", "training.seq_length=128", "training.micro_batch_size=2",
    "parallel.distributed_optimizer=false",
]
STEPS, MICRO_BATCHES = 3, 2


def _train(graphs: bool, weights: Path | None, out: Path) -> None:
    """Saves (weights, [(loss, main grads)] per step, Mamba layers replayed from graphs) to ``out``.

    One process per model: megatron's captured graphs hold their layers (and memory pool) for the
    rest of the process."""
    job = load_config(None, MODEL + [f"training.cuda_graphs={str(graphs).lower()}"])
    init_distributed(job.parallel, seed=0, cuda_graphs=graphs)
    (model,) = build_ddp_model(job)
    if weights is not None:
        model.module.load_state_dict(torch.load(weights))
    t, steps = job.training, []
    for step in range(STEPS):
        model.zero_grad_buffer()
        batches = make_microbatches(MICRO_BATCHES, t.micro_batch_size, t.seq_length, job.model.vocab_size, seed=step)
        loss = forward_backward([model], iter(batches), MICRO_BATCHES, t.seq_length, t.micro_batch_size)
        steps.append((loss, {n: p.main_grad.detach().cpu() for n, p in model.module.named_parameters()}))
    replayed = sum(
        1 for m in model.modules()
        if getattr(m, "cudagraph_manager", None) is not None
        and any(r.fwd_graph is not None and r.bwd_graph is not None for r in m.cudagraph_manager.cudagraph_runners)
    )
    torch.save({"weights": model.module.state_dict(), "steps": steps, "replayed": replayed}, out)
    destroy()


def _run(graphs: bool, weights: Path | None, out: Path) -> dict:
    run_ranks(1, _train, graphs, weights, out)
    return torch.load(out)


def _relative_errors(steps: list, reference: list) -> list[float]:
    """||g - ref|| / ||ref|| of every main grad at every step."""
    return [float((g - ref[name]).norm() / ref[name].norm().clamp(min=1e-30))
            for (_, grads), (_, ref) in zip(steps, reference) for name, g in grads.items()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_mamba_layers_train_like_eager_ones(tmp_path):
    graphed = _run(True, None, tmp_path / "graphed.pt")
    assert graphed["replayed"] == 2, "both Mamba layers should have captured forward and backward graphs"
    torch.save(graphed["weights"], tmp_path / "weights.pt")
    eager = _run(False, tmp_path / "weights.pt", tmp_path / "eager.pt")
    eager_again = _run(False, tmp_path / "weights.pt", tmp_path / "eager_again.pt")
    assert eager["replayed"] == 0
    for step, ((loss_g, _), (loss_e, _)) in enumerate(zip(graphed["steps"], eager["steps"])):
        assert loss_g == pytest.approx(loss_e, rel=1e-6), f"step {step}: the forward is deterministic"
    # The scan's backward sums dB and dC with float atomics, so two eager runs already differ a
    # little: the graphs may differ by as much, never by a stale buffer's O(1).
    noise = max(_relative_errors(eager_again["steps"], eager["steps"]))
    worst = max(_relative_errors(graphed["steps"], eager["steps"]))
    assert worst <= max(10 * noise, 1e-5), f"graphed main grads differ from eager by {worst:.2e} (eager vs eager: {noise:.2e})"


def test_cuda_graphs_only_in_training_on_cuda():
    job = load_config(None, MODEL + ["training.precision=fp32", "training.cuda_graphs=true"])
    config = transformer_config(job, cuda_graphs=job.training.cuda_graphs)
    if torch.cuda.is_available():
        assert config.cuda_graph_impl == "local" and [s.name for s in config.cuda_graph_scope] == ["mamba"]
    else:
        assert config.cuda_graph_impl == "none"
    off = transformer_config(load_config(None, MODEL + ["training.precision=fp32"]))
    assert off.cuda_graph_impl == "none" and off.cuda_graph_scope == []
    # Inference builds never graph, whatever the training config says.
    assert transformer_config(job).cuda_graph_impl == "none"
