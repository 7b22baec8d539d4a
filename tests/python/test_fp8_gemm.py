"""The FP8 GEMM ops from Python (docs/FORMATS.md, "FP8 GEMM"): the formula written here in plain torch
(element-wise dequantization from each scale shape's meaning, fp64 matmul) for every pair of scale
granularities; grouped layouts (contiguous from moe_permute, masked); torch.library.opcheck; bad inputs
naming the rule; fp8_linear's gradient against the fp32 reference; the Fp8Linear module. Every test runs on
the CPU and, marked `cuda`, on the GPU, where it also covers the issue's shape matrix."""
import os

import pytest
import torch

import anvil

ops = torch.ops.anvil  # the dispatcher ops themselves (anvil.ops holds the typed wrappers)
E4M3 = torch.float8_e4m3fn
MAX_DIFF = 1e-3          # the issue's bound on 1 - 2 sum(xy) / sum(x^2 + y^2)
A_GRANS = ("tensor", "row", "block1x128")
B_GRANS = ("tensor", "row", "block128x128")


@pytest.fixture(autouse=True)
def strict_kernels(monkeypatch):
    """A chosen sm_90a configuration that declines a problem raises instead of running the fallback (which
    would pass these tests without testing the kernels)."""
    monkeypatch.setenv("ANVIL_FP8_GEMM_STRICT", "1")


def devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def gemm_diff(x, y):
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def expand_scale(s, rows, cols, rows_per_block):
    """Each element's scale, from the meaning of the scale's shape."""
    s = s.double()
    if s.dim() == 0 or (s.shape[1] == 1 and s.shape[0] == rows):
        return s.expand(rows, cols) if s.dim() else s.expand(rows, cols)
    return s.repeat_interleave(rows_per_block, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


def dequant(q, s, rows_per_block):
    return q.double() * expand_scale(s.cpu(), q.shape[0], q.shape[1], rows_per_block).to(q.device)


def formula(qa, sa, qb, sb, bias=None):
    out = dequant(qa, sa, 1) @ dequant(qb, sb, 128).T
    return out + bias.double() if bias is not None else out


def quantized(m, n, k, ga, gb, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device)
    w = (torch.randn(n, k, generator=g) * 0.05).to(device)
    qa, sa = ops.quantize_fp8(x, ga)
    qb, sb = ops.quantize_fp8(w, gb)
    return qa, sa, qb, sb


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("ga", A_GRANS)
@pytest.mark.parametrize("gb", B_GRANS)
def test_every_granularity_pair_matches_the_formula(device, ga, gb):
    qa, sa, qb, sb = quantized(45, 264, 384, ga, gb, device)
    bias = torch.randn(264, device=device)
    want = formula(qa, sa, qb, sb, bias)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        got = ops.fp8_gemm(qa, sa, qb, sb, dt, bias)
        assert got.dtype == dt and got.shape == (45, 264)
        assert gemm_diff(got, want) < (1e-9 if device == "cpu" and dt == torch.float32 else MAX_DIFF)


@pytest.mark.parametrize("device", devices())
def test_scaled_mm_semantics(device):
    """fp8_gemm(a, sa, b, sb) with per-tensor scales is torch._scaled_mm's a @ b.T * sa * sb (its scales are
    dequantization multipliers too); checked against _scaled_mm itself where the device has it."""
    qa, sa, qb, sb = quantized(32, 64, 128, "tensor", "tensor", device)
    ours = ops.fp8_gemm(qa, sa, qb, sb, torch.float32)
    want = (qa.double() @ qb.double().T) * sa.double() * sb.double()
    assert gemm_diff(ours, want) < 1e-9 if device == "cpu" else gemm_diff(ours, want) < MAX_DIFF
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        ref = torch._scaled_mm(qa, qb.T, scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        assert gemm_diff(ours, ref) < 1e-6


def test_bad_inputs_name_the_rule():
    qa, sa, qb, sb = quantized(4, 8, 256, "block1x128", "block128x128", "cpu")
    qa2, sa2, qb2, sb2 = quantized(4, 8, 200, "block1x128", "block128x128", "cpu")
    with pytest.raises(RuntimeError, match=r"K \(200\) must be a multiple of 128 when a or b are block-scaled"):
        ops.fp8_gemm(qa2, sa2, qb2, sb2)
    with pytest.raises(RuntimeError, match=r"a_scale for a of shape \(4, 256\) must have shape"):
        ops.fp8_gemm(qa, torch.ones(4, 3), qb, sb)
    with pytest.raises(RuntimeError, match=r"b_scale .* \(1, 2\) \(128x128 blocks"):
        ops.fp8_gemm(qa, sa, qb, torch.ones(2, 2))
    with pytest.raises(RuntimeError, match=r"a must have dtype in \{Float8_e4m3fn\}"):
        ops.fp8_gemm(qa.float(), sa, qb, sb)
    with pytest.raises(RuntimeError, match=r"out_dtype must be one of"):
        ops.fp8_gemm(qa, sa, qb, sb, torch.int32)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(N\) = \(8\)"):
        ops.fp8_gemm(qa, sa, qb, sb, torch.bfloat16, torch.ones(7))
    w = torch.randn(8, 200)
    qw, sw = ops.quantize_fp8(w, "block128x128")
    with pytest.raises(RuntimeError, match=r"fp8_linear: K \(200\) must be a multiple of 128"):
        ops.fp8_linear(torch.randn(3, 200), qw, sw)


def expert_weights(e, n, k, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    qs, ss = zip(*(ops.quantize_fp8((torch.randn(n, k, generator=g) * 0.05).to(device), "block128x128")
                   for _ in range(e)))
    return torch.stack(qs), torch.stack(ss)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("experts", [1, 8, 64])
def test_grouped_contiguous_layout_from_moe_permute(device, experts):
    """The rows moe_permute lays out (padded to align = 128, experts with no tokens included) multiplied per
    expert; padding rows and rows past offsets[E] come out zero."""
    n, k, t, top_k = 256, 256, 96, min(2, experts)
    g = torch.Generator().manual_seed(experts)
    hidden = torch.randn(t, k, generator=g).to(device)
    logits = torch.randn(t, experts, generator=g).to(device)
    logits[:, ::3] -= 100.0                                       # every third expert gets no token
    _, idx = ops.moe_gate(logits, None, None, top_k, 1, 1, "softmax", True, 1.0)
    permuted, _, counts, offsets, _ = ops.moe_permute(hidden, idx, experts, 128, -1)
    qa, sa = ops.quantize_fp8(permuted, "block1x128")
    qb, sb = expert_weights(experts, n, k, device)
    got = ops.fp8_grouped_gemm(qa, sa, qb, sb, offsets, torch.float32)
    assert got.shape == (permuted.shape[0], n)
    off = offsets.cpu().tolist()
    assert any(off[e] == off[e + 1] for e in range(experts)) or experts == 1
    want = torch.zeros(permuted.shape[0], n, dtype=torch.float64, device=device)
    for e in range(experts):
        if off[e + 1] > off[e]:
            want[off[e]:off[e + 1]] = formula(qa[off[e]:off[e + 1]], sa[off[e]:off[e + 1]], qb[e], sb[e])
    assert gemm_diff(got, want) < (1e-9 if device == "cpu" else MAX_DIFF)
    assert got[off[-1]:].abs().max().item() == 0 if off[-1] < got.shape[0] else True


@pytest.mark.parametrize("device", devices())
def test_grouped_masked_layout(device):
    e, c, n, k = 4, 16, 128, 256
    g = torch.Generator().manual_seed(3)
    qa, sa = ops.quantize_fp8(torch.randn(e, c, k, generator=g).to(device), "block1x128")
    qb, sb = expert_weights(e, n, k, device)
    valid = [16, 0, 3, 9]
    out = ops.fp8_grouped_gemm_masked(qa, sa, qb, sb, torch.tensor(valid, dtype=torch.int32, device=device),
                                      torch.float32)
    assert out.shape == (e, c, n)
    for i, v in enumerate(valid):
        if v:
            assert gemm_diff(out[i, :v], formula(qa[i, :v], sa[i, :v], qb[i], sb[i])) < (
                1e-9 if device == "cpu" else MAX_DIFF)
        if device == "cpu" and v < c:
            assert out[i, v:].abs().max().item() == 0


# opcheck's test_schema compares inputs before and after with allclose, which torch does not implement for
# float8 tensors: the other checks run, and opcheck_fp8 checks that the inputs are left untouched.
NO_SCHEMA = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def opcheck_fp8(op, args):
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(op, args, test_utils=NO_SCHEMA)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.view(torch.uint8) if a.dtype == E4M3 else a, b.view(torch.uint8) if b.dtype == E4M3 else b)


@pytest.mark.cuda
def test_opcheck_cuda():
    """The kernels that write every output row (the masked layout leaves rows past the counts unwritten on
    CUDA, so runs cannot be compared there)."""
    qa, sa, qb, sb = quantized(16, 136, 256, "block1x128", "block128x128", "cuda")
    opcheck_fp8(ops.fp8_gemm.default, (qa, sa, qb, sb, torch.bfloat16, torch.randn(136, device="cuda")))
    qb3, sb3 = expert_weights(3, 128, 256, "cuda")
    offsets = torch.tensor([0, 5, 5, 16], dtype=torch.int32, device="cuda")
    opcheck_fp8(ops.fp8_grouped_gemm.default, (qa, sa, qb3, sb3, offsets, torch.bfloat16))
    qw, sw = ops.quantize_fp8(torch.randn(64, 256, device="cuda"), "block128x128")
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    opcheck_fp8(ops.fp8_linear.default, (x, qw, sw, None))


def test_opcheck():
    qa, sa, qb, sb = quantized(16, 136, 256, "block1x128", "block128x128", "cpu")
    opcheck_fp8(ops.fp8_gemm.default, (qa, sa, qb, sb, torch.bfloat16, torch.randn(136)))
    qa2, sa2, qb2, sb2 = quantized(5, 40, 128, "row", "tensor", "cpu")
    opcheck_fp8(ops.fp8_gemm.default, (qa2, sa2, qb2, sb2, torch.float32, None))
    qb3, sb3 = expert_weights(3, 128, 256, "cpu")
    offsets = torch.tensor([0, 5, 5, 16], dtype=torch.int32)
    opcheck_fp8(ops.fp8_grouped_gemm.default, (qa, sa, qb3, sb3, offsets, torch.bfloat16))
    opcheck_fp8(ops.fp8_grouped_gemm_masked.default,
                          (qa.view(2, 8, 256), sa.view(2, 8, 2), qb3[:2], sb3[:2],
                           torch.tensor([8, 3], dtype=torch.int32), torch.float32))
    qw, sw = ops.quantize_fp8(torch.randn(64, 256), "block128x128")
    x = torch.randn(3, 256, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    opcheck_fp8(ops.fp8_linear.default, (x, qw, sw, bias))
    opcheck_fp8(ops.fp8_linear_backward.default, (torch.randn(3, 64), qw, sw))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_gradient_against_fp32_reference(device, dtype):
    """dX = dY W (W dequantized): relative error <= 1e-2 against the fp32 reference; bias gradient = sum dY."""
    n, k = 320, 512
    g = torch.Generator().manual_seed(5)
    lin = anvil.Fp8Linear.from_float((torch.randn(n, k, generator=g) * 0.05).to(device),
                                     torch.randn(n, generator=g).to(device).to(dtype)).to(device)
    x = torch.randn(2, 7, k, generator=g).to(device).to(dtype).requires_grad_(True)
    y = lin(x)
    assert y.shape == (2, 7, n) and y.dtype == dtype
    wd = ops.dequantize_fp8(lin.weight, lin.weight_scale_inv, "block128x128", torch.float32).double()
    qx, sx = ops.quantize_fp8(x.detach().reshape(-1, k), "block1x128")
    want = dequant(qx, sx, 1) @ wd.T + lin.bias.detach().double()
    assert gemm_diff(y.detach().reshape(-1, n), want) < (1e-9 if dtype == torch.float32 and device == "cpu"
                                                         else MAX_DIFF)
    gy = torch.randn(2, 7, n, generator=g).to(device).to(dtype)
    y.backward(gy)
    gx_ref = gy.double().reshape(-1, n) @ wd
    rel = ((x.grad.double().reshape(-1, k) - gx_ref).norm() / gx_ref.norm()).item()
    assert rel <= (1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(lin.bias.grad.double(), gy.double().sum((0, 1)), rtol=1e-2, atol=1e-2)
    assert set(dict(lin.named_buffers())) == {"weight", "weight_scale_inv"}


def test_meta_shapes():
    qa, sa, qb, sb = quantized(6, 256, 384, "block1x128", "block128x128", "cpu")
    m = lambda t: t.to("meta")  # noqa: E731
    out = ops.fp8_gemm(m(qa), m(sa), m(qb), m(sb), torch.float16, None)
    assert out.shape == (6, 256) and out.dtype == torch.float16 and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="a_scale"):
        ops.fp8_gemm(m(qa), m(sa[:, :1].repeat(1, 2)).narrow(0, 0, 5), m(qb), m(sb))


# ---- the issue's GPU matrix -----------------------------------------------------------------------------
ISSUE_MS = [1, 7, 64, 128, 4096, 8192]
ISSUE_NKS = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048), (14336, 4096)]
ISSUE_GRANS = [("block1x128", "block128x128"), ("row", "row"), ("tensor", "tensor")]


def gpu_reference(qa, sa, ga, qb, sb, gb):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return ops.dequantize_fp8(qa, sa, ga, torch.float32) @ ops.dequantize_fp8(qb, sb, gb, torch.float32).T
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.cuda
@pytest.mark.parametrize("nk", ISSUE_NKS, ids=lambda nk: f"N{nk[0]}K{nk[1]}")
@pytest.mark.parametrize("grans", ISSUE_GRANS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_issue_matrix_cuda(nk, grans):
    n, k = nk
    ga, gb = grans
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
    qb, sb = ops.quantize_fp8(w, gb)
    for m in ISSUE_MS:
        qa, sa = ops.quantize_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), ga)
        got = ops.fp8_gemm(qa, sa, qb, sb, torch.bfloat16)
        d = gemm_diff(got, gpu_reference(qa, sa, ga, qb, sb, gb))
        assert d < MAX_DIFF, f"M={m}: diff {d:.2e} (config '{anvil.fp8_gemm_config(m, n, k)}')"


