"""The INT8 GEMM op from Python (docs/FORMATS.md, "INT8 GEMM"): the formula written here in numpy (int64
products summed exactly, then the fp32 epilogue in the documented order) for every pair of scale kinds, with
and without bias, into each output dtype; edge shapes (M = 1, K not a multiple of 8, K = 0, the int8
extremes); torch.library.opcheck; bad inputs naming the argument. The CPU kernel is the reference; the tests
marked `cuda` hold the GPU paths (sm_90a CUTLASS, cuBLASLt + epilogue, SIMT) to it: bit-exact int32 sums
(scales of 1, fp32 output below 2^24), then the epilogue within rounding."""
import numpy as np
import pytest
import torch

import anvil

ops = torch.ops.anvil  # the dispatcher ops themselves (anvil.ops holds the typed wrappers)
SHAPES = [(1, 8, 16), (5, 24, 40), (17, 64, 96), (33, 40, 13), (64, 136, 256)]  # (M, N, K)


def devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def operands(m, n, k, per_row_a, per_row_b, seed=0, extremes=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    if extremes and k:
        a[0, :] = -128
        b[0, :] = -128
    sa = (torch.rand(m, 1, generator=g) + 0.1) / 127 if per_row_a else torch.tensor(0.013)
    sb = (torch.rand(n, 1, generator=g) + 0.1) / 127 if per_row_b else torch.tensor(0.021)
    return a, sa, b, sb


def formula(a, sa, b, sb, out_dtype, bias=None):
    """out = (float32(acc) * sa[m]) * sb[n] + bias[n], acc the exact integer sum, rounded once to out_dtype."""
    acc = a.cpu().numpy().astype(np.int64) @ b.cpu().numpy().astype(np.int64).T   # exact
    assert np.abs(acc).max(initial=0) < 2**31
    v = acc.astype(np.int32).astype(np.float32)
    v = v * sa.cpu().numpy().astype(np.float32).reshape(-1, 1 if sa.dim() else 1)
    v = v * (sb.cpu().numpy().astype(np.float32).reshape(1, -1) if sb.dim() else sb.cpu().numpy().astype(np.float32))
    if bias is not None:
        v = v + bias.cpu().float().numpy().reshape(1, -1)
    return torch.from_numpy(v.astype(np.float32)).to(out_dtype)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("per_row_a", [False, True])
@pytest.mark.parametrize("per_row_b", [False, True])
def test_cpu_equals_the_formula(m, n, k, per_row_a, per_row_b):
    a, sa, b, sb = operands(m, n, k, per_row_a, per_row_b, seed=m * n + k, extremes=True)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = ops.int8_gemm(a, sa, b, sb, out_dtype)
        assert got.dtype == out_dtype and got.shape == (m, n)
        assert torch.equal(got, formula(a, sa, b, sb, out_dtype))
    bias = torch.randn(n, dtype=torch.bfloat16)
    assert torch.equal(ops.int8_gemm(a, sa, b, sb, torch.float32, bias), formula(a, sa, b, sb, torch.float32, bias))
    assert ops.int8_gemm(a, sa, b, sb).dtype == torch.bfloat16  # out_dtype defaults to bf16


def test_the_largest_k_sums_exactly():
    """K = 131071 products of -128 x -128: 2^31 - 16384, exact in int32 (the op's bound)."""
    k = 131071
    a = torch.full((1, k), -128, dtype=torch.int8)
    b = torch.full((2, k), -128, dtype=torch.int8)
    b[1, 1::2] = 127
    out = ops.int8_gemm(a, torch.tensor(1.0), b, torch.tensor(1.0), torch.float32)
    want = torch.tensor([[k * 16384, (k + 1) // 2 * 16384 - k // 2 * 128 * 127]], dtype=torch.float64).float()
    assert torch.equal(out, want)


def test_empty_shapes():
    a, sa, b, sb = operands(3, 5, 0, True, True)
    bias = torch.randn(5)
    assert torch.equal(ops.int8_gemm(a, sa, b, sb, torch.float32, bias), bias.expand(3, 5))
    a, sa, b, sb = operands(0, 5, 8, False, True)
    assert ops.int8_gemm(a, sa, b, sb, torch.float32).shape == (0, 5)


def test_opcheck_cpu():
    a, sa, b, sb = operands(9, 24, 40, True, True)
    torch.library.opcheck(ops.int8_gemm.default, (a, sa, b, sb, torch.bfloat16, torch.randn(24)))
    torch.library.opcheck(ops.int8_gemm.default, (a, torch.tensor(0.5), b, torch.tensor(0.25), torch.float32, None))


@pytest.mark.parametrize("device", devices())
def test_bad_inputs_name_the_argument(device):
    a, sa, b, sb = (t.to(device) for t in operands(4, 8, 16, True, True))
    f = ops.int8_gemm
    with pytest.raises(RuntimeError, match=r"a must have dtype in \{Char\}"):
        f(a.float(), sa, b, sb)
    with pytest.raises(RuntimeError, match=r"b must have dtype in \{Char\}"):
        f(a, sa, b.to(torch.uint8), sb)
    with pytest.raises(RuntimeError, match="must share K"):
        f(a, sa, b[:, :8].contiguous(), sb)
    with pytest.raises(RuntimeError, match=r"a_scale for a must have shape \(\) \(per-tensor\) or \(4, 1\)"):
        f(a, sa[:2], b, sb)
    with pytest.raises(RuntimeError, match=r"b_scale for b must have shape \(\) \(per-tensor\) or \(8, 1\)"):
        f(a, sa, b, torch.ones(8, 2, device=device))
    with pytest.raises(RuntimeError, match=r"a_scale must have dtype in \{Float\}"):
        f(a, sa.double(), b, sb)
    with pytest.raises(RuntimeError, match="a must be contiguous"):
        f(torch.empty(16, 4, dtype=torch.int8, device=device).t(), sa, b, sb)
    with pytest.raises(RuntimeError, match="out_dtype must be one of BFloat16, Half, Float"):
        f(a, sa, b, sb, torch.float64)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(N\) = \(8\)"):
        f(a, sa, b, sb, torch.float32, torch.zeros(7, device=device))
    with pytest.raises(RuntimeError, match=r"K \(131072\) must be at most 131071"):
        f(torch.zeros(1, 131072, dtype=torch.int8, device=device), torch.tensor(1.0, device=device),
          torch.zeros(1, 131072, dtype=torch.int8, device=device), torch.tensor(1.0, device=device))


def test_meta_shapes():
    a, sa, b, sb = (t.to("meta") for t in operands(7, 24, 40, True, False))
    out = ops.int8_gemm(a, sa, b, sb, torch.float16)
    assert out.device.type == "meta" and out.shape == (7, 24) and out.dtype == torch.float16


# ---- CUDA ---------------------------------------------------------------------------------------------------

CUDA_SHAPES = [(1, 4096, 4096), (16, 11008, 4096), (17, 4096, 11008), (128, 256, 128), (4096, 4096, 4096),
               (8192, 11008, 4096), (333, 264, 40), (40, 24, 13), (64, 130, 256), (300, 136, 1040)]


def int_sum_exact_case(m, n, k, seed):
    """Operands whose int32 sums are below 2^24, so with unit scales and fp32 output the op returns them
    exactly: any path's int32 accumulation is compared bit for bit."""
    g = torch.Generator().manual_seed(seed)
    lim = max(1, min(127, int((2**24 / max(k, 1)) ** 0.5)))
    a = torch.randint(-lim, lim + 1, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-lim, lim + 1, (n, k), generator=g, dtype=torch.int8)
    return a, b


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["", "sm90", "int_mm", "simt"])
@pytest.mark.parametrize("m,n,k", CUDA_SHAPES)
def test_cuda_int32_sums_are_bit_exact(m, n, k, path, monkeypatch):
    monkeypatch.setenv("ANVIL_INT8_GEMM_PATH", path)
    if path and anvil.int8_gemm_path(m, n, k, torch.float32 if path != "sm90" else torch.bfloat16) != path:
        pytest.skip(f"path {path} does not run (M {m}, N {n}, K {k}) on this device / build")
    if path == "simt" and m * n * k > 2**34:
        pytest.skip("the SIMT path on a 7B-sized GEMM takes too long for a test")
    if path == "sm90":
        # bf16 output only: with unit scales, no bias and sums below 2^24 the kernel's epilogue is the exact
        # float of the sum rounded once to bf16, as the reference's: equal bits iff the int32 sums agree (up to
        # what bf16's rounding hides; the fp32 paths below see every bit).
        a, b = int_sum_exact_case(m, n, k, seed=k)
        one = torch.tensor(1.0)
        got = ops.int8_gemm(a.cuda(), one.cuda(), b.cuda(), one.cuda(), torch.bfloat16).cpu()
        assert torch.equal(got, ops.int8_gemm(a, one, b, one, torch.bfloat16))
        return
    a, b = int_sum_exact_case(m, n, k, seed=k)
    one = torch.tensor(1.0)
    got = ops.int8_gemm(a.cuda(), one.cuda(), b.cuda(), one.cuda(), torch.float32).cpu()
    assert torch.equal(got, ops.int8_gemm(a, one, b, one, torch.float32))


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["", "sm90", "int_mm", "simt"])
@pytest.mark.parametrize("m,n,k", CUDA_SHAPES)
def test_cuda_epilogue_matches_the_cpu(m, n, k, path, monkeypatch):
    """Full-range operands, per-token and per-channel scales, a bias: the CUDA result against the CPU reference.
    The SIMT and cuBLASLt paths round as the reference does (equal bits for fp32 out, within one ulp of the
    output dtype otherwise); the sm90 epilogue fuses the last multiply-add (one rounding less): 1 bf16 ulp."""
    monkeypatch.setenv("ANVIL_INT8_GEMM_PATH", path)
    if path == "simt" and m * n * k > 2**34:
        pytest.skip("the SIMT path on a 7B-sized GEMM takes too long for a test")
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        if path and anvil.int8_gemm_path(m, n, k, out_dtype) != path:
            continue
        a, sa, b, sb = operands(m, n, k, True, True, seed=n + k)
        bias = torch.randn(n)
        want = ops.int8_gemm(a, sa, b, sb, torch.float32, bias)
        got = ops.int8_gemm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), out_dtype, bias.cuda()).float().cpu()
        eps = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-23}[out_dtype]
        assert ((got - want).abs() <= want.abs() * eps * 1.01 + 1e-6).all(), (out_dtype, (got - want).abs().max())
        if out_dtype == torch.float32 and anvil.int8_gemm_path(m, n, k, out_dtype) != "sm90":
            assert torch.equal(got, want)


