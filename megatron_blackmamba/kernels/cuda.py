"""Thin adapters from the public kernel API to mamba_ssm's and causal_conv1d's CUDA kernels.

Nothing here imports those packages at module load: ``import_error`` tries once per process and
only when a CUDA backend is actually considered, so CPU-only machines never touch Triton or the
compiled extensions. The adapters only normalise dtypes to what the kernels check (fp32 A, D and
delta_bias; activations in u's dtype; conv bias in the weight's dtype); casts are differentiable
no-ops when the dtypes already match.
"""

from __future__ import annotations

import functools
import importlib
import sys

import torch
from torch import Tensor

MAMBA_SSM = "mamba_ssm"
CAUSAL_CONV1D = "causal_conv1d"
TRANSFORMER_ENGINE = "transformer_engine"
_KERNEL_MODULES = {
    MAMBA_SSM: (
        "mamba_ssm.ops.selective_scan_interface",
        "mamba_ssm.ops.triton.selective_state_update",
    ),
    CAUSAL_CONV1D: ("causal_conv1d",),
    TRANSFORMER_ENGINE: ("transformer_engine",),
}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def import_error(package: str) -> str | None:
    """None if ``package``'s kernels import, else the reason. Cached: imported at most once."""
    try:
        for module in _KERNEL_MODULES[package]:
            importlib.import_module(module)
    except Exception as exc:  # a broken CUDA build surfaces as ImportError, OSError or RuntimeError
        return f"{type(exc).__name__}: {exc}"
    return None


def have_transformer_engine() -> bool:
    """Whether Transformer Engine imports: megatron then builds TE's linear layers and norms."""
    return import_error(TRANSFORMER_ENGINE) is None


def package_version(package: str) -> str:
    """Version string of an already-imported kernel package, for the backend log line."""
    return str(getattr(sys.modules.get(package), "__version__", "unknown version"))


def unsupported(
    dtype: torch.dtype, *, has_initial_state: bool = False, conv_width: int | None = None
) -> str | None:
    """What these call arguments need that the CUDA kernels lack, or None if they can run them."""
    if dtype not in _KERNEL_DTYPES:
        return f"{dtype} inputs (the CUDA kernels take float32, float16 or bfloat16)"
    if has_initial_state:
        return "initial_state (mamba_ssm's selective_scan_fn always starts from a zero state)"
    if conv_width is not None and not 2 <= conv_width <= 4:
        return f"conv width {conv_width} (causal_conv1d supports widths 2 to 4)"
    return None


def _fp32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def scan_kernel_args(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> tuple:
    """(u, delta, A, B, C, D, z, delta_bias) in the dtypes both CUDA scans check: activations in
    u's dtype, A, D and delta_bias fp32."""
    dtype = u.dtype
    return (
        u,
        delta.to(dtype),
        A.float(),
        B.to(dtype),
        C.to(dtype),
        _fp32(D),
        None if z is None else z.to(dtype),
        _fp32(delta_bias),
    )


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(
        *scan_kernel_args(u, delta, A, B, C, D, z, delta_bias), delta_softplus, return_last_state
    )


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
) -> Tensor:
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as kernel

    return kernel(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn(
        x, weight, None if bias is None else bias.to(weight.dtype), activation=activation
    )


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None
) -> Tensor:
    from causal_conv1d import causal_conv1d_update as kernel

    return kernel(
        x,
        conv_state,
        weight,
        None if bias is None else bias.to(weight.dtype),
        activation=activation,
    )
