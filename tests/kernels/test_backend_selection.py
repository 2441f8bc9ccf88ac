"""Backend selection, its env/argument overrides, its log line, and the CUDA adapters' plumbing.

Runs without a GPU: CUDA availability is simulated by patching ``cuda.import_error`` and asking
for a ``cuda`` device without allocating on it; the adapters are checked against fake kernel
modules that record what they receive.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

import megatron_blackmamba.kernels as kernels
from megatron_blackmamba.kernels import cuda as kernels_cuda
from megatron_blackmamba.kernels.causal_conv1d_torch import causal_conv1d as causal_conv1d_torch
from megatron_blackmamba.kernels.selective_scan_torch import selective_scan_chunked

CUDA = torch.device("cuda")  # only a device descriptor: nothing is allocated on it
LOGGER = "megatron_blackmamba.kernels"


@pytest.fixture(autouse=True)
def clean_selection(monkeypatch):
    """Each test starts with no env override and a fresh once-per-process log memory."""
    monkeypatch.delenv(kernels.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(kernels, "_logged", set())


def scan_inputs(batch: int = 1, dim: int = 3, dstate: int = 4, seqlen: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        u=torch.randn(batch, dim, seqlen, generator=g),
        delta=torch.rand(batch, dim, seqlen, generator=g),
        A=-torch.rand(dim, dstate, generator=g),
        B=torch.randn(batch, dstate, seqlen, generator=g),
        C=torch.randn(batch, dstate, seqlen, generator=g),
    )


def call_op(op: str, **kwargs) -> torch.Tensor:
    """Run one public op on small CPU inputs."""
    s = scan_inputs()
    if op == "selective_scan":
        return kernels.selective_scan(**s, **kwargs)
    if op == "selective_state_update":
        state = torch.zeros(1, 3, 4)
        return kernels.selective_state_update(
            state,
            s["u"][..., 0],
            s["delta"][..., 0],
            s["A"],
            s["B"][..., 0],
            s["C"][..., 0],
            **kwargs,
        )
    weight = torch.randn(3, 4)
    if op == "causal_conv1d":
        return kernels.causal_conv1d(s["u"], weight, **kwargs)
    return kernels.causal_conv1d_update(s["u"][..., 0], torch.zeros(1, 3, 4), weight, **kwargs)


OPS = ["selective_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update"]


def test_auto_on_cpu_selects_torch_and_logs_it(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert kernels.kernel_backend(torch.device("cpu")) == "torch"
    s = scan_inputs()
    torch.testing.assert_close(
        kernels.selective_scan(**s), selective_scan_chunked(**s), rtol=0, atol=0
    )
    assert (
        "selective_scan backend: torch (tensors are on cpu, not a CUDA device)" in caplog.messages
    )


def test_backend_is_logged_once_per_op(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(3):
        call_op("causal_conv1d")
        call_op("selective_scan")
    lines = [m for m in caplog.messages if " backend: " in m]
    assert sorted(line.split(" backend: ")[0] for line in lines) == [
        "causal_conv1d",
        "selective_scan",
    ]
    assert all(" backend: torch (" in line for line in lines)


def test_env_override_torch(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setenv(kernels.BACKEND_ENV_VAR, "torch")
    # even for a CUDA device whose kernels would import, the override wins (and imports nothing)
    monkeypatch.setattr(
        kernels_cuda, "import_error", lambda package: pytest.fail("import attempted")
    )
    assert kernels.kernel_backend(CUDA) == "torch"
    call_op("causal_conv1d")
    assert (
        f"causal_conv1d backend: torch (requested by {kernels.BACKEND_ENV_VAR}=torch)"
        in caplog.messages
    )


@pytest.mark.parametrize("via", ["env", "argument"])
@pytest.mark.parametrize("op", OPS)
def test_forcing_cuda_on_cpu_raises_clear_error(op, via, monkeypatch):
    kwargs = {}
    if via == "env":
        monkeypatch.setenv(kernels.BACKEND_ENV_VAR, "cuda")
    else:
        kwargs["backend"] = "cuda"
    with pytest.raises(
        RuntimeError, match=r"tensors are on cpu.*pip install megatron_blackmamba\[cuda\]"
    ) as info:
        call_op(op, **kwargs)
    assert op in str(info.value)


def test_cuda_error_names_the_missing_package(monkeypatch):
    monkeypatch.setattr(
        kernels_cuda, "import_error", lambda package: f"ModuleNotFoundError: no {package}"
    )
    with pytest.raises(
        RuntimeError, match="mamba_ssm not importable: ModuleNotFoundError: no mamba_ssm"
    ):
        kernels._resolve("selective_scan", CUDA, "cuda")


def test_per_call_argument_beats_env(monkeypatch):
    monkeypatch.setenv(kernels.BACKEND_ENV_VAR, "cuda")
    x, weight = torch.randn(1, 3, 5), torch.randn(3, 4)
    out = kernels.causal_conv1d(x, weight, activation="silu", backend="torch")
    torch.testing.assert_close(
        out, causal_conv1d_torch(x, weight, activation="silu"), rtol=0, atol=0
    )


def test_invalid_choice_raises(monkeypatch):
    monkeypatch.setenv(kernels.BACKEND_ENV_VAR, "triton")
    with pytest.raises(ValueError, match="auto, torch, cuda"):
        call_op("selective_scan")
    with pytest.raises(ValueError, match="backend='gpu'"):
        call_op("causal_conv1d", backend="gpu")


def test_cuda_device_with_kernels_selects_cuda(monkeypatch):
    monkeypatch.setattr(kernels_cuda, "import_error", lambda package: None)
    assert kernels.kernel_backend(CUDA) == "cuda"
    assert kernels.kernel_backend(torch.device("cpu")) == "torch"


def test_cuda_device_with_one_package_missing(monkeypatch):
    errors = {
        kernels_cuda.MAMBA_SSM: None,
        kernels_cuda.CAUSAL_CONV1D: "ModuleNotFoundError: causal_conv1d",
    }
    monkeypatch.setattr(kernels_cuda, "import_error", errors.get)
    assert kernels._resolve("selective_scan", CUDA, None)[0] == "cuda"
    name, reason = kernels._resolve("causal_conv1d", CUDA, None)
    assert name == "torch" and "causal_conv1d not importable" in reason
    assert kernels.kernel_backend(CUDA) == "torch"  # "cuda" means every op runs on its CUDA kernel


@pytest.mark.parametrize(
    "limitation",
    [
        kernels_cuda.unsupported(torch.float64),
        kernels_cuda.unsupported(torch.float32, has_initial_state=True),
        kernels_cuda.unsupported(torch.bfloat16, conv_width=5),
    ],
)
def test_arguments_the_cuda_kernels_lack_fall_back_or_raise(limitation, monkeypatch):
    monkeypatch.setattr(kernels_cuda, "import_error", lambda package: None)
    assert limitation is not None
    name, reason = kernels._resolve("selective_scan", CUDA, None, limitation)
    assert name == "torch" and limitation in reason
    with pytest.raises(RuntimeError, match="does not support"):
        kernels._resolve("selective_scan", CUDA, "cuda", limitation)


def test_supported_arguments_have_no_limitation():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert kernels_cuda.unsupported(dtype, conv_width=4) is None


def install_fake_modules(monkeypatch, **modules: dict) -> None:
    """Register fake modules (dotted name -> attributes), creating their parent packages."""
    for name, attributes in modules.items():
        parts = name.split(".")
        for i in range(1, len(parts)):
            monkeypatch.setitem(
                sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i]))
            )
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attributes))


def test_import_error_reports_missing_and_present_packages(monkeypatch):
    probe = kernels_cuda.import_error.__wrapped__  # bypass the per-process cache
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # None in sys.modules makes import fail
    assert "causal_conv1d" in probe(kernels_cuda.CAUSAL_CONV1D)
    install_fake_modules(monkeypatch, causal_conv1d={})
    assert probe(kernels_cuda.CAUSAL_CONV1D) is None


def test_selective_scan_adapter_matches_mamba_ssm_signature(monkeypatch):
    calls = []

    def selective_scan_fn(
        u,
        delta,
        A,
        B,
        C,
        D=None,
        z=None,
        delta_bias=None,
        delta_softplus=False,
        return_last_state=False,
    ):
        calls.append(
            dict(
                u=u,
                delta=delta,
                A=A,
                B=B,
                C=C,
                D=D,
                z=z,
                delta_bias=delta_bias,
                delta_softplus=delta_softplus,
                return_last_state=return_last_state,
            )
        )
        return u

    install_fake_modules(
        monkeypatch,
        **{"mamba_ssm.ops.selective_scan_interface": dict(selective_scan_fn=selective_scan_fn)},
    )
    s = {k: v.bfloat16() for k, v in scan_inputs().items()}
    D, z, bias = torch.randn(3).bfloat16(), torch.randn(1, 3, 6), torch.randn(3).bfloat16()
    kernels_cuda.selective_scan(
        s["u"], s["delta"].float(), s["A"], s["B"], s["C"], D, z, bias, True, True
    )
    (got,) = calls
    assert got["delta_softplus"] is True and got["return_last_state"] is True
    for name in ("u", "delta", "B", "C", "z"):  # the kernel wants activations in u's dtype
        assert got[name].dtype == torch.bfloat16, name
    for name in ("A", "D", "delta_bias"):  # and fp32 parameters
        assert got[name].dtype == torch.float32, name


def test_conv_adapters_cast_bias_and_pass_activation(monkeypatch):
    calls = []

    def causal_conv1d_fn(
        x,
        weight,
        bias=None,
        seq_idx=None,
        initial_states=None,
        return_final_states=False,
        final_states_out=None,
        activation=None,
    ):
        calls.append((bias.dtype, activation))
        return x

    def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
        calls.append((bias.dtype, activation, conv_state.shape))
        return x

    install_fake_modules(
        monkeypatch,
        causal_conv1d=dict(
            causal_conv1d_fn=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update
        ),
    )
    x, weight, bias = torch.randn(1, 3, 5).bfloat16(), torch.randn(3, 4), torch.randn(3).bfloat16()
    kernels_cuda.causal_conv1d(x, weight, bias, "silu")
    kernels_cuda.causal_conv1d_update(x[..., 0], torch.zeros(1, 3, 4), weight, bias, None)
    assert calls == [(torch.float32, "silu"), (torch.float32, None, (1, 3, 4))]


def test_state_update_adapter_passes_keywords(monkeypatch):
    calls = []

    def selective_state_update(
        state,
        x,
        dt,
        A,
        B,
        C,
        D=None,
        z=None,
        dt_bias=None,
        dt_softplus=False,
        state_batch_indices=None,
    ):
        calls.append(dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus))
        return x

    install_fake_modules(
        monkeypatch,
        **{
            "mamba_ssm.ops.triton.selective_state_update": dict(
                selective_state_update=selective_state_update
            )
        },
    )
    D, z, bias = torch.ones(3), torch.ones(1, 3), torch.zeros(3)
    state, x = torch.zeros(1, 3, 4), torch.ones(1, 3)
    A, B, C = torch.ones(3, 4), torch.ones(1, 4), torch.ones(1, 4)
    kernels_cuda.selective_state_update(state, x, x, A, B, C, D, z, bias, True)
    (got,) = calls
    assert got["D"] is D and got["z"] is z and got["dt_bias"] is bias and got["dt_softplus"] is True
