"""kernels/selective_scan_cuda (this project's Mamba-1 scan kernel): its build and C interface on
any machine with nvcc, its numerics against the float64 torch scan on a GPU."""

from __future__ import annotations

import ctypes
import functools
import shutil

import pytest
import torch

from megatron_blackmamba import kernels
from megatron_blackmamba.kernels import selective_scan_cuda as own
from megatron_blackmamba.kernels.selective_scan_torch import selective_scan_chunked

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_nvcc
def test_build_is_cached_and_matches_the_ctypes_mirror(tmp_path, monkeypatch):
    """The shipped source compiles; a second build reuses the file; the library's d_state, chunk
    and parameter-block size equal the Python side's (a drifted ctypes mirror would be caught)."""
    monkeypatch.setenv(own.CACHE_ENV_VAR, str(tmp_path))
    path = own.build("sm_90")
    assert path.parent == tmp_path and path.name.startswith("selective_scan_sm_90_")
    stamp = path.stat().st_mtime_ns
    assert own.build("sm_90") == path and path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".build.lock", path.name]
    )  # no leftovers
    lib = ctypes.CDLL(str(path))  # loads without a GPU: cudart reaches the driver on first use only
    assert (lib.blackmamba_scan_states(), lib.blackmamba_scan_chunk()) == (own.STATES, own.CHUNK)
    assert lib.blackmamba_scan_params_size() == ctypes.sizeof(own._Params)


def test_kernel_choice_comes_from_the_env_var(monkeypatch):
    monkeypatch.delenv(own.KERNEL_ENV_VAR, raising=False)
    assert own.requested() == "auto"
    monkeypatch.setenv(own.KERNEL_ENV_VAR, "BlackMamba")
    assert own.requested() == "blackmamba"
    monkeypatch.setenv(own.KERNEL_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=own.KERNEL_ENV_VAR):
        own.requested()


def _args(
    batch: int = 1, dim: int = 4, seqlen: int = 8, d_state: int = 16, device: str = "cpu"
) -> dict:
    """Arguments of one scan in the layout this project's kernel implements (fresh random
    values)."""
    return dict(
        u=torch.randn(batch, dim, seqlen, device=device),
        delta=torch.rand(batch, dim, seqlen, device=device),
        A=-torch.rand(dim, d_state, device=device) - 0.1,
        B=torch.randn(batch, d_state, seqlen, device=device),
        C=torch.randn(batch, d_state, seqlen, device=device),
        D=torch.rand(dim, device=device),
        z=torch.randn(batch, dim, seqlen, device=device),
        delta_bias=torch.rand(dim, device=device),
    )