@pytest.mark.cuda
def test_every_compiled_configuration_cuda():
    names = [c.split(":") for c in anvil.fp8_gemm_configs() if not c.startswith("grouped")]
    if not names:
        pytest.skip("no sm_90a kernels in this build")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    try:
        for name, dt in names:
            os.environ["ANVIL_FP8_GEMM_CONFIG"] = name
            for m, n, k in [(1, 2112, 7168), (300, 136, 512), (4096, 4096, 7168)]:
                for ga, gb in ISSUE_GRANS:
                    qa, sa, qb, sb = quantized(m, n, k, ga, gb, "cuda")
                    assert anvil.fp8_gemm_config(m, n, k, dtypes[dt]) == name
                    d = gemm_diff(ops.fp8_gemm(qa, sa, qb, sb, dtypes[dt]), gpu_reference(qa, sa, ga, qb, sb, gb))
                    assert d < MAX_DIFF, f"{name}:{dt} {ga}x{gb} M={m} N={n}: diff {d:.2e}"
    finally:
        os.environ.pop("ANVIL_FP8_GEMM_CONFIG", None)


@pytest.mark.cuda
def test_masked_layout_replays_in_a_cuda_graph():
    """Captured once; new counts written into the same masked_m tensor; the replay computes them (the kernel
    reads the counts on the device: no host synchronisation, nothing baked into the graph)."""
    e, c, n, k = 8, 64, 4096, 7168
    qa, sa = ops.quantize_fp8(torch.randn(e, c, k, device="cuda", dtype=torch.bfloat16), "block1x128")
    qb, sb = expert_weights(e, n, k, "cuda")
    masked = torch.tensor([64, 0, 1, 17, 0, 63, 5, 64], dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.fp8_grouped_gemm_masked(qa, sa, qb, sb, masked)     # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.fp8_grouped_gemm_masked(qa, sa, qb, sb, masked)
    for counts in ([64, 0, 1, 17, 0, 63, 5, 64], [3, 64, 0, 0, 40, 1, 64, 9]):
        masked.copy_(torch.tensor(counts, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        for i, v in enumerate(counts):
            if v:
                ref = gpu_reference(qa[i, :v], sa[i, :v], "block1x128", qb[i], sb[i], "block128x128")
                assert gemm_diff(out[i, :v], ref) < MAX_DIFF, f"expert {i}, {v} rows"


@pytest.mark.cuda
def test_scheduler_settings_and_forced_grouped_config_cuda(monkeypatch):
    """ANVIL_FP8_GEMM_SCHED: each decomposition of the decode configuration gives the reference's result;
    malformed settings raise naming the key and the rule. ANVIL_FP8_GEMM_GROUPED_CONFIG: an unknown name
    raises listing the compiled ones."""
    if not any(c.startswith("grouped") for c in anvil.fp8_gemm_configs()):
        pytest.skip("no sm_90a kernels in this build")
    qa, sa, qb, sb = quantized(5, 2112, 1024, "block1x128", "block128x128", "cuda")
    want = gpu_reference(qa, sa, "block1x128", qb, sb, "block128x128")
    for knobs in ("mode=splitk,splits=3", "mode=streamk,reduce=atomic", "mode=dp,raster=n,swizzle=2", "mode=auto"):
        monkeypatch.setenv("ANVIL_FP8_GEMM_SCHED", knobs)
        d = gemm_diff(ops.fp8_gemm(qa, sa, qb, sb), want)
        assert d < MAX_DIFF, f"{knobs}: diff {d:.2e} (config '{anvil.fp8_gemm_config(5, 2112, 1024)}')"
    for bad, rule in (("mode=fast", "mode must be auto, dp, splitk or streamk"), ("splits=0", r"outside \[1, 64\]"),
                      ("swizzle=3", "swizzle must be 1, 2, 4 or 8"), ("tile=2", "unknown key 'tile'"),
                      ("raster", "is not key=value"), ("splits=two", "is not a number")):
        monkeypatch.setenv("ANVIL_FP8_GEMM_SCHED", bad)
        with pytest.raises(RuntimeError, match=rule):
            ops.fp8_gemm(qa, sa, qb, sb)
    monkeypatch.delenv("ANVIL_FP8_GEMM_SCHED")
    qe, se = expert_weights(2, 128, 256, "cuda")
    qx, sx = ops.quantize_fp8(torch.randn(8, 256, device="cuda"), "block1x128")
    monkeypatch.setenv("ANVIL_FP8_GEMM_GROUPED_CONFIG", "no_such_config")
    with pytest.raises(RuntimeError, match="ANVIL_FP8_GEMM_GROUPED_CONFIG='no_such_config'.*compiled: grouped_"):
        ops.fp8_grouped_gemm(qx, sx, qe, se, torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda"))
