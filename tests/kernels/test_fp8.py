"""training.fp8: the e4m3 quantisation and the experts' fp8 grouped GEMMs against float64.

The GEMM is checked twice: against the float64 product of its own dequantised operands (which
it must reproduce up to fp32 accumulation and one bf16 rounding: wrong scales, layouts or groups
fail this by orders of magnitude), and against the exact product (what fp8 costs, stated).
On CPU the GEMM is the fp32 product of the e4m3 values per expert; on a Hopper GPU the same
tests run torch._scaled_grouped_mm and the Triton quantiser.
"""

from __future__ import annotations

import pytest
import torch

from megatron_blackmamba.config import ConfigError, check_job, load_config
from megatron_blackmamba.kernels import fp8
from megatron_blackmamba.kernels.grouped_gemm import gmm, refresh_fp8_weights
from megatron_blackmamba.kernels.triton_support import triton_kernels

HOPPER = fp8.fp8_blocker() is None
DEVICES = ["cpu"] + (["cuda"] if HOPPER else [])
# e4m3 keeps 3 mantissa bits: round to nearest is within 2^-4 relative for normal values; values
# under 2^-6 of the scale's range are subnormal, within 2^-10 of it absolutely.
REL, SUBNORMAL = 2.0**-4, 2.0**-10


def _sizes(groups: int, total: int, g: torch.Generator) -> torch.Tensor:
    cuts = torch.sort(torch.randint(0, total + 1, (groups - 1,), generator=g)).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).diff()


@pytest.mark.parametrize("recipe", fp8.RECIPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_quantisation_error_within_e4m3_rounding(recipe: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]).bfloat16()
    x8, scale = fp8.quantize_rows_torch(x, recipe)
    assert x8.dtype == fp8.FP8 and scale.shape == (64,) and scale.dtype == torch.float32
    back = x8.double() * scale.double()[:, None]
    bound = REL * x.double().abs() + SUBNORMAL * scale.double()[:, None] * 448 / 2**6
    assert torch.all((back - x.double()).abs() <= bound)
    # The largest magnitude of each scaled group lands on the format's maximum.
    top = x8.float().abs().amax(dim=1) if recipe == "rowwise" else x8.float().abs().amax()
    assert torch.all(top == fp8.FP8_MAX)


def test_rowwise_keeps_small_rows_that_tensorwise_flushes():
    """One token of activations 1e6 times smaller than the rest: per-tensor scaling sends it
    below e4m3's range (zeros), per-row scaling keeps it to 2^-4."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 64, generator=g)
    x[0] *= 1e-6
    for recipe, small_row_error in (("rowwise", REL), ("tensorwise", 0.99)):
        x8, scale = fp8.quantize_rows_torch(x, recipe)
        back = (x8.double() * scale.double()[:, None])[0]
        rel = (back - x[0].double()).norm() / x[0].double().norm()
        assert (rel <= small_row_error) if recipe == "rowwise" else (rel >= small_row_error)


def test_zero_rows_quantise_to_zeros_with_finite_scales():
    x8, scale = fp8.quantize_rows_torch(torch.zeros(3, 16), "rowwise")
    assert torch.count_nonzero(x8.float()) == 0 and torch.isfinite(scale).all()


@pytest.mark.skipif(not HOPPER, reason="the Triton quantiser and scaled grouped GEMM need Hopper")
@pytest.mark.parametrize("recipe", fp8.RECIPES)
@pytest.mark.parametrize("shape", [(1000, 1152), (257, 6144), (33, 100)])
def test_triton_quantiser_is_bit_identical_to_torch(recipe: str, shape: tuple[int, int]):
    kernels = triton_kernels("fp8_triton")
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 3
    x[1] = 0
    got, got_scale = kernels.quantize_rows(x, rowwise=recipe == "rowwise")
    want, want_scale = fp8.quantize_rows_torch(x, recipe)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(got_scale, want_scale)
    out = torch.empty_like(got), torch.empty_like(got_scale)
    kernels.quantize_rows(x, rowwise=recipe == "rowwise", out=out)
    assert torch.equal(out[0].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(out[1], want_scale)


def _fp8_weight(groups: int, k: int, n: int, recipe: str, device: str, g) -> torch.nn.Parameter:
    """A GroupedMLP-like [k, groups * n] bf16 weight marked for fp8, under DDP's main grads."""
    w = torch.nn.Parameter((torch.randn(k, groups * n, generator=g) * 0.05).bfloat16().to(device))
    w.wgrad_into_main_grad = True
    w.fp8_recipe, w.fp8_view = recipe, (groups, k, -1)
    w.main_grad = torch.zeros(k, groups * n, device=device)
    refresh_fp8_weights([w])
    return w


def _dequantised_grouped(a, b, sizes, recipe) -> torch.Tensor:
    """float64 product of the fp8 operands exactly as the GEMM receives them."""
    a8, sa = fp8.quantize_rows_torch(a, recipe)
    b8, sb = fp8.quantize_k_major(b.cpu() if a.is_cuda else b, recipe)
    a_q = (a8.double() * sa.double()[:, None]).cpu()
    b_q = (b8.double() * sb.double()[:, None, :]).cpu()
    rows = torch.split(a_q, sizes.tolist())
    return torch.cat([r @ b_q[e] for e, r in enumerate(rows)]), a_q, b_q