@pytest.mark.cuda
def test_opcheck_cuda():
    for m, n, k in [(64, 136, 256), (5, 24, 40)]:
        a, sa, b, sb = (t.cuda() for t in operands(m, n, k, True, True))
        torch.library.opcheck(ops.int8_gemm.default, (a, sa, b, sb, torch.bfloat16, torch.randn(n, device="cuda")))


@pytest.mark.cuda
def test_cuda_matches_torch_int_mm():
    """The anchor: torch._int_mm's int32 result with the same epilogue written in torch."""
    a, sa, b, sb = (t.cuda() for t in operands(256, 512, 1024, True, True, seed=3))
    acc = torch._int_mm(a, b.t())
    want = (acc.float() * sa) * sb.view(1, -1)
    got = ops.int8_gemm(a, sa, b, sb, torch.float32)
    assert ((got - want).abs() <= want.abs() * 2**-22 + 1e-6).all()


@pytest.mark.cuda
def test_forcing_a_path_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("ANVIL_INT8_GEMM_PATH", "int_mm")
    a, sa, b, sb = (t.cuda() for t in operands(4, 8, 16, True, True))
    with pytest.raises(RuntimeError, match="ANVIL_INT8_GEMM_PATH=int_mm cannot run"):
        ops.int8_gemm(a, sa, b, sb)
    monkeypatch.setenv("ANVIL_INT8_GEMM_PATH", "fast")
    with pytest.raises(RuntimeError, match="ANVIL_INT8_GEMM_PATH must be sm90, int_mm or simt"):
        ops.int8_gemm(a, sa, b, sb)
