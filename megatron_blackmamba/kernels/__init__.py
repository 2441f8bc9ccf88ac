"""Mamba-1 compute kernels: mamba_ssm / causal_conv1d CUDA kernels with a pure-PyTorch fallback.

Each op picks its backend per call from the tensors' device:

* ``"cuda"`` when the tensors are on a CUDA device and the op's package imports
  (``mamba_ssm`` for the scan and the decode step, ``causal_conv1d`` for the conv);
* ``"torch"`` otherwise, and for arguments the CUDA kernels lack (float64, ``initial_state``).

Under the CUDA backend the scan runs this project's kernel (``selective_scan_cuda``, d_state 16,
built with nvcc on first use) where it can, else mamba-ssm's; ``BLACKMAMBA_SCAN_KERNEL`` overrides
that (see ``selective_scan_cuda``).

``BLACKMAMBA_KERNEL_BACKEND=torch|cuda|auto`` (default auto) overrides the choice process-wide and
the ``backend=`` argument overrides it per call; asking for ``cuda`` where it cannot run raises a
RuntimeError naming what is missing. The choice is logged once per op and backend at INFO on the
``megatron_blackmamba.kernels`` logger. Argument conventions are mamba-ssm's, so either backend
is a drop-in for the other.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from . import cuda as _cuda
from . import selective_scan_cuda as _own_scan
from .causal_conv1d_torch import causal_conv1d as _causal_conv1d_torch
from .causal_conv1d_torch import causal_conv1d_update as _causal_conv1d_update_torch
from .selective_scan_torch import DEFAULT_CHUNK_SIZE, selective_scan_chunked
from .selective_scan_torch import selective_state_update as _selective_state_update_torch

__all__ = [
    "BACKEND_ENV_VAR",
    "DEFAULT_CHUNK_SIZE",
    "causal_conv1d",
    "causal_conv1d_update",
    "kernel_backend",
    "selective_scan",
    "selective_state_update",
]

BACKEND_ENV_VAR = "BLACKMAMBA_KERNEL_BACKEND"
_CHOICES = ("auto", "torch", "cuda")
_INSTALL_HINT = "pip install megatron_blackmamba[cuda]"
_OP_PACKAGE = {
    "selective_scan": _cuda.MAMBA_SSM,
    "selective_state_update": _cuda.MAMBA_SSM,
    "causal_conv1d": _cuda.CAUSAL_CONV1D,
    "causal_conv1d_update": _cuda.CAUSAL_CONV1D,
}

logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def _requested(backend: str | None) -> tuple[str, str]:
    """(choice, where it came from) for the per-call argument, else the env var, else auto."""
    if backend is not None:
        value, source = backend, f"backend={backend!r}"
    else:
        value = os.environ.get(BACKEND_ENV_VAR, "auto")
        source = f"{BACKEND_ENV_VAR}={value}" if BACKEND_ENV_VAR in os.environ else "auto"
    choice = value.strip().lower()
    if choice not in _CHOICES:
        raise ValueError(f"{source}: the kernel backend must be one of {', '.join(_CHOICES)}")
    return choice, source


def _resolve(
    op: str, device: torch.device, backend: str | None, limitation: str | None = None
) -> tuple[str, str]:
    """(backend, reason) for ``op`` on ``device``; ``limitation`` is what the CUDA kernel can't do
    here."""
    choice, source = _requested(backend)
    if choice == "torch":
        return "torch", f"requested by {source}"
    package = _OP_PACKAGE[op]
    missing = []
    if device.type != "cuda":
        missing.append(f"tensors are on {device.type}, not a CUDA device")
    if device.type == "cuda" or choice == "cuda":  # don't pay for the import when it can't matter
        error = _cuda.import_error(package)
        if error is not None:
            missing.append(f"{package} not importable: {error}")
    if missing and choice == "cuda":
        raise RuntimeError(
            f"{op}: the CUDA backend was requested ({source}) but {'; '.join(missing)}. It needs a"
            f" CUDA GPU plus the mamba_ssm and causal_conv1d packages: `{_INSTALL_HINT}`, or use"
            " the torch backend."
        )
    if missing:
        return "torch", "; ".join(missing)
    if limitation is not None:
        if choice == "cuda":
            raise RuntimeError(
                f"{op}: the CUDA backend was requested ({source}) but its kernel does not support "
                f"{limitation}; pass backend='torch' for this call."
            )
        return "torch", f"the CUDA kernel does not support {limitation}"
    return "cuda", f"{package} {_cuda.package_version(package)}"


def _log_choice(what: str, name: str, reason: str) -> None:
    """Logs ``what``'s choice at INFO the first time it is ``name``."""
    if (what, name) not in _logged:
        _logged.add((what, name))
        logger.info("%s: %s (%s)", what, name, reason)


