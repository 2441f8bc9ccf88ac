"""The CUDA-graph decode step against eager decode steps, and its eager fallback.

On a GPU the replayed graph runs the eager kernels, so logits and carried state must be
bit-identical to eager steps from the same prefilled state, on fresh random prompts and tokens.
"""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.config import load_config
from megatron_blackmamba.generation import DecodeStep, generate, prefill, stack_states
from megatron_blackmamba.generation.decode_graph import graph_blocker
from megatron_blackmamba.generation.generate import EOS_CHECK_INTERVAL, advance
from megatron_blackmamba.model.builder import build_model
from megatron_blackmamba.model.local_dispatcher import set_per_token_inference
from megatron_blackmamba.model.recurrent_state import RecurrentState
from megatron_blackmamba.model.stack import set_fused_residual
from megatron_blackmamba.parallel.setup import init_distributed
from tests.generation.conftest import GREEDY, TINY, VOCAB


def two_prefilled_states(model, batch: int, seed: int):
    device = next(model.parameters()).device
    prompt = torch.randint(
        0, VOCAB, (batch, 7), device=device, generator=torch.Generator(device).manual_seed(seed)
    )
    state, logits = prefill(model, prompt, 64)
    return state, stack_states([state], torch.arange(batch, device=device), 64), logits  # a copy


def test_cpu_step_is_eager_and_equals_advance(model):
    eager, stepped, logits = two_prefilled_states(model, batch=3, seed=11)
    step = DecodeStep(model, stepped)
    assert step.backend == "eager"
    token = logits.argmax(-1, keepdim=True)
    for _ in range(4):
        expected = advance(model, token, eager)
        got = step(token)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        token = got.argmax(-1, keepdim=True)
    assert stepped.sequence_len_offset == eager.sequence_len_offset


def test_step_refuses_unprefilled_state_graph_on_cpu_and_wrong_shape(model):

    with pytest.raises(ValueError, match="prefill"):
        DecodeStep(model, RecurrentState(2, 16))
    _, state, _ = two_prefilled_states(model, batch=2, seed=1)
    with pytest.raises(ValueError, match="model on cpu"):
        DecodeStep(model, state, use_graph=True)
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        DecodeStep(model, state)(torch.zeros(3, 1, dtype=torch.long))


def test_stop_token_trims_rows_past_the_check_interval(model):
    prompts = [[1, 2, 3], [9, 8]]
    free = generate(model, prompts, 2 * EOS_CHECK_INTERVAL + 3, GREEDY)
    eos = free[0][2]
    stopped = generate(model, prompts, 2 * EOS_CHECK_INTERVAL + 3, GREEDY, eos_id=eos)
    for row, full in zip(stopped, free):
        expected = full[: full.index(eos) + 1] if eos in full else full
        assert row == expected


def test_graph_blockers_are_named():
    job = load_config(None, TINY + ["parallel.moe_dispatcher=allgather"])
    init_distributed(job.parallel, seed=3)
    assert "dispatcher" in graph_blocker(build_model(job))
    job = load_config(None, TINY)
    init_distributed(job.parallel, seed=3)
    assert "moe_grouped_gemm" in graph_blocker(build_model(job))
    job = load_config(
        None,
        [o for o in TINY if "precision" not in o]
        + ["model.moe_grouped_gemm=true", "training.precision=bf16"],
    )
    init_distributed(job.parallel, seed=3)
    assert graph_blocker(build_model(job)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph replay needs a GPU")
def test_graph_replay_is_bit_identical_to_eager_steps():
    # megatron's GroupedMLP (the capturable experts) runs in bf16 only.
    job = load_config(
        None,
        [o for o in TINY if "precision" not in o]
        + ["model.moe_grouped_gemm=true", "training.precision=bf16"],
    )
    init_distributed(job.parallel, seed=3)
    model = build_model(job).cuda().eval()
    with torch.no_grad():
        eager, graphed, logits = two_prefilled_states(model, batch=4, seed=torch.seed() % 2**31)
        step = DecodeStep(model, graphed)
        assert step.backend == "cuda-graph"
        tokens = torch.randint(
            0, VOCAB, (12, 4, 1), device="cuda"
        )  # fresh tokens, not the model's choices
        for token in tokens:
            expected = advance(model, token, eager)
            assert torch.equal(step(token), expected)
        for layer, s in eager.layers.items():
            assert torch.equal(graphed.layers[layer].ssm, s.ssm)
            assert torch.equal(graphed.layers[layer].conv, s.conv)
        prompts = [[5, 6, 7], [1, 2]]
        assert generate(model, prompts, 10, GREEDY, cuda_graph=True) == generate(
            model, prompts, 10, GREEDY, cuda_graph=False
        )


@pytest.mark.parametrize(
    "switch,residual_in_fp32",
    [(set_per_token_inference, True), (set_fused_residual, True), (set_fused_residual, False)],
    ids=["moe_per_token", "residual_in_norm_fp32_stream", "residual_in_norm"],
)
def test_decode_steps_through_the_fused_paths_equal_the_unfused_ones(switch, residual_in_fp32):
    """The grouped-GEMM model (the paper configs' experts), its weights cast to fp32 after the
    build (megatron's GroupedMLP is built for bf16 only): decode steps whose MoE layers run
    kernels/top1_experts (or whose stack adds each layer's output in the next norm) give the
    logits and states of steps with that path switched off to 1e-5, on fresh random prompts and
    tokens (CPU: the PyTorch paths; GPU: the Triton kernels)."""
    job = load_config(
        None,
        [o for o in TINY if "precision" not in o]
        + [
            "model.moe_grouped_gemm=true",
            "training.precision=bf16",
            f"model.residual_in_fp32={str(residual_in_fp32).lower()}",
        ],
    )
    init_distributed(job.parallel, seed=3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(job).to(device, torch.float32).eval()
    model.config.params_dtype = torch.float32  # the dtype the layers cast the stream to
    seed = torch.seed() % 2**31
    with torch.no_grad():
        fused, unfused, _ = two_prefilled_states(model, batch=4, seed=seed)
        tokens = torch.randint(
            0, VOCAB, (6, 4, 1), device=device, generator=torch.Generator(device).manual_seed(seed)
        )
        fused_logits = [advance(model, token, fused) for token in tokens]
        switch(model, enabled=False)
        unfused_logits = [advance(model, token, unfused) for token in tokens]
        prompt = tokens[:, :, 0].T  # [4, 6]: a prefill too
        _, unfused_prefill = prefill(model, prompt, 64)
        switch(model, enabled=True)
        _, fused_prefill = prefill(model, prompt, 64)
    torch.testing.assert_close(fused_prefill, unfused_prefill, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_logits, unfused_logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for layer, s in unfused.layers.items():
        torch.testing.assert_close(fused.layers[layer].ssm, s.ssm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.layers[layer].conv, s.conv, rtol=1e-5, atol=1e-5)


def test_generation_adds_the_residual_in_the_next_norm(model, monkeypatch):
    """With an inference context and no autograd the stack walks the layers itself: one
    add_rms_norm per layer; a training-style forward (no inference context) runs megatron's."""
    import megatron_blackmamba.model.stack as stack

    calls = []
    fused = stack.add_rms_norm
    monkeypatch.setattr(stack, "add_rms_norm", lambda *a: calls.append(a[0] is None) or fused(*a))
    with torch.no_grad():
        prefill(model, torch.randint(0, VOCAB, (2, 5)), 16)
        assert calls == [True] + [False] * (len(model.decoder.layers) - 1)
        model(torch.randint(0, VOCAB, (2, 5)), None, None)
    assert len(calls) == len(model.decoder.layers)
