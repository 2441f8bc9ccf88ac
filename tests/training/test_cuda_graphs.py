"""training.cuda_graphs: the layers replayed from megatron's per-layer CUDA graphs (Mamba and MoE
alike) must train as the eager layers do. A replay reuses static buffers, so a stale input, a
gradient left in a buffer or a kernel reading host state at capture time (an expert's token count,
say) would show up as a wrong loss or gradient on the micro-batches after the capture; each step
here feeds new ones, so the routing changes from step to step. Validation must route as eager
evaluation does (plain top-k, not the training graph's Sinkhorn): it runs eagerly."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

import pytest
import torch

from megatron_blackmamba.config import load_config
from megatron_blackmamba.kernels.fp8 import fp8_blocker
from megatron_blackmamba.model.builder import graphed_layers, transformer_config
from megatron_blackmamba.parallel.setup import destroy, init_distributed
from megatron_blackmamba.training.expert_load import take_local_counts
from megatron_blackmamba.training.setup import build_ddp_model
from megatron_blackmamba.training.step import forward_backward
from tests.multiproc import run_ranks
from tests.parallel.workers import make_microbatches

MODEL = [
    "model.hidden_size=64",
    "model.num_layers=4",
    "model.vocab_size=256",
    "model.d_state=16",
    "model.max_seq_length=128",
    "model.num_experts=4",
    "model.moe_grouped_gemm=true",
    "training.precision=bf16",
    "training.seq_length=128",
    "training.micro_batch_size=2",
    "parallel.distributed_optimizer=false",
]
STEPS, MICRO_BATCHES = 3, 2


def _train(graphs: bool, weights: Path | None, out: Path, overrides: list[str]) -> None:
    """Saves (weights, [(loss, main grads)] per step, layers replayed from graphs, validation
    loss, expert load) to ``out``.

    One process per model: megatron's captured graphs hold their layers (and memory pool) for the
    rest of the process."""
    job = load_config(None, MODEL + overrides + [f"training.cuda_graphs={str(graphs).lower()}"])
    init_distributed(job.parallel, seed=0, cuda_graphs=graphs)
    (model,) = build_ddp_model(job)
    if weights is not None:
        model.module.load_state_dict(torch.load(weights))
    t, steps = job.training, []
    for step in range(STEPS):
        model.zero_grad_buffer()
        batches = make_microbatches(
            MICRO_BATCHES, t.micro_batch_size, t.seq_length, job.model.vocab_size, seed=step
        )
        loss = forward_backward(
            [model], iter(batches), MICRO_BATCHES, t.seq_length, t.micro_batch_size
        )
        steps.append(
            (loss, {n: p.main_grad.detach().cpu() for n, p in model.module.named_parameters()})
        )
    replayed = sorted(
        type(m).__name__
        for m in model.modules()
        if getattr(m, "cudagraph_manager", None) is not None
        and any(
            r.fwd_graph is not None and r.bwd_graph is not None
            for r in m.cudagraph_manager.cudagraph_runners
        )
    )
    model.eval()
    with torch.no_grad():
        batches = make_microbatches(
            MICRO_BATCHES, t.micro_batch_size, t.seq_length, job.model.vocab_size, seed=99
        )
        val = forward_backward(
            [model],
            iter(batches),
            MICRO_BATCHES,
            t.seq_length,
            t.micro_batch_size,
            forward_only=True,
        )
    load = take_local_counts([model])
    torch.save(
        {
            "weights": model.module.state_dict(),
            "steps": steps,
            "replayed": replayed,
            "val": val,
            "load": load,
        },
        out,
    )
    destroy()


def _run(graphs: bool, weights: Path | None, out: Path, overrides: Sequence[str] = ()) -> dict:
    run_ranks(1, _train, graphs, weights, out, list(overrides))
    return torch.load(out)


def _relative_errors(steps: list, reference: list) -> list[float]:
    """||g - ref|| / ||ref|| of every main grad at every step."""
    return [
        float((g - ref[name]).norm() / ref[name].norm().clamp(min=1e-30))
        for (_, grads), (_, ref) in zip(steps, reference)
        for name, g in grads.items()
    ]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_layers_train_like_eager_ones(tmp_path):
    graphed = _run(True, None, tmp_path / "graphed.pt")
    assert (
        graphed["replayed"]
        == ["TrainingGraphedMambaLayer"] * 2 + ["TrainingGraphedMoETransformerLayer"] * 2
    ), "every layer should have captured forward and backward graphs"
    torch.save(graphed["weights"], tmp_path / "weights.pt")
    eager = _run(False, tmp_path / "weights.pt", tmp_path / "eager.pt")
    eager_again = _run(False, tmp_path / "weights.pt", tmp_path / "eager_again.pt")
    assert eager["replayed"] == []
    for step, ((loss_g, _), (loss_e, _)) in enumerate(zip(graphed["steps"], eager["steps"])):
        assert loss_g == pytest.approx(loss_e, rel=1e-6), (
            f"step {step}: the forward is deterministic"
        )
    # The scan's backward sums dB and dC with float atomics, so two eager runs already differ a
    # little: the graphs may differ by as much, never by a stale buffer's O(1).
    noise = max(_relative_errors(eager_again["steps"], eager["steps"]))
    worst = max(_relative_errors(graphed["steps"], eager["steps"]))
    assert worst <= max(10 * noise, 1e-5), (
        f"graphed main grads differ from eager by {worst:.2e} (eager vs eager: {noise:.2e})"
    )
    assert graphed["val"] == pytest.approx(eager["val"], rel=1e-6), (
        "validation routes by top-k, eagerly"
    )
    # Every real token counted once per layer: megatron's warm-up runs on zeros before the capture
    # do not count, and the replays do.
    tokens = (
        (STEPS + 1) * MICRO_BATCHES * 2 * 128
    )  # training and validation micro-batches of 2 x 128
    assert graphed["load"] == eager["load"] and all(
        sum(c["routed"]) == tokens and c["dropped"] == 0 for c in graphed["load"].values()
    )


@pytest.mark.skipif(fp8_blocker() is not None, reason="training.fp8 needs a Hopper GPU")
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_fp8_experts_replay_like_eager_and_train_near_bf16(tmp_path, recipe: str):
    """fp8 experts under graphs: the quantisation reads no host value (graphed = eager), and
    the losses and gradients stay near the bf16 model's from the same weights."""
    width = ["model.ffn_hidden_size=128"]  # the fp8 GEMMs want multiples of 16
    fp8 = width + [f"training.fp8={recipe}"]
    graphed = _run(True, None, tmp_path / "graphed.pt", fp8)
    assert len(graphed["replayed"]) == 4, "every layer should replay with fp8 experts"
    torch.save(graphed["weights"], tmp_path / "weights.pt")
    eager = _run(False, tmp_path / "weights.pt", tmp_path / "eager.pt", fp8)
    bf16 = _run(False, tmp_path / "weights.pt", tmp_path / "bf16.pt", width)
    for (loss_g, _), (loss_e, _), (loss_b, _) in zip(
        graphed["steps"], eager["steps"], bf16["steps"]
    ):
        assert loss_g == pytest.approx(loss_e, rel=1e-6)
        assert loss_e == pytest.approx(loss_b, rel=1e-2)
    assert max(_relative_errors(graphed["steps"], eager["steps"])) <= 1e-3
    # e4m3 rounds each operand to 2^-4: the main grads sit a few percent from bf16's (the
    # median), and no parameter's is far off (the worst: a small-norm router or expert grad).
    fp8_vs_bf16 = _relative_errors(eager["steps"], bf16["steps"])
    assert statistics.median(fp8_vs_bf16) <= 0.05 and max(fp8_vs_bf16) <= 0.3


