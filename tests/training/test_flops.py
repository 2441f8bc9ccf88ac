"""The FLOP counter against a count written out by hand for a tiny config."""

from megatron_blackmamba.config import load_config
from megatron_blackmamba.training.flops import forward_flops_per_token, train_flops_per_token


def test_flops_match_hand_count():
    m = load_config(
        None,
        [
            "model.hidden_size=16",
            "model.num_layers=2",
            "model.vocab_size=100",
            "model.d_state=4",
            "model.num_experts=4",
        ],
    ).model
    # h=16, di=32, N=4, R=ceil(16/16)=1, W=4, F=64, E=4, V=100
    in_proj = 2 * 16 * 64  # h -> 2*di
    conv = 2 * 32 * 4
    x_proj = 2 * 32 * (1 + 8)  # di -> R + 2N
    dt_proj = 2 * 1 * 32
    out_proj = 2 * 32 * 16
    scan = 7 * 32 * 4 + 5 * 32
    mamba = in_proj + conv + x_proj + dt_proj + out_proj + scan
    moe = 2 * 16 * 4 + (2 * 16 * 64 + 2 * 64 * 16)  # router + one GeLU expert (fc1 + fc2)
    head = 2 * 16 * 100
    assert forward_flops_per_token(m) == mamba + moe + head
    assert train_flops_per_token(m) == 3 * (mamba + moe + head)


def test_topk_and_swiglu_counts():
    base = [
        "model.hidden_size=16",
        "model.num_layers=2",
        "model.vocab_size=100",
        "model.num_experts=4",
    ]
    gelu = load_config(None, base).model
    swiglu = load_config(None, base + ["model.activation=swiglu"]).model
    top2 = load_config(None, base + ["model.moe_topk=2"]).model
    expert_gelu = 2 * 16 * 64 * 2
    expert_swiglu = 2 * 16 * 128 + 2 * 64 * 16
    assert (
        forward_flops_per_token(swiglu) - forward_flops_per_token(gelu)
        == expert_swiglu - expert_gelu
    )
    assert forward_flops_per_token(top2) - forward_flops_per_token(gelu) == expert_gelu


def test_gpu_peaks_are_looked_up_by_exact_name():
    from megatron_blackmamba.training.flops import datasheet_peak

    assert datasheet_peak("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert datasheet_peak("NVIDIA H100 PCIe")[0] == 756.0  # not the SXM part's peak
    assert datasheet_peak("NVIDIA H100 NVL")[0] == 835.0
    assert datasheet_peak("NVIDIA H200")[0] == 989.0
    peak, why = datasheet_peak("NVIDIA H100 Hypothetical")
    assert peak == 0.0 and "set logging.peak_tflops" in why