def _assert_gemm_of_operands(got: torch.Tensor, want: torch.Tensor, a_q, b_q, sizes) -> None:
    """got within one bf16 rounding of the dequantised product, plus the accumulation's error:
    Hopper's fp8 tensor cores keep ~14 bits of each partial sum before CUTLASS adds it in fp32,
    so 2^-12 of the products' magnitudes (exact fp32 sums on CPU)."""
    rows = torch.split(a_q.abs(), sizes.tolist())
    magnitude = torch.cat([r @ b_q.abs()[e] for e, r in enumerate(rows)])
    bound = 2.0**-8 * want.abs() + 2.0**-12 * magnitude + 1e-30
    assert torch.all((got.double().cpu() - want).abs() <= bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", fp8.RECIPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_grouped_gemm_forward_and_gradients(device: str, recipe: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    groups, k, n = 4, 64, 96
    sizes = _sizes(groups, 80, g)
    w = _fp8_weight(groups, k, n, recipe, device, g)
    a = torch.randn(int(sizes.sum()), k, generator=g).bfloat16().to(device).requires_grad_()
    dy = torch.randn(a.shape[0], n, generator=g).bfloat16().to(device)
    b = w.view(groups, k, n)

    out = gmm(a, b, sizes)
    out.backward(dy)

    want, a_q, b_q = _dequantised_grouped(a.detach(), b.detach(), sizes, recipe)
    _assert_gemm_of_operands(out, want, a_q, b_q, sizes)
    # The input gradient: dy's and the weight's fp8 operands, reduced over n.
    b_t = b.detach().transpose(1, 2)
    want_da, dy_q, bt_q = _dequantised_grouped(dy, b_t, sizes, recipe)
    _assert_gemm_of_operands(a.grad, want_da, dy_q, bt_q, sizes)

    # Against the exact products: what fp8 costs (normwise, ~2^-4 / sqrt(3) per operand).
    a64, b64, dy64 = a.detach().double().cpu(), b.detach().double().cpu(), dy.double().cpu()
    rows = torch.split(a64, sizes.tolist())
    exact = torch.cat([r @ b64[e] for e, r in enumerate(rows)])
    exact_da = torch.cat([d @ b64[e].t() for e, d in enumerate(torch.split(dy64, sizes.tolist()))])
    for got, ref in ((out, exact), (a.grad, exact_da)):
        assert torch.linalg.norm(got.double().cpu() - ref) <= 0.08 * torch.linalg.norm(ref)
    # The weight gradient stays bf16 operands summed in fp32: exact products.
    exact_dw = torch.stack(
        [
            x.t() @ d
            for x, d in zip(torch.split(a64, sizes.tolist()), torch.split(dy64, sizes.tolist()))
        ]
    )
    got_dw = w.main_grad.view(groups, k, n).double().cpu()
    assert torch.linalg.norm(got_dw - exact_dw) <= 1e-6 * torch.linalg.norm(exact_dw)
    assert w.grad is None


def test_fp8_weight_outside_ddp_is_refused():
    w = torch.nn.Parameter(torch.randn(8, 16))
    w.fp8_recipe = "rowwise"
    with pytest.raises(RuntimeError, match="fused_wgrad_accumulation"):
        gmm(torch.randn(4, 8, requires_grad=True), w.view(2, 8, 8), torch.tensor([1, 3]))


def test_weights_are_requantised_by_each_refresh_and_needed_before_the_first():
    """The cache follows the weight at every refresh (into the same buffers, which CUDA graphs
    read), a training forward without one is refused, and evaluation (no grad) runs bf16."""
    g = torch.Generator().manual_seed(3)
    groups, k, n = 2, 32, 16
    w = _fp8_weight(groups, k, n, "rowwise", "cpu", g)
    buffers = [t.data_ptr() for pair in w.fp8_cache for t in pair]
    sizes = torch.tensor([5, 11])
    a = torch.randn(16, k, generator=g).bfloat16().requires_grad_()
    before = gmm(a, w.view(groups, k, n), sizes).detach()
    with torch.no_grad():
        w.mul_(-2)
    stale = gmm(a, w.view(groups, k, n), sizes).detach()
    assert torch.equal(stale, before), "the weights change for the GEMMs only at a refresh"
    refresh_fp8_weights([w])
    after = gmm(a, w.view(groups, k, n), sizes).detach()
    assert [t.data_ptr() for pair in w.fp8_cache for t in pair] == buffers
    want, a_q, b_q = _dequantised_grouped(
        a.detach(), w.detach().view(groups, k, n), sizes, "rowwise"
    )
    _assert_gemm_of_operands(after, want, a_q, b_q, sizes)
    with torch.no_grad():
        assert torch.equal(
            gmm(a, w.view(groups, k, n), sizes), gmm(a, w.detach().view(groups, k, n), sizes)
        )
    del w.fp8_cache
    with pytest.raises(RuntimeError, match="refresh_fp8_weights"):
        gmm(a, w.view(groups, k, n), sizes)


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="choose one of tensorwise, rowwise"):
        fp8.quantize_rows(torch.ones(2, 2), "blockwise")


def test_config_names_what_fp8_needs():
    with pytest.raises(ConfigError) as refused:
        load_config(
            "configs/tiny.yaml",
            ["training.fp8=rowwise", "model.moe_grouped_gemm=false", "training.precision=fp32"],
        )
    assert "training.fp8=rowwise needs model.moe_grouped_gemm=true" in str(refused.value)
    assert "needs training.precision bf16 or auto" in str(refused.value)
    fine = load_config("configs/tiny.yaml", ["training.fp8=rowwise", "model.moe_grouped_gemm=true"])
    assert not check_job(fine).errors


@pytest.mark.skipif(HOPPER, reason="checks the refusal on a machine without Hopper")
def test_fp8_refused_before_training_where_it_cannot_run(capsys):
    from megatron_blackmamba.train import main

    status = main(
        [
            "--config",
            "configs/tiny.yaml",
            "training.fp8=tensorwise",
            "model.moe_grouped_gemm=true",
            "training.train_iters=1",
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "training.fp8=tensorwise:" in err and "use training.fp8=none" in err
