"""FLOPs per token for BlackMamba, counted on active parameters only, and MFU.

Counts multiply-adds as 2 FLOPs. A training token costs 3x its forward FLOPs (backward = 2x).
Per layer, forward, per token (h = hidden, di = expand*h, N = d_state, R = dt_rank, W = d_conv):

  Mamba:  in_proj 2*h*2di + conv 2*di*W + x_proj 2*di*(R+2N) + dt_proj 2*R*di + out_proj 2*di*h
          + selective scan 7*di*N (exp(dt*A), dt*B*u, h = dA*h + dBu, C.h) + 5*di (softplus-free
          gating: D*u, silu(z), product) -- elementwise work, counted honestly though it is not GEMM
  MoE:    router 2*h*E + ONE expert (top-1): GeLU 2*h*F*2, gated (SwiGLU/GeGLU) 2*h*2F + 2*F*h
  Head:   output layer 2*h*V (embedding lookup is free)

Inactive experts cost nothing per token, so MFU is measured against the model a token actually
runs through, not the 1.5B/2.8B total.
"""

from __future__ import annotations

import time

import torch

from megatron_blackmamba.config import ModelConfig

# bf16 dense tensor-core peaks (TFLOP/s, vendor datasheets) by the exact name torch reports: the
# PCIe and NVL parts of a generation run at lower clocks and power than its SXM part.
GPU_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA B200": 2250.0,
}


def mamba_layer_flops(m: ModelConfig) -> int:
    h, di, n, r, w = (
        m.hidden_size,
        m.expand * m.hidden_size,
        m.d_state,
        m.resolved_dt_rank(),
        m.d_conv,
    )
    gemms = 2 * h * 2 * di + 2 * di * (r + 2 * n) + 2 * r * di + 2 * di * h
    return gemms + 2 * di * w + 7 * di * n + 5 * di


def moe_layer_flops(m: ModelConfig) -> int:
    h, f, e = m.hidden_size, m.resolved_ffn_hidden_size(), m.num_experts
    gated = m.activation != "gelu"  # swiglu, geglu: fc1 produces gate and value
    expert = 2 * h * 2 * f + 2 * f * h if gated else 2 * h * f * 2
    return 2 * h * e + m.moe_topk * expert


def forward_flops_per_token(m: ModelConfig) -> int:
    pattern = m.resolved_layer_pattern()
    layers = pattern.count("M") * mamba_layer_flops(m) + pattern.count("E") * moe_layer_flops(m)
    return layers + 2 * m.hidden_size * m.vocab_size


def train_flops_per_token(m: ModelConfig) -> int:
    return 3 * forward_flops_per_token(m)


def device_peak_tflops(override: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number came from.

    GPUs: the bf16 datasheet peak by name. CPUs have no datasheet number torch can see, so the
    peak is *measured*: the best of a few fp32 GEMMs on this machine (MFU on CPU then reads as
    "fraction of what matmul alone achieves here").
    """
    if override > 0:
        return override, "configured"
    if torch.cuda.is_available():
        return datasheet_peak(torch.cuda.get_device_name())
    return _measured_cpu_gemm_tflops(), "measured CPU fp32 GEMM"


def datasheet_peak(name: str) -> tuple[float, str]:
    """(bf16 dense peak, source) for a GPU by its exact name; 0 with the fix for an unknown one."""
    if name in GPU_PEAK_TFLOPS:
        return GPU_PEAK_TFLOPS[name], f"{name} bf16 datasheet"
    return 0.0, f"{name}: unknown peak, set logging.peak_tflops"


def _measured_cpu_gemm_tflops(n: int = 768, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12