def _choose(x: dict):
    return own.choose(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"])


@pytest.mark.parametrize("build_error", [None, "RuntimeError: nvcc not found"])
def test_auto_falls_back_to_mamba_ssm_only_where_this_kernel_cannot_run(build_error, monkeypatch):
    monkeypatch.setattr(own, "device_arch", lambda device=None: "sm_90")
    monkeypatch.setattr(own, "load_error", lambda arch: build_error)
    x, x8 = _args(), _args(d_state=8)

    monkeypatch.delenv(own.KERNEL_ENV_VAR, raising=False)
    use, why = _choose(x)
    assert use == (build_error is None)
    assert build_error is None or build_error in why
    use, why = _choose(x8)  # a d_state the kernel is not built for
    assert not use and "d_state 8" in why

    monkeypatch.setenv(own.KERNEL_ENV_VAR, "mamba_ssm")
    assert _choose(x) == (False, f"{own.KERNEL_ENV_VAR}=mamba_ssm")

    monkeypatch.setenv(own.KERNEL_ENV_VAR, "blackmamba")  # asked for by name: no silent fallback
    if build_error is None:
        assert _choose(x)[0]
    else:
        with pytest.raises(RuntimeError, match="nvcc not found"):
            _choose(x)
    with pytest.raises(RuntimeError, match="d_state 8"):
        _choose(x8)


@pytest.mark.parametrize(
    "batch, dim, seqlen, segments",
    [
        (16, 2304, 2048, 1),  # 1152 backward blocks fill the H200's 660 slots: no split
        (4, 2304, 8192, 14),  # 288 blocks: 14 segments make 4032, six rounds
        (1, 2304, 32768, 55),  # 72 blocks: 55 segments of 38 chunks
        (1, 2304, 1000, 3),  # 63 chunks: segments stay 16 chunks long or more
        (1, 2304, 200, 1),  # 13 chunks: too short to split
    ],
)
def test_time_segments_fill_the_gpu_with_few_long_sequences(batch, dim, seqlen, segments):
    assert own.time_segments(batch, dim, seqlen, sms=132) == segments


def _refused_layouts(device: str = "cpu") -> dict[str, tuple[dict, str]]:
    """name -> (arguments that mamba-ssm's selective_scan_fn accepts and this kernel does not
    implement, the start of the refusal, which names the argument)."""
    batch, dim, seqlen, n = 2, 6, 10, 16
    cases = {}
    for name in ("B", "C"):
        x = _args(batch, dim, seqlen, n, device)
        x[name] = torch.randn(dim, n, device=device)
        cases[f"constant {name}"] = (x, f"{name}: a constant {name}")
        x = _args(batch, dim, seqlen, n, device)
        x[name] = torch.randn(batch, 2, n, seqlen, device=device)
        cases[f"grouped {name}"] = (x, f"{name}: a grouped {name}")
    x = _args(batch, dim, seqlen, n, device)
    x["A"] = torch.complex(x["A"], torch.rand_like(x["A"]))
    cases["complex A"] = (x, "A: torch.complex64")
    cases["d_state 8"] = (_args(batch, dim, seqlen, 8, device), "A: d_state 8")
    x = _args(batch, dim, seqlen, n, device)
    x["u"] = x["u"].double()
    cases["float64 u"] = (x, "u: torch.float64")
    return cases


@pytest.mark.parametrize("case", sorted(_refused_layouts()))
def test_refused_argument_layouts_are_named(case):
    """Every layout the kernel does not implement is refused, and the refusal names the argument."""
    x, named = _refused_layouts()[case]
    why = own.unsupported(**x)
    assert why is not None and why.startswith(named), why


def test_supported_layouts_are_accepted_at_any_strides():
    x = _args(2, 6, 10)
    assert own.unsupported(**x) is None
    u = torch.randn(2, 10, 6).transpose(1, 2)  # a (batch, dim, seqlen) view with dim stride 1
    B = torch.randn(1, 16, 10).expand(2, 16, 10)  # one B for the whole batch: batch stride 0
    assert own.unsupported(**{**x, "u": u, "B": B}) is None
    assert own.unsupported(**x, has_initial_state=True).startswith("initial_state")
    assert "batch 70000" in own.unsupported(**{**x, "u": torch.zeros(70000, 6, 1)})


def _inputs(
    batch: int,
    dim: int,
    seqlen: int,
    dtype: torch.dtype,
    seed: int,
    gated: bool,
    skip: bool,
    bias: bool,
):
    """Mixer-like inputs on the GPU; u and z (and B and C) are views of one tensor, as in the
    mixer."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, 2 * dim, seqlen, generator=g)
    bc = torch.randn(batch, 40, seqlen, generator=g)
    x = dict(
        u=xz[:, :dim],
        z=xz[:, dim:] if gated else None,
        B=bc[:, 3:19],
        C=bc[:, 21:37],
        delta=0.5 * torch.randn(batch, dim, seqlen, generator=g),
        A=-torch.rand(dim, 16, generator=g) * 8 - 0.1,
        D=torch.rand(dim, generator=g) if skip else None,
        delta_bias=torch.rand(dim, generator=g) * 4 - 6 if bias else None,
    )
    return {
        k: None if v is None else v.to("cuda", dtype if v.dim() == 3 else torch.float32)
        for k, v in x.items()
    }


def _run(fn, x: dict, dout: torch.Tensor, softplus: bool, dtype=None):
    leaves = {
        k: None if v is None else v.detach().to(dtype or v.dtype).requires_grad_()
        for k, v in x.items()
    }
    out, last = fn(
        leaves["u"],
        leaves["delta"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        leaves["D"],
        leaves["z"],
        leaves["delta_bias"],
        softplus,
        True,
    )
    out.backward(dout.to(out.dtype))
    return out, last, {k: v.grad for k, v in leaves.items() if v is not None}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want).clamp_min(1e-30))


@needs_cuda
@pytest.mark.parametrize(
    "shape, gated, skip, bias, softplus",
    [
        ((2, 200, 100), True, True, True, True),  # channels and steps not multiples of the tiles
        ((1, 130, 16), False, True, False, True),
        ((3, 64, 1), True, False, True, False),
        ((2, 256, 333), True, True, True, True),
    ],
)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
def test_matches_float64(shape, gated, skip, bias, softplus, dtype, tol):
    _check_against_float64(shape, gated, skip, bias, softplus, dtype, tol)


@needs_cuda
@pytest.mark.parametrize(
    "shape, segments",
    [
        ((2, 200, 333), 3),  # 21 chunks: segments of 7, the last ending mid-chunk
        ((1, 130, 100), 7),  # one chunk per segment
        ((1, 64, 40), 2),  # 3 chunks: segments of 2 and 1
    ],
)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
def test_split_in_time_matches_float64_and_the_whole_sequence(shape, segments, dtype, tol):
    """A sequence split into time segments (first pass, combine, main kernels from each
    segment's start) computes the scan of the whole sequence, forward and backward."""
    split = functools.partial(own.selective_scan, segments=segments)
    _check_against_float64(shape, True, True, True, True, dtype, tol, scan=split)
    x = _inputs(*shape, torch.float32, seed=1, gated=True, skip=True, bias=True)
    dout = torch.randn(shape, device="cuda")
    whole = _run(functools.partial(own.selective_scan, segments=1), x, dout, True)
    parts = _run(split, x, dout, True)
    for got, want in zip(
        [parts[0], parts[1], *parts[2].values()], [whole[0], whole[1], *whole[2].values()]
    ):
        assert _rel(got, want.double()) <= 2e-6


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
def test_large_grids_match_float64(dtype, tol):
    """The forward has two kernels: a channel's states split over lanes where all of that grid's
    blocks are resident at once (every shape above), else one thread per channel. More channels
    than 32 split blocks of 64 channels per SM (an SM holds at most 32 blocks) take the latter."""
    dim = 2048
    batch = 64 * 32 * torch.cuda.get_device_properties(0).multi_processor_count // dim + 1
    _check_against_float64((batch, dim, 24), True, True, True, True, dtype, tol)


def _check_against_float64(shape, gated, skip, bias, softplus, dtype, tol, scan=own.selective_scan):
    x = _inputs(*shape, dtype, seed=sum(shape), gated=gated, skip=skip, bias=bias)
    dout = torch.randn(shape, device="cuda", dtype=torch.float64)
    out, last, grads = _run(scan, x, dout, softplus)
    ref_out, ref_last, ref_grads = _run(
        selective_scan_chunked, x, dout, softplus, dtype=torch.float64
    )
    assert out.dtype == dtype and last.dtype == torch.float32
    assert _rel(out, ref_out.detach()) <= tol
    assert _rel(last, ref_last.detach()) <= tol
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == x[name].dtype and grad.shape == x[name].shape
        assert _rel(grad, ref_grads[name]) <= tol, name


@needs_cuda
@pytest.mark.parametrize(
    "choice, own_kernel", [("auto", True), ("blackmamba", True), ("mamba_ssm", False)]
)
def test_dispatch_honours_the_env_var(choice, own_kernel, monkeypatch):
    x = _inputs(2, 64, 40, torch.float32, seed=5, gated=True, skip=True, bias=True)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    leaf = x["u"].detach().requires_grad_()
    monkeypatch.setenv(own.KERNEL_ENV_VAR, choice)
    out = kernels.selective_scan(leaf, *args[1:], backend="cuda")
    assert (type(out.grad_fn).__name__ == "_SelectiveScanBackward") == own_kernel
    want = kernels.selective_scan(*args, backend="torch")
    assert _rel(out.detach(), want.double()) <= 2e-5


def _reference_scan(u, delta, A, B, C, D, z, delta_bias):
    """mamba-ssm's scan with softplus, step by step in float64, for any B/C layout it accepts:
    constant (dim, N), per step (batch, N, L) or grouped (batch, groups, N, L)."""
    u, delta, A, D, z = (t.double() for t in (u, delta, A, D, z))
    delta = torch.nn.functional.softplus(delta + delta_bias.double()[:, None])
    batch, dim, length = u.shape

    def at(M: torch.Tensor, t: int) -> torch.Tensor:  # (batch, dim, N) at step t
        M = M.double()
        if M.dim() == 2:
            return M[None].expand(batch, -1, -1)
        if M.dim() == 3:
            return M[:, None, :, t].expand(-1, dim, -1)
        return M[:, :, :, t].repeat_interleave(dim // M.shape[1], dim=1)

    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[..., t, None] * A) * h + (delta[..., t] * u[..., t])[..., None] * at(
            B, t
        )
        ys.append((h * at(C, t)).sum(-1))
    y = (torch.stack(ys, -1) + D[:, None] * u) * torch.nn.functional.silu(z)
    return y, h


@needs_cuda
@pytest.mark.parametrize(
    "case", ["constant B", "constant C", "grouped B and C", "d_state 8", "float64 u"]
)
def test_refused_layouts_run_elsewhere_and_match_float64(case, monkeypatch):
    """Each refused layout, through the public function: under auto it runs on mamba-ssm's kernel
    (or the torch backend, for float64) and matches a float64 reference; under
    BLACKMAMBA_SCAN_KERNEL=blackmamba it raises, naming the argument."""
    pytest.importorskip("mamba_ssm")
    cases = _refused_layouts("cuda")
    if case == "grouped B and C":  # mamba-ssm takes groups for both or neither
        x, named = cases["grouped B"]
        x["C"] = cases["grouped C"][0]["C"]
    else:
        x, named = cases[case]
    monkeypatch.delenv(own.KERNEL_ENV_VAR, raising=False)
    out, last = kernels.selective_scan(**x, delta_softplus=True, return_last_state=True)
    ref, ref_last = _reference_scan(
        *(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    )
    tol = 1e-12 if case == "float64 u" else 1e-4
    assert _rel(out, ref) < tol, _rel(out, ref)
    # mamba-ssm 2.3.2's returned last state for a constant B differs from the recurrence (its
    # outputs, which read every state, match): checked for every other layout.
    if case != "constant B":
        assert _rel(last, ref_last) < tol, _rel(last, ref_last)
    if case != "float64 u":  # float64 never reaches a CUDA kernel
        monkeypatch.setenv(own.KERNEL_ENV_VAR, "blackmamba")
        with pytest.raises(RuntimeError, match=named):
            kernels.selective_scan(**x, delta_softplus=True)
