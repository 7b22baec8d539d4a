"""The quantization ops from Python: torch.library.opcheck (schema, FakeTensor/Meta, autograd
registration, AOT dispatch), agreement with a formula written here in torch ops, and CUDA == CPU
bit for bit."""
import math

import pytest
import torch

import anvil

GRANULARITIES = anvil.GRANULARITIES
FORMATS = {
    "fp8": (torch.ops.anvil.quantize_fp8, torch.ops.anvil.dequantize_fp8, 448.0),
    "int8": (torch.ops.anvil.quantize_int8, torch.ops.anvil.dequantize_int8, 127.0),
}


def wide_random(shape, dtype, device="cpu"):
    """Normal values with log-normal magnitudes: many binades, so rounding is exercised everywhere.
    Clamped to the dtype's finite range (fp16 would otherwise see an inf in ~1e-7 of the values);
    non-finite input has tests of its own."""
    x = torch.randn(shape) * torch.exp(torch.randn(shape) * 2)
    top = torch.finfo(dtype).max
    return x.clamp(-top, top).to(dtype).to(device)


def reference(x, granularity, qmax, fmt):
    """Scales and q written directly in torch ops, without anvil's helpers."""
    xf = x.float()
    a = xf.abs()
    k = x.shape[-1]
    if granularity == "tensor":
        amax = a.amax()
        expand = lambda s: s.expand_as(xf)
    elif granularity == "row":
        amax = a.amax(-1, keepdim=True)
        expand = lambda s: s.expand_as(xf)
    elif granularity == "block1x128":
        pad = (-k) % 128
        p = torch.nn.functional.pad(a, (0, pad))
        amax = p.reshape(*p.shape[:-1], p.shape[-1] // 128, 128).amax(-1)
        expand = lambda s: s.repeat_interleave(128, -1)[..., :k]
    else:
        n = x.shape[0]
        p = torch.nn.functional.pad(a, (0, (-k) % 128, 0, (-n) % 128))
        amax = p.reshape(p.shape[0] // 128, 128, p.shape[1] // 128, 128).amax((1, 3))
        expand = lambda s: s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    scale = amax.clamp_min(1e-10) / qmax
    v = (xf / expand(scale)).clamp(-qmax, qmax)
    q = v.to(torch.float8_e4m3fn) if fmt == "fp8" else torch.round(v).to(torch.int8)
    return q, scale, expand


def bits(t):
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (256, 384), (3, 1000)])
def test_cpu_matches_formula(fmt, granularity, dtype, shape):
    quantize, dequantize, qmax = FORMATS[fmt]
    x = wide_random(shape, dtype)
    q, s = quantize(x, granularity)
    q_ref, s_ref, expand = reference(x, granularity, qmax, fmt)
    assert torch.equal(s, s_ref)
    assert torch.equal(bits(q), bits(q_ref))
    back = dequantize(q, s, granularity, torch.float32)
    assert torch.equal(back, q_ref.float() * expand(s_ref))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_roundtrip_bound(granularity):
    x = wide_random((200, 700), torch.float32)
    q, s = anvil.quantize_fp8(x, granularity)
    _, _, expand = reference(x, granularity, 448.0, "fp8")
    scale = expand(s)
    err = (anvil.dequantize_fp8(q, s, granularity, torch.float32) - x).abs()
    normal = x.abs() >= scale * 2**-6
    slack = 1 + 1e-5  # a value on a rounding tie is off by exactly the bound, plus fp32 rounding
    assert (err[normal] <= x.abs()[normal] * 2**-4 * slack).all()
    assert (err[~normal] <= scale[~normal] * 2**-10 * slack).all()


OPCHECK_CASES = [
    ("quantize_fp8", "block1x128"), ("quantize_fp8", "block128x128"), ("quantize_fp8", "row"),
    ("quantize_fp8", "tensor"), ("quantize_int8", "block1x128"), ("quantize_int8", "row"),
]


def devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("op,granularity", OPCHECK_CASES)
@pytest.mark.parametrize("device", devices())
def test_opcheck_quantize(op, granularity, device):
    x = wide_random((130, 260), torch.bfloat16, device)
    torch.library.opcheck(getattr(torch.ops.anvil, op), (x, granularity))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("device", devices())
def test_opcheck_dequantize(fmt, granularity, device):
    quantize, dequantize, _ = FORMATS[fmt]
    q, s = quantize(wide_random((130, 260), torch.float32, device), granularity)
    # opcheck's test_schema compares inputs before/after with allclose, which torch does not implement
    # for float8 tensors; run the other checks, and check that q and s are left untouched here.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    if fmt == "int8":
        utils = ("test_schema",) + utils
    q_before, s_before = q.clone(), s.clone()
    torch.library.opcheck(dequantize, (q, s, granularity, torch.bfloat16), test_utils=utils)
    assert torch.equal(q.view(torch.uint8), q_before.view(torch.uint8)) and torch.equal(s, s_before)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 300, 1000, dtype=torch.bfloat16)
        q, s = anvil.quantize_fp8(x, "block1x128")
        assert q.dtype == torch.float8_e4m3fn and s.shape == (4, 300, 8)
        w = torch.empty(300, 1000)
        _, sw = anvil.quantize_int8(w, "block128x128")
        assert sw.shape == (3, 8)


def test_bad_input_message_names_argument():
    with pytest.raises(RuntimeError, match=r"quantize_fp8: x must have dtype"):
        anvil.quantize_fp8(torch.ones(4, 4, dtype=torch.int32), "row")
    with pytest.raises(RuntimeError, match=r"granularity must be one of"):
        anvil.quantize_fp8(torch.ones(4, 4), "per_channel")
    q, s = anvil.quantize_fp8(torch.randn(4, 256), "block1x128")
    with pytest.raises(RuntimeError, match=r"scale_inv for granularity row"):
        anvil.dequantize_fp8(q, s, "row", torch.float32)


def test_selfcheck_table():
    table = anvil.selfcheck(cuda=False)
    assert "quantize_fp8[block1x128]" in table and "FAIL" not in table


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (0, 7168), (64, 130), (4096, 7168)])
def test_cuda_bit_exact_vs_cpu(fmt, granularity, dtype, shape):
    quantize, dequantize, _ = FORMATS[fmt]
    x = wide_random(shape, dtype)
    q, s = quantize(x, granularity)
    qc, sc = quantize(x.cuda(), granularity)
    assert torch.equal(sc.cpu(), s)
    assert torch.equal(bits(qc.cpu()), bits(q))
    for out in (torch.float32, torch.bfloat16, torch.float16):
        # exact, with NaN == NaN (NaN payload bits differ between CUDA's and c10's conversions)
        torch.testing.assert_close(dequantize(qc, sc, granularity, out).cpu(), dequantize(q, s, granularity, out),
                                   rtol=0, atol=0, equal_nan=True)
