"""This project's Mamba-1 selective-scan CUDA kernel (``csrc/selective_scan.cu``): build, load,
autograd.

The CUDA scan for d_state 16 wherever it builds; mamba-ssm's kernel otherwise.
``BLACKMAMBA_SCAN_KERNEL`` picks: ``auto`` (default) this kernel where it can run, else
mamba-ssm's; ``blackmamba`` this kernel or an error saying why it cannot run; ``mamba_ssm``
mamba-ssm's. It walks each channel's states sequentially in time and sums dB/dC over a block's
channels on chip; where a micro-batch's channels alone would leave SMs idle (long sequences at a
fixed token budget) it also splits the time axis into segments (``time_segments``). At the paper
configs' micro-batches its forward+backward is 1.3-1.5x mamba-ssm's, and it saves fp32 state
checkpoints (4 bytes per element of u) instead of mamba-ssm's output copy (bf16: 2 bytes), see
bench/PERF_NOTES.md.

It has a C ABI, so it is compiled with nvcc alone on first use, for the GPU at hand, into a cache
directory shared by every rank and process (``BLACKMAMBA_KERNEL_CACHE``, default
``~/.cache/megatron_blackmamba``): the file name carries the source's hash and the GPU
architecture, the build runs under a file lock and lands by atomic rename, so concurrent ranks
build once and a crashed build leaves nothing half-written.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .cuda import scan_kernel_args

SOURCE = Path(__file__).parent / "csrc" / "selective_scan.cu"
CACHE_ENV_VAR = "BLACKMAMBA_KERNEL_CACHE"
KERNEL_ENV_VAR = "BLACKMAMBA_SCAN_KERNEL"
KERNELS = ("auto", "blackmamba", "mamba_ssm")
STATES = 16  # the kernel's d_state
CHUNK = 16  # steps between the forward's state checkpoints
MAX_BATCH = 65535  # sequences are the grid's y dimension
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class _Params(ctypes.Structure):
    """Mirror of ``BlackMambaScanParams`` in csrc/selective_scan.cu, field for field."""

    _fields_ = [
        ("batch", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("seqlen", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("softplus", ctypes.c_int32),
        ("u", ctypes.c_void_p),
        ("u_batch_stride", ctypes.c_int64),
        ("u_dim_stride", ctypes.c_int64),
        ("delta", ctypes.c_void_p),
        ("delta_batch_stride", ctypes.c_int64),
        ("delta_dim_stride", ctypes.c_int64),
        ("z", ctypes.c_void_p),
        ("z_batch_stride", ctypes.c_int64),
        ("z_dim_stride", ctypes.c_int64),
        ("B", ctypes.c_void_p),
        ("B_batch_stride", ctypes.c_int64),
        ("B_state_stride", ctypes.c_int64),
        ("C", ctypes.c_void_p),
        ("C_batch_stride", ctypes.c_int64),
        ("C_state_stride", ctypes.c_int64),
        ("A", ctypes.c_void_p),
        ("D", ctypes.c_void_p),
        ("delta_bias", ctypes.c_void_p),
        ("checkpoints", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("dout", ctypes.c_void_p),
        ("dout_batch_stride", ctypes.c_int64),
        ("dout_dim_stride", ctypes.c_int64),
        ("du", ctypes.c_void_p),
        ("ddelta", ctypes.c_void_p),
        ("dz", ctypes.c_void_p),
        ("dA", ctypes.c_void_p),
        ("dB", ctypes.c_void_p),
        ("dC", ctypes.c_void_p),
        ("dD", ctypes.c_void_p),
        ("ddelta_bias", ctypes.c_void_p),
        ("segment_chunks", ctypes.c_int64),
        ("segment_states", ctypes.c_void_p),
        ("segment_delta", ctypes.c_void_p),
    ]


def requested() -> str:
    """The scan kernel ``BLACKMAMBA_SCAN_KERNEL`` asks for: one of KERNELS, default ``auto``."""
    value = os.environ.get(KERNEL_ENV_VAR, KERNELS[0]).strip().lower()
    if value not in KERNELS:
        raise ValueError(
            f"{KERNEL_ENV_VAR}={value}: the selective-scan kernel must be one of"
            f" {', '.join(KERNELS)}"
        )
    return value


def choose(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
) -> tuple[bool, str]:
    """(whether this kernel runs these CUDA arguments, why). Raises RuntimeError naming the
    argument where ``BLACKMAMBA_SCAN_KERNEL=blackmamba`` asked for it and it cannot run; under
    ``auto`` that falls back to mamba-ssm's kernel, with the reason."""
    choice = requested()
    if choice == "mamba_ssm":
        return False, f"{KERNEL_ENV_VAR}=mamba_ssm"
    why = unsupported(u, delta, A, B, C, D, z, delta_bias) or load_error(device_arch(u.device))
    if why is None:
        return True, f"{KERNEL_ENV_VAR}={choice}, {library_path(device_arch(u.device))}"
    if choice == "blackmamba":
        raise RuntimeError(f"selective_scan: {KERNEL_ENV_VAR}=blackmamba was requested but {why}")
    return False, f"{KERNEL_ENV_VAR}=auto and this project's kernel cannot run: {why}"