def _select(
    op: str, device: torch.device, backend: str | None, limitation: str | None = None
) -> str:
    name, reason = _resolve(op, device, backend, limitation)
    _log_choice(f"{op} backend", name, reason)
    return name


def kernel_backend(device: torch.device | str | None = None) -> str:
    """ "cuda" if every op would use its CUDA kernel for tensors on ``device``, else "torch".

    ``device`` defaults to the current CUDA device when there is one, else the CPU. Honours
    BLACKMAMBA_KERNEL_BACKEND (so it raises like the ops do when cuda is forced but impossible).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    chosen = {_resolve(op, device, None)[0] for op in _OP_PACKAGE}
    return "cuda" if chosen == {"cuda"} else "torch"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    backend: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1 selective scan with mamba-ssm's ``selective_scan_fn`` conventions.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate), negative; B, C: (batch, dstate, seqlen);
    D, delta_bias: (dim,); initial_state: (batch, dim, dstate), torch backend only. mamba-ssm's
    kernel also takes a constant (dim, dstate) or grouped (batch, groups, dstate, seqlen) B/C;
    this project's kernel refuses them (falling back to mamba-ssm's, ``selective_scan_cuda``) and
    the torch backend raises a ValueError naming the argument.
    delta <- softplus(delta + delta_bias) if delta_softplus; h_t = exp(delta_t A) h_{t-1} +
    delta_t B_t u_t; y_t = <C_t, h_t> + D u_t; y *= silu(z). Returns y in u's dtype and, with
    ``return_last_state``, the final state (batch, dim, dstate) in fp32. ``chunk_size`` tunes the
    torch backend only (see ``selective_scan_chunked``).
    """
    limitation = _cuda.unsupported(u.dtype, has_initial_state=initial_state is not None)
    if _select("selective_scan", u.device, backend, limitation) == "cuda":
        if _use_own_scan(u, delta, A, B, C, D, z, delta_bias):
            return _own_scan.selective_scan(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
            )
        return _cuda.selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    return selective_scan_chunked(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        return_last_state,
        initial_state,
        chunk_size,
    )


def _use_own_scan(*args: Tensor | None) -> bool:
    """Whether the CUDA scan is this project's kernel rather than mamba-ssm's for these arguments
    (u, delta, A, B, C, D, z, delta_bias); logged once per choice."""
    own, why = _own_scan.choose(*args)
    _log_choice("selective_scan kernel", "this project's" if own else "mamba-ssm's", why)
    return own


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    backend: str | None = None,
) -> Tensor:
    """One decode step of the scan: ``state`` (batch, dim, dstate) is advanced IN PLACE.

    x, dt, z: (batch, dim); B, C: (batch, dstate); A, D, dt_bias as in ``selective_scan``.
    Returns y (batch, dim) in x's dtype.
    """
    if _select("selective_state_update", x.device, backend, _cuda.unsupported(x.dtype)) == "cuda":
        return _cuda.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return _selective_state_update_torch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> Tensor:
    """Depthwise causal conv: x (batch, dim, seqlen), weight (dim, width), bias (dim,).

    ``activation`` is None, "silu" or "swish". Returns (batch, dim, seqlen) in x's dtype.
    """
    limitation = _cuda.unsupported(x.dtype, conv_width=weight.shape[-1])
    if _select("causal_conv1d", x.device, backend, limitation) == "cuda":
        return _cuda.causal_conv1d(x, weight, bias, activation)
    return _causal_conv1d_torch(x, weight, bias, activation)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> Tensor:
    """One decode step of the conv: x (batch, dim); conv_state (batch, dim, width) shifted IN
    PLACE."""
    limitation = _cuda.unsupported(x.dtype, conv_width=weight.shape[-1])
    if _select("causal_conv1d_update", x.device, backend, limitation) == "cuda":
        return _cuda.causal_conv1d_update(x, conv_state, weight, bias, activation)
    return _causal_conv1d_update_torch(x, conv_state, weight, bias, activation)
