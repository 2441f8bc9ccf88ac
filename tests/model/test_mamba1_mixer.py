"""The megatron Mamba-1 mixer against a plain float64 Mamba-1 written from the equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_blackmamba.config import load_config
from megatron_blackmamba.model.builder import transformer_config
from megatron_blackmamba.model.recurrent_state import RecurrentState
from megatron_blackmamba.model.spec import mamba_layer_spec


def _mixer(hidden: int, d_state: int):
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.transformer.spec_utils import build_module

    from megatron_blackmamba.model.norm import RMSNorm

    job = load_config(
        None, [f"model.hidden_size={hidden}", f"model.d_state={d_state}", "training.precision=fp32"]
    )
    spec = mamba_layer_spec(job.model, LocalSpecProvider(), RMSNorm).submodules.mixer
    mixer = build_module(
        spec,
        transformer_config(job),
        d_model=hidden,
        layer_number=1,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    with torch.no_grad():  # non-trivial values everywhere, so every term of the recurrence matters
        for p in mixer.parameters():
            if p is not mixer.A_log:
                p.add_(torch.randn_like(p) * 0.1)
    return (
        mixer.cpu()
    )  # megatron builds on the GPU where there is one; these tests run the CPU path


def reference_mamba1(x: torch.Tensor, m) -> torch.Tensor:
    """Mamba-1 block, float64, one time step at a time. x: [s, b, h] -> [s, b, h]."""

    def d(t):
        return t.detach().double()

    w_in, w_x, w_dt, b_dt, w_out = (
        d(m.in_proj.weight),
        d(m.x_proj.weight),
        d(m.dt_proj.weight),
        d(m.dt_proj.bias),
        d(m.out_proj.weight),
    )
    conv_w, conv_b = d(m.conv1d.weight).squeeze(1), d(m.conv1d.bias)
    A, D = -torch.exp(d(m.A_log)), d(m.D)
    seq, batch, _ = x.shape
    di, n, r, width = m.d_inner, m.d_state, m.dt_rank, m.d_conv
    xz = x.double() @ w_in.T
    u_in, z = xz[..., :di], xz[..., di:]
    out = torch.zeros(seq, batch, w_out.shape[0], dtype=torch.float64)
    for bi in range(batch):
        h = torch.zeros(di, n, dtype=torch.float64)
        for t in range(seq):
            window = torch.stack(
                [
                    u_in[t - k, bi] if t - k >= 0 else torch.zeros(di, dtype=torch.float64)
                    for k in range(width - 1, -1, -1)
                ],
                dim=-1,
            )  # [di, width], oldest first
            u = F.silu((window * conv_w).sum(-1) + conv_b)
            proj = w_x @ u
            dt = F.softplus(w_dt @ proj[:r] + b_dt)
            B, C = proj[r : r + n], proj[r + n :]
            h = torch.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B[None, :]
            y = (h @ C + D * u) * F.silu(z[t, bi])
            out[t, bi] = w_out @ y
    return out


@pytest.mark.parametrize(
    "seq, batch, hidden, d_state", [(1, 1, 16, 4), (7, 2, 16, 4), (37, 2, 32, 16)]
)
def test_forward_matches_float64_reference(single_rank, seq, batch, hidden, d_state):
    torch.manual_seed(seq)
    mixer = _mixer(hidden, d_state)
    x = torch.randn(seq, batch, hidden)
    out, bias = mixer(x)
    assert bias is None
    ref = reference_mamba1(x, mixer)
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_prefill_then_decode_matches_full_forward(single_rank):
    torch.manual_seed(0)
    mixer = _mixer(16, 4).eval()
    x = torch.randn(12, 2, 16)
    with torch.no_grad():
        full, _ = mixer(x)
        state = RecurrentState(max_batch_size=2, max_sequence_length=64)
        prefix, _ = mixer(x[:5], inference_context=state)
        steps = [prefix]
        for t in range(5, 12):
            state.sequence_len_offset = t
            step, _ = mixer(x[t : t + 1], inference_context=state)
            steps.append(step)
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-6)
    conv_shape, ssm_shape = mixer.state_shapes(2)
    assert state.state_bytes() == 4 * (math.prod(conv_shape) + math.prod(ssm_shape))