# The backward's launch shape (csrc/selective_scan.cu: kBwdThreads / kBwdSplit channels per
# block, kBwdMinBlocks resident per SM): the longer of the two kernels sets the time split.
BWD_CHANNELS_PER_BLOCK = 32
BWD_BLOCKS_PER_SM = 5
SEGMENT_ROUNDS = 6  # backward blocks per resident slot that a split in time aims for
MIN_SEGMENT_CHUNKS = 16  # shortest segment: 256 steps


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def time_segments(batch: int, dim: int, seqlen: int, sms: int) -> int:
    """How many time segments the kernel splits each sequence into: 1 where the micro-batch's
    channels fill one round of the GPU's backward blocks, else enough for SEGMENT_ROUNDS rounds
    (more, shorter segments shorten the first pass's serial walk; measured on an H200 at
    [1, 2304, 32768], forward+backward 6.17 / 6.00 / 5.74 ms at 16 / 32 / 64 segments).

    Each block walks its channels through its segment, so a grid of few sequences (long ones at a
    fixed token budget: one 32k sequence of d_inner 2304 is 72 backward blocks for the H200's 660
    slots) leaves SMs idle however long the sequence. Split in time, the blocks walk shorter
    segments side by side, after a first pass over each segment and a combine
    (csrc/selective_scan.cu); segments stay at least MIN_SEGMENT_CHUNKS chunks long.
    """
    blocks = batch * -(-dim // BWD_CHANNELS_PER_BLOCK)
    slots = BWD_BLOCKS_PER_SM * sms
    if blocks >= slots:
        return 1
    chunks = -(-seqlen // CHUNK)
    wanted = -(-SEGMENT_ROUNDS * slots // blocks)
    return max(1, min(wanted, chunks // MIN_SEGMENT_CHUNKS))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "megatron_blackmamba")


@functools.cache
def _source_digest() -> str:
    """The kernel source's hash, read once per process: choose() names the build on every scan
    call."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def library_path(arch: str) -> Path:
    """Where the build for ``arch`` (e.g. "sm_90") of the current source lives in the cache."""
    return cache_dir() / f"selective_scan_{arch}_{_source_digest()}.so"


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home) / "bin" / "nvcc" if home else None
    found = str(candidate) if candidate and candidate.exists() else shutil.which("nvcc")
    if found is None:
        raise RuntimeError(
            "nvcc not found (set CUDA_HOME or put nvcc on PATH) to build csrc/selective_scan.cu; "
            f"or copy a build into {cache_dir()} (see {CACHE_ENV_VAR})"
        )
    return found


def build(arch: str) -> Path:
    """Compile the kernel for ``arch`` into the cache unless it is there; return the .so path."""
    target = library_path(arch)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per cache; the others wait, then load it
        if target.exists():
            return target
        compute = arch.replace("sm_", "compute_")
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            command = [
                _nvcc(),
                "-O3",
                "--use_fast_math",
                "-std=c++17",
                "-Xcompiler",
                "-fPIC",
                "-shared",
                f"-gencode=arch={compute},code={arch}",
                "-o",
                str(partial),
                str(SOURCE),
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(
                    f"building {SOURCE} failed:\n$ {' '.join(command)}\n{result.stderr[-4000:]}"
                )
            os.replace(partial, target)
    return target


def device_arch(device: torch.device | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@functools.cache
def _library(arch: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(arch)))
    for name in ("blackmamba_scan_fwd", "blackmamba_scan_bwd"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ctypes.POINTER(_Params), ctypes.c_void_p], ctypes.c_int
    lib.blackmamba_scan_error_string.argtypes, lib.blackmamba_scan_error_string.restype = (
        [ctypes.c_int],
        ctypes.c_char_p,
    )
    built = (
        lib.blackmamba_scan_states(),
        lib.blackmamba_scan_chunk(),
        lib.blackmamba_scan_params_size(),
    )
    if built != (STATES, CHUNK, ctypes.sizeof(_Params)):
        raise RuntimeError(
            f"{SOURCE}: the build's (d_state, chunk, parameter bytes) {built} differ from this"
            f" module's {(STATES, CHUNK, ctypes.sizeof(_Params))}"
        )
    return lib


@functools.cache
def load_error(arch: str) -> str | None:
    """None if the kernel builds and loads for ``arch``, else why not. Tried once per process."""
    try:
        _library(arch)
    except Exception as exc:  # a missing nvcc, a failed build or a bad .so
        return f"{type(exc).__name__}: {exc}"
    return None


def unsupported(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    has_initial_state: bool = False,
) -> str | None:
    """What these arguments need that this kernel lacks, naming the argument, or None.

    The kernel implements mamba-ssm's main case only: real A of shape (dim, 16), one per-step B
    and C of shape (batch, 16, seqlen), u/delta/z (batch, dim, seqlen), D and delta_bias (dim,).
    mamba-ssm also takes a constant (dim, d_state) or grouped (batch, groups, d_state, seqlen)
    B/C, complex A and an initial state; those are refused here, never misread. Any strides are
    read (rows are made unit-stride first), so no layout of a supported shape is refused.
    """
    if has_initial_state:
        return "initial_state (the kernel starts from a zero state)"
    if u.dtype not in _DTYPE_CODES:
        return f"u: {u.dtype} inputs (the kernel takes float32, float16 or bfloat16)"
    if u.dim() != 3 or 0 in u.shape:
        return f"u: shape {tuple(u.shape)} (the kernel takes a non-empty (batch, dim, seqlen))"
    batch, dim, seqlen = u.shape
    if batch > MAX_BATCH:
        return f"u: batch {batch} (the kernel's grid takes at most {MAX_BATCH} sequences)"
    tensors = {"delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != u.device:
            return f"{name}: on {t.device}, u on {u.device}"
        if t.is_complex() or not t.is_floating_point():
            return f"{name}: {t.dtype} (the kernel is real-valued floating point)"
    if A.dim() != 2 or A.shape[0] != dim:
        return f"A: shape {tuple(A.shape)} (the kernel takes (dim, d_state) = ({dim}, {STATES}))"
    if A.shape[1] != STATES:
        return f"A: d_state {A.shape[1]} (this kernel is built for d_state {STATES})"
    for name in ("B", "C"):
        t = tensors[name]
        if t.dim() == 2:
            return (
                f"{name}: a constant {name} of shape {tuple(t.shape)} (the kernel takes one {name}"
                " per step, (batch, d_state, seqlen))"
            )
        if t.dim() == 4:
            return (
                f"{name}: a grouped {name} of shape {tuple(t.shape)} (the kernel takes one group,"
                " (batch, d_state, seqlen))"
            )
        if tuple(t.shape) != (batch, STATES, seqlen):
            return f"{name}: shape {tuple(t.shape)} (expected {(batch, STATES, seqlen)})"
    for name, shape in (
        ("delta", (batch, dim, seqlen)),
        ("z", (batch, dim, seqlen)),
        ("D", (dim,)),
        ("delta_bias", (dim,)),
    ):
        t = tensors[name]
        if t is not None and tuple(t.shape) != shape:
            return f"{name}: shape {tuple(t.shape)} (expected {shape})"
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(t: Tensor) -> Tensor:
    """The kernel reads sequences as contiguous rows; other strides pass through."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _params(
    u, delta, A, B, C, D, z, delta_bias, softplus: bool, checkpoints: Tensor, segments: int
) -> _Params:
    """The parameter block, with the time split's buffers (``segments`` of ``segment_chunks``
    chunks each; none for one segment), which the kernel fills and reads itself."""
    batch, dim, seqlen = u.shape
    chunks = -(-seqlen // CHUNK)
    segment_chunks = -(-chunks // max(1, min(segments, chunks)))
    p = _Params(
        batch=batch,
        dim=dim,
        seqlen=seqlen,
        dtype=_DTYPE_CODES[u.dtype],
        softplus=int(softplus),
        segment_chunks=segment_chunks,
    )
    segments = -(-chunks // segment_chunks)  # no empty segment
    if segments > 1:
        states = u.new_empty(batch, dim, segments, STATES, dtype=torch.float32)
        delta_sums = u.new_empty(batch, dim, segments, dtype=torch.float32)
        p.segment_states, p.segment_delta = states.data_ptr(), delta_sums.data_ptr()
        p._keep = (states, delta_sums)  # alive until the launches are queued
    for name, t, second in (
        ("u", u, "dim"),
        ("delta", delta, "dim"),
        ("z", z, "dim"),
        ("B", B, "state"),
        ("C", C, "state"),
    ):
        setattr(p, name, _ptr(t))
        if t is not None:
            setattr(p, f"{name}_batch_stride", t.stride(0))
            setattr(p, f"{name}_{second}_stride", t.stride(1))
    p.A, p.D, p.delta_bias, p.checkpoints = _ptr(A), _ptr(D), _ptr(delta_bias), _ptr(checkpoints)
    return p


def _run(entry: str, p: _Params, device: torch.device) -> None:
    lib = _library(device_arch(device))
    stream = torch.cuda.current_stream(device).cuda_stream
    err = getattr(lib, entry)(ctypes.byref(p), ctypes.c_void_p(stream))
    if err != 0:
        raise RuntimeError(f"{entry}: {lib.blackmamba_scan_error_string(err).decode()}")


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, segments: int | None):
        u, delta, B, C = _rows(u), _rows(delta), _rows(B), _rows(C)
        z = None if z is None else _rows(z)
        A = A.contiguous()
        D = None if D is None else D.contiguous()
        delta_bias = None if delta_bias is None else delta_bias.contiguous()
        batch, dim, seqlen = u.shape
        chunks = -(-seqlen // CHUNK)
        checkpoints = u.new_empty(batch, dim, chunks, STATES, dtype=torch.float32)
        out = u.new_empty(batch, dim, seqlen)
        if segments is None:
            segments = time_segments(batch, dim, seqlen, sm_count(u.device))
        p = _params(u, delta, A, B, C, D, z, delta_bias, softplus, checkpoints, segments)
        p.out = out.data_ptr()
        _run("blackmamba_scan_fwd", p, u.device)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
        ctx.softplus, ctx.segments = softplus, segments
        ctx.mark_non_differentiable(checkpoints)
        # Without this, autograd would hand the backward a zero-filled gradient for the
        # checkpoints (fp32, twice the bytes of u: 0.09 ms and 302 MB per 340M layer on an H100).
        ctx.set_materialize_grads(False)
        return out, checkpoints

    @staticmethod
    def backward(ctx, dout, _):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        dout = _rows(dout) if dout is not None else torch.zeros_like(u)
        p = _params(u, delta, A, B, C, D, z, delta_bias, ctx.softplus, checkpoints, ctx.segments)
        p.dout, p.dout_batch_stride, p.dout_dim_stride = (
            dout.data_ptr(),
            dout.stride(0),
            dout.stride(1),
        )
        du, ddelta = (
            torch.empty_like(u, memory_format=torch.contiguous_format),
            torch.empty_like(u, memory_format=torch.contiguous_format),
        )
        dz = None if z is None else torch.empty_like(u, memory_format=torch.contiguous_format)
        dA = torch.zeros_like(A)
        dB = torch.zeros(B.shape, dtype=torch.float32, device=u.device)
        dC = torch.zeros(C.shape, dtype=torch.float32, device=u.device)
        dD = None if D is None else torch.zeros_like(D)
        ddelta_bias = None if delta_bias is None else torch.zeros_like(delta_bias)
        p.du, p.ddelta, p.dz = du.data_ptr(), ddelta.data_ptr(), _ptr(dz)
        p.dA, p.dB, p.dC, p.dD, p.ddelta_bias = (
            dA.data_ptr(),
            dB.data_ptr(),
            dC.data_ptr(),
            _ptr(dD),
            _ptr(ddelta_bias),
        )
        _run("blackmamba_scan_bwd", p, u.device)
        return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, ddelta_bias, None, None


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
    segments: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's ``selective_scan_fn`` contract (activations in u's dtype; A, D, bias fp32).

    ``segments``: how many time segments each sequence is split into (None: ``time_segments``
    for this GPU; more than the sequence's chunks of CHUNK steps is capped), for benchmarks and
    tests; every split computes the same scan."""
    out, checkpoints = _SelectiveScan.apply(
        *scan_kernel_args(u, delta, A, B, C, D, z, delta_bias), delta_softplus, segments
    )
    return (out, checkpoints[:, :, -1]) if return_last_state else out