def test_cuda_graphs_only_in_training_on_cuda():
    job = load_config(None, MODEL + ["training.precision=fp32", "training.cuda_graphs=true"])
    config = transformer_config(job, cuda_graphs=job.training.cuda_graphs)
    if torch.cuda.is_available():
        # fp32: torch._grouped_mm takes bf16 only, so the MoE layers stay eager
        assert config.cuda_graph_impl == "local" and [s.name for s in config.cuda_graph_scope] == [
            "mamba"
        ]
        assert "MoE layers eager: torch._grouped_mm needs bf16" in graphed_layers(job, True)[1]
        bf16 = load_config(None, MODEL + ["training.cuda_graphs=true"])
        assert transformer_config(bf16, cuda_graphs=True).cuda_graph_scope == []  # every layer
        mamba_only = load_config(
            None, MODEL + ["training.cuda_graphs=true", "training.cuda_graph_layers=mamba"]
        )
        assert [
            s.name for s in transformer_config(mamba_only, cuda_graphs=True).cuda_graph_scope
        ] == ["mamba"]
    else:
        assert config.cuda_graph_impl == "none"
    off = transformer_config(load_config(None, MODEL + ["training.precision=fp32"]))
    assert off.cuda_graph_impl == "none" and off.cuda_graph_scope == []
    # Inference builds never graph, whatever the training config says.
    assert transformer_config(job).cuda_graph_impl == "none"
    with pytest.raises(
        ValueError, match="training.cuda_graph_layers: 'moe' is not one of all | mamba"
    ):
        load_config(None, MODEL + ["training.cuda_graph_layers=moe"])


def test_graph_warmup_flag_falls_after_warmup():
    """megatron-core 0.16.1 never lowers its warm-up flag; the router's token counts depend on
    it."""
    from megatron.core.transformer import cuda_graphs

    from megatron_blackmamba.patches import BY_NAME

    BY_NAME["cuda_graphs._set_warmup_end->lowers the flag"].install()
    cuda_graphs._set_warmup_start()
    assert cuda_graphs.is_graph_warmup()
    cuda_graphs._set_warmup_end()
    assert not cuda_graphs.is_graph_warmup()
