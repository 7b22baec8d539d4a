"""sparse_attention and select_blocks from Python (docs/FORMATS.md, "Sparse attention").

The oracle is plain torch: a mask built explicitly from the rule (window, sinks, listed blocks, documents)
and masked softmax attention, in float64 on the CPU and in float32 on the GPU (in query chunks, so S = 16384
never holds an S x S tensor per head at once; the op itself never builds one). The CPU op is compared with it
tightly; CUDA outputs and gradients must have at most 2x the error of the same computation done by torch in
the same dtype, plus atol (FlashAttention's rule, docs/ARCHITECTURE.md). Also gradcheck in float64, opcheck,
select_blocks against a torch reference, and bad inputs."""
import math

import pytest
import torch

import anvil

ops = torch.ops.anvil  # the dispatcher ops themselves (anvil.ops holds the typed wrappers)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# ---------------------------------------------------------------------------------------------------
# The reference: the mask from the rule, then masked softmax attention.
# ---------------------------------------------------------------------------------------------------
def doc_starts(S, cu_seqlens, device):
    if cu_seqlens is None:
        return torch.zeros(S, dtype=torch.long, device=device)
    cu = cu_seqlens.long().to(device)
    d = torch.searchsorted(cu, torch.arange(S, device=device), right=True) - 1
    return cu[d]


def listed_table(block_indices, block_counts, NB, device):
    """(B, Hkv, NB, NB) bool: key block kb listed for query block qb."""
    B, H, _, n = block_indices.shape
    bi = block_indices.long().to(device)
    valid = bi >= 0
    if block_counts is not None:
        valid &= torch.arange(n, device=device) < block_counts.long().to(device)[..., None]
    table = torch.zeros(B, H, NB, NB + 1, dtype=torch.bool, device=device)
    table.scatter_(3, torch.where(valid, bi, NB), True)
    return table[..., :NB]


def build_mask(rows, S, window, sinks, bs, listed, ds):
    """(B, Hkv, R, S) bool mask of query rows `rows` (R) over all S keys."""
    i = rows[:, None]
    j = torch.arange(S, device=rows.device)[None, :]
    dsi = ds[rows][:, None]
    base = (j <= i) & (j >= dsi)
    near = (i - j < window) if window >= 0 else torch.ones_like(base)
    sink = (j - dsi) < sinks
    m = (base & (near | sink))[None, None]
    if listed is not None:
        lst = listed[:, :, (rows // bs)][..., (torch.arange(S, device=rows.device) // bs)]
        m = m | (base[None, None] & lst)
    return m


def reference(q, k, v, window=-1, sinks=0, bs=64, block_indices=None, block_counts=None, cu_seqlens=None,
              scale=None, dtype=torch.float64, chunk=1024, grad_o=None):
    """Masked attention computed in `dtype` (float64/float32 for the oracle; bf16/fp16 for torch's own
    error), query chunk by chunk -> (o, lse) and, with grad_o, (dq, dk, dv)."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D) if scale is None else scale
    dev = q.device
    NB = (S + bs - 1) // bs
    ds = doc_starts(S, cu_seqlens, dev)
    listed = listed_table(block_indices, block_counts, NB, dev) if block_indices is not None else None
    kk = k.to(dtype).detach().requires_grad_(grad_o is not None)
    vv = v.to(dtype).detach().requires_grad_(grad_o is not None)
    outs, lses, dqs = [], [], []
    for r0 in range(0, S, chunk):
        r1 = min(S, r0 + chunk)
        rows = torch.arange(r0, r1, device=dev)
        mask = build_mask(rows, S, window, sinks, bs, listed, ds)  # (B|1, Hkv|1, R, S)
        mask = mask.expand(B, Hkv, -1, -1).repeat_interleave(G, dim=1)
        qc = q[:, :, r0:r1].to(dtype).detach().requires_grad_(grad_o is not None)
        kx = kk.repeat_interleave(G, dim=1)
        vx = vv.repeat_interleave(G, dim=1)
        s = (qc @ kx.transpose(-1, -2)) * scale
        lse = torch.logsumexp(s.detach().float().masked_fill(~mask, float("-inf")), dim=-1)
        # Rows that attend nothing keep their finite scores (then times the all-false mask: o = 0, finite grads).
        empty = ~mask.any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(~mask & ~empty, float("-inf")), dim=-1) * mask
        o = p @ vx
        outs.append(o.detach())
        lses.append(lse.detach())
        if grad_o is not None:
            o.backward(grad_o[:, :, r0:r1].to(dtype))
            dqs.append(qc.grad)
    o = torch.cat(outs, 2)
    lse = torch.cat(lses, 2).float()
    if grad_o is None:
        return o, lse
    return o, lse, torch.cat(dqs, 2), kk.grad, vv.grad


def random_selection(B, Hkv, S, bs, n, g, with_counts):
    """-1 padded block lists with duplicates, future blocks and blocks before a document start mixed in."""
    NB = (S + bs - 1) // bs
    bi = torch.randint(-1, NB, (B, Hkv, NB, n), generator=g, dtype=torch.int32)
    counts = torch.randint(0, n + 1, (B, Hkv, NB), generator=g, dtype=torch.int32) if with_counts else None
    return bi, counts


def packed_cu(S, g):
    """3-5 documents of random lengths summing to S (an empty one included when S allows)."""
    cuts = sorted(torch.randint(0, S + 1, (3,), generator=g).tolist())
    return torch.tensor([0] + cuts + [S], dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------
# CPU: the op equals the formula.
# ---------------------------------------------------------------------------------------------------
CPU_CASES = [
    # S, Hq, Hkv, window, sinks, blocks, varlen, bs
    (1, 2, 1, 16, 0, False, False, 64),
    (63, 4, 1, 16, 2, True, False, 64),
    (64, 4, 4, 0, 0, True, False, 64),      # window 0: only listed blocks (rows may attend nothing)
    (65, 8, 2, 32, 3, True, False, 64),
    (200, 4, 1, 50, 0, True, True, 64),
    (300, 8, 1, 1000, 0, False, False, 128),  # window larger than S: dense causal
    (257, 2, 2, -1, 0, False, True, 64),
    (129, 4, 2, 10, 5, True, True, 128),
]


@pytest.mark.parametrize("case", CPU_CASES)
@pytest.mark.parametrize("with_counts", [False, True])
def test_cpu_forward_matches_formula(case, with_counts):
    S, Hq, Hkv, window, sinks, blocks, varlen, bs = case
    g = gen(S * 7 + Hq)
    q, k, v = (torch.randn(1, h, S, 64, generator=g) for h in (Hq, Hkv, Hkv))
    bi, bc = random_selection(1, Hkv, S, bs, 3, g, with_counts) if blocks else (None, None)
    cu = packed_cu(S, g) if varlen else None
    o, lse = ops.sparse_attention(q, k, v, bi, bc, cu, window, sinks, bs)
    ro, rlse = reference(q, k, v, window, sinks, bs, bi, bc, cu)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), ro, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(lse.double(), rlse.double(), rtol=1.3e-6, atol=1e-5)


def test_cpu_backward_matches_formula_and_gradcheck():
    g = gen(3)
    S, bs = 70, 64
    q, k, v = (torch.randn(1, h, S, 64, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    bi, bc = random_selection(1, 2, S, bs, 2, g, True)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    go = torch.randn(1, 4, S, 64, generator=g, dtype=torch.float64)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = ops.sparse_attention(qr, kr, vr, bi, bc, cu, 9, 2, bs)
    o.backward(go)
    _, _, rdq, rdk, rdv = reference(q, k, v, 9, 2, bs, bi, bc, cu, grad_o=go)
    for ours, ref in ((qr.grad, rdq), (kr.grad, rdk), (vr.grad, rdv)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # gradcheck, small: S = 20, one kv head shared by two query heads, window 5, a sink, listed blocks.
    q, k, v = (torch.randn(1, h, 20, 64, generator=g, dtype=torch.float64).requires_grad_() for h in (2, 1, 1))
    bi = torch.tensor([[[[0, -1]]]], dtype=torch.int32)
    f = lambda a, b, c: ops.sparse_attention(a, b, c, bi, None, None, 5, 1, 64)[0]
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


def test_cpu_rows_that_attend_nothing():
    q, k, v = (torch.randn(1, 1, 10, 64, generator=gen(4)) for _ in range(3))
    o, lse = ops.sparse_attention(q, k, v, None, None, None, 0, 0, 64)  # window 0, no sinks, no blocks
    assert torch.equal(o, torch.zeros_like(o)) and torch.isinf(lse).all() and (lse < 0).all()


def test_cpu_low_precision_dtypes():
    g = gen(5)
    q, k, v = (torch.randn(1, 2, 100, 128, generator=g) for _ in range(3))
    ro, _ = reference(q, k, v, 30, 2)
    for dt in (torch.bfloat16, torch.float16):
        o, lse = ops.sparse_attention(q.to(dt), k.to(dt), v.to(dt), None, None, None, 30, 2, 64)
        assert o.dtype == dt and lse.dtype == torch.float32
        torch.testing.assert_close(o.double(), ro, rtol=1.6e-2, atol=1e-2)


def test_mla_head_dims_on_cpu():
    g = gen(6)
    q, k = (torch.randn(1, 2, 50, 192, generator=g) for _ in range(2))
    v = torch.randn(1, 2, 50, 128, generator=g)
    o, _ = ops.sparse_attention(q, k, v, None, None, None, 20, 0, 64)
    ro, _ = reference(q, k, v, 20, 0)
    torch.testing.assert_close(o.double(), ro, rtol=1.3e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# select_blocks
# ---------------------------------------------------------------------------------------------------
def select_reference(q, k, bs, top_n, sink_blocks, local_blocks, cu=None):
    """The rule in float64 torch: softmax of each query over the pooled blocks it may see, summed over the
    query block and the group; forced blocks first, then scores (stable: lower index on ties)."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    NB = (S + bs - 1) // bs
    kp = torch.nn.functional.pad(k.double(), (0, 0, 0, NB * bs - S))
    held = (S - torch.arange(NB) * bs).clamp(max=bs).double()
    kbar = kp.view(B, Hkv, NB, bs, D).sum(3) / held[:, None]
    ds = doc_starts(S, cu, "cpu")
    qd = q.double().view(B, Hkv, G, S, D)
    logits = torch.einsum("bhgsd,bhnd->bhgsn", qd, kbar) / math.sqrt(D)
    rows = torch.arange(S)
    kb = torch.arange(NB)
    elig = (kb[None] <= (rows // bs)[:, None]) & ((kb[None] + 1) * bs > ds[:, None])
    p = logits.masked_fill(~elig, float("-inf")).softmax(-1).sum(2)  # (B, Hkv, S, NB)
    score = torch.nn.functional.pad(p, (0, 0, 0, NB * bs - S)).view(B, Hkv, NB, bs, NB).sum(3)
    out = torch.full((B, Hkv, NB, top_n), -1, dtype=torch.int32)
    for qb in range(NB):
        first = int(ds[qb * bs]) // bs
        cand = list(range(first, qb + 1))
        forced = [c for c in cand if c < first + sink_blocks or c > qb - local_blocks]
        for b in range(B):
            for h in range(Hkv):
                rest = sorted((c for c in cand if c not in forced), key=lambda c: (-float(score[b, h, qb, c]), c))
                chosen = sorted((forced + rest)[:top_n])
                out[b, h, qb, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("S,Hq,Hkv,bs,top_n,varlen", [(1000, 8, 2, 64, 5, False), (700, 4, 4, 128, 3, True),
                                                      (64, 2, 1, 64, 4, False), (513, 8, 1, 64, 16, True)])
def test_select_blocks_matches_reference(device, S, Hq, Hkv, bs, top_n, varlen):
    g = gen(S + top_n)
    q = torch.randn(1, Hq, S, 64, generator=g)
    k = torch.randn(1, Hkv, S, 64, generator=g)
    cu = packed_cu(S, g) if varlen else None
    ours = ops.select_blocks(q.to(device), k.to(device), bs, top_n, 1, 2, cu.to(device) if varlen else None)
    ref = select_reference(q, k, bs, top_n, 1, 2, cu)
    assert ours.dtype == torch.int32 and ours.shape == ref.shape
    assert torch.equal(ours.cpu(), ref)


def test_select_blocks_ties_go_to_the_lower_block():
    q = torch.ones(1, 2, 640, 64)
    k = torch.ones(1, 1, 640, 64)  # every block scores the same
    out = ops.select_blocks(q, k, 64, 4, 1, 1)
    # Block 9 forces {0, 9} and the two lowest others {1, 2}.
    assert out[0, 0, 9].tolist() == [0, 1, 2, 9]
    assert out[0, 0, 1].tolist() == [0, 1, -1, -1]


# ---------------------------------------------------------------------------------------------------
# opcheck, bad inputs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    g = gen(9)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(1, h, 130, 64, generator=g).to(dt).to(device).requires_grad_() for h in (4, 2, 2))
    bi, bc = random_selection(1, 2, 130, 64, 2, g, True)
    cu = torch.tensor([0, 50, 130], dtype=torch.int32)
    args = (q, k, v, bi.to(device), bc.to(device), cu.to(device), 20, 2, 64, None, False)
    torch.library.opcheck(ops.sparse_attention, args)
    torch.library.opcheck(ops.select_blocks, (q.detach(), k.detach(), 64, 2, 1, 1, None, None))


def test_bad_inputs_raise_naming_the_argument():
    q, k, v = (torch.randn(1, h, 64, 64) for h in (4, 2, 2))
    with pytest.raises(RuntimeError, match="head dim"):
        ops.sparse_attention(torch.randn(1, 4, 64, 96), torch.randn(1, 2, 64, 96), torch.randn(1, 2, 64, 96))
    with pytest.raises(RuntimeError, match="multiple of the key/value heads"):
        ops.sparse_attention(torch.randn(1, 3, 64, 64), k, v)
    with pytest.raises(RuntimeError, match="block_indices must lie in"):
        ops.sparse_attention(q, k, v, torch.full((1, 2, 1, 2), 5, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="block_indices must have shape"):
        ops.sparse_attention(q, k, v, torch.zeros((1, 2, 3, 2), dtype=torch.int32))
    with pytest.raises(RuntimeError, match="block_counts must lie in"):
        ops.sparse_attention(q, k, v, torch.zeros((1, 2, 1, 2), dtype=torch.int32), torch.full((1, 2, 1), 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0 and end at S"):
        ops.sparse_attention(q, k, v, None, None, torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="block_size must be a multiple of 64"):
        ops.sparse_attention(q, k, v, None, None, None, -1, 0, 32)
    with pytest.raises(RuntimeError, match="window must be"):
        ops.sparse_attention(q, k, v, None, None, None, -5)
    with pytest.raises(RuntimeError, match="top_n"):
        ops.select_blocks(q, k, 64, 0)
    o, lse = ops.sparse_attention(q, k, v)
    with pytest.raises(RuntimeError, match="block_indices must lie in"):
        ops.sparse_attention_backward(o, q, k, v, o, lse, torch.full((1, 2, 1, 1), 9, dtype=torch.int32), None, None,
                                      -1, 0, 64, None, False)


# ---------------------------------------------------------------------------------------------------
# CUDA against the float32 reference, bounded by torch's own same-dtype error.
# ---------------------------------------------------------------------------------------------------
def err(a, b):
    return (a.float() - b.float()).abs().max().item()


CUDA_CASES = [
    # S, Hq, Hkv, D, window, sinks, blocks(n), varlen, bs
    (1, 8, 8, 128, 256, 0, 0, False, 64),
    (63, 8, 2, 64, 16, 4, 2, False, 64),
    (64, 8, 1, 128, 32, 0, 2, False, 64),
    (65, 8, 8, 128, 1000, 0, 0, False, 64),
    (1000, 8, 2, 128, 128, 4, 4, False, 64),
    (1000, 8, 1, 64, 2000, 0, 0, True, 64),
    (1000, 8, 8, 128, 0, 0, 8, True, 128),   # 128-row query tiles with blocks
    (300, 8, 8, 128, 64, 2, 4, True, 64),    # odd group (1): 64-row tiles; even groups above: 2 heads x 64
    (4096, 8, 2, 128, 512, 1, 8, False, 64),
    (4096, 8, 1, 64, 5000, 0, 0, False, 64),
    (4096, 8, 8, 128, 300, 16, 0, True, 64),
    (16384, 8, 2, 128, 2048, 4, 8, False, 64),
    (16384, 8, 1, 128, 20000, 0, 0, False, 128),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "S{}-Hq{}-Hkv{}-D{}-w{}-s{}-n{}-{}-bs{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_against_fp32_reference(case, dtype):
    S, Hq, Hkv, D, window, sinks, n, varlen, bs = case
    if dtype == torch.float16 and S > 4096:
        pytest.skip("fp16 covered at smaller S")
    g = gen(S + n + D)
    q, k, v = (torch.randn(1, h, S, D, generator=g) for h in (Hq, Hkv, Hkv))
    go = torch.randn(1, Hq, S, D, generator=g)
    bi, bc = random_selection(1, Hkv, S, bs, n, g, True) if n else (None, None)
    cu = packed_cu(S, g) if varlen else None
    dev = "cuda"
    qd, kd, vd, god = (t.to(dev).to(dtype) for t in (q, k, v, go))
    to = lambda t: None if t is None else t.to(dev)
    kw = dict(window=window, sinks=sinks, bs=bs, block_indices=to(bi), block_counts=to(bc), cu_seqlens=to(cu))
    # The oracle in fp32 from the same rounded inputs, and torch's own error in the same dtype.
    ref = reference(qd, kd, vd, dtype=torch.float32, grad_o=god, chunk=512, **kw)
    low = reference(qd, kd, vd, dtype=dtype, grad_o=god, chunk=512, **kw)
    qr, kr, vr = (t.clone().requires_grad_() for t in (qd, kd, vd))
    o, lse = ops.sparse_attention(qr, kr, vr, to(bi), to(bc), to(cu), window, sinks, bs)
    o.backward(god)
    ours = (o, lse, qr.grad, kr.grad, vr.grad)
    names = ("o", "lse", "dq", "dk", "dv")
    atols = (1e-3, 1e-3, 2e-3, 2e-3, 2e-3)
    for name, x, r, l, atol in zip(names, ours, ref, low, atols):
        assert torch.isfinite(x).all() or name == "lse", name
        if name == "lse":  # rows that attend nothing: -inf in both
            fin = torch.isfinite(r)
            assert torch.equal(torch.isfinite(x), fin)
            x, r, l = x[fin], r[fin], l[fin]
            if x.numel() == 0:
                continue
        e, e_torch = err(x, r), err(l, r)
        assert e <= 2 * e_torch + atol, f"{name}: error {e:.3g} > 2 x torch's {e_torch:.3g} + {atol}"


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["default", "pp0", "pp3", "mma8", "mma4"])
@pytest.mark.parametrize("Hkv,n,bs", [(8, 0, 64), (2, 4, 64), (8, 4, 64), (4, 2, 128)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_forward_tile_shapes(monkeypatch, kernel, Hkv, n, bs, D, dtype):
    """Every forward kernel and tile shape within the error bound, documents and sinks included: the
    default (on sm_90 the overlapped warp-specialized wgmma kernel with ping-pong for the 128-row shapes),
    the same without ping-pong (ANVIL_SPARSE_SM90_PINGPONG=0) or with a third K stage (_KSTAGES=3), and
    the mma.sync kernel (ANVIL_SPARSE_SM90=0) as 8 warps x 16 rows or 4 warps x 32 rows (ANVIL_SPARSE_FWD_WARPS); 64 rows;
    128 rows; 2 heads x 64."""
    monkeypatch.setenv("ANVIL_SPARSE_SM90", {"mma8": "0", "mma4": "0"}.get(kernel, "1"))
    monkeypatch.setenv("ANVIL_SPARSE_SM90_PINGPONG", "0" if kernel == "pp0" else "1")
    monkeypatch.setenv("ANVIL_SPARSE_SM90_KSTAGES", "3" if kernel == "pp3" else "0")
    monkeypatch.setenv("ANVIL_SPARSE_FWD_WARPS", "4" if kernel == "mma4" else "8")
    g = gen(len(kernel) * 100 + Hkv + n + D)
    S, Hq = 777, 8
    q, k, v = (torch.randn(1, h, S, D, generator=g).cuda().to(dtype) for h in (Hq, Hkv, Hkv))
    bi, bc = random_selection(1, Hkv, S, bs, n, g, True) if n else (None, None)
    cu = torch.tensor([0, 300, 777], dtype=torch.int32).cuda()
    to = lambda t: None if t is None else t.cuda()
    kw = dict(window=100, sinks=3, bs=bs, block_indices=to(bi), block_counts=to(bc), cu_seqlens=cu)
    ro, rlse = reference(q, k, v, dtype=torch.float32, **kw)
    lo, _ = reference(q, k, v, dtype=dtype, **kw)
    o, lse = ops.sparse_attention(q, k, v, to(bi), to(bc), cu, 100, 3, bs)
    assert err(o, ro) <= 2 * err(lo, ro) + 1e-3
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin) and err(lse[fin], rlse[fin]) <= 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("S", [1, 64, 127, 128, 129, 1500])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_wgmma_forward_equals_mma_sync_forward(monkeypatch, S, D):
    """On sm_90 the wgmma forward and the mma.sync forward
    (ANVIL_SPARSE_SM90=0) agree to bf16 rounding on tiles with every mask edge (window, sinks, listed
    blocks, documents), GQA 2 heads x 64 rows and 128 rows; elsewhere every run takes the same kernel and
    this passes trivially."""
    g = gen(S + D)
    for Hkv, bs in ((2, 64), (8, 128)):
        q, k, v = (torch.randn(1, h, S, D, generator=g).cuda().to(torch.bfloat16) for h in (8, Hkv, Hkv))
        bi, bc = random_selection(1, Hkv, S, bs, 3, g, True)
        cu = packed_cu(S, g).cuda()
        args = (bi.cuda(), bc.cuda(), cu, 70, 2, bs)
        monkeypatch.setenv("ANVIL_SPARSE_SM90", "0")
        o0, l0 = ops.sparse_attention(q, k, v, *args)
        fin = torch.isfinite(l0)
        for kernel in ("1",):
            monkeypatch.setenv("ANVIL_SPARSE_SM90", kernel)
            o1, l1 = ops.sparse_attention(q, k, v, *args)
            assert torch.equal(torch.isfinite(l1), fin), (kernel, Hkv, bs)
            assert err(o1, o0) <= 2e-2, (kernel, Hkv, bs)
            assert fin.sum() == 0 or err(l1[fin], l0[fin]) <= 1e-3, (kernel, Hkv, bs)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hkv,n,bs,det", [(2, 0, 64, False), (2, 0, 64, True), (8, 4, 128, False), (4, 2, 128, True),
                                          (2, 4, 64, False)])
@pytest.mark.parametrize("keys", ["default", "64"])
def test_cuda_wgmma_backward_within_bound_and_equals_mma_sync(monkeypatch, D, dtype, Hkv, n, bs, det, keys):
    """On sm_90 the wgmma backward kernels (dq for the 128-row and 2-head shapes; dk/dv with 128 keys per CTA
    where no blocks are listed or block_size is 128, else 64 keys, or 64 everywhere with
    ANVIL_SPARSE_SM90_DKDV_KEYS=64) against the fp32 reference (2x torch's own error + atol) and against the
    mma.sync kernels (ANVIL_SPARSE_SM90_BWD=0), with window, sinks, documents, listed blocks, GQA split over
    CTAs (atomics) and deterministic (bit-identical reruns)."""
    if keys == "64":
        monkeypatch.setenv("ANVIL_SPARSE_SM90_DKDV_KEYS", "64")
    g = gen(D + Hkv + n + bs + det)
    S, Hq = 777, 8
    q, k, v, go = (torch.randn(1, h, S, D, generator=g).cuda().to(dtype) for h in (Hq, Hkv, Hkv, Hq))
    bi, bc = random_selection(1, Hkv, S, bs, n, g, True) if n else (None, None)
    cu = torch.tensor([0, 300, 777], dtype=torch.int32).cuda()
    to = lambda t: None if t is None else t.cuda()
    args = (to(bi), to(bc), cu, 100, 3, bs)
    o, lse = ops.sparse_attention(q, k, v, *args)
    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("ANVIL_SPARSE_SM90_BWD", flag)
        grads[flag] = ops.sparse_attention_backward(go, q, k, v, o, lse, *args, None, det)
    kw = dict(window=100, sinks=3, bs=bs, block_indices=to(bi), block_counts=to(bc), cu_seqlens=cu)
    _, _, rdq, rdk, rdv = reference(q, k, v, dtype=torch.float32, grad_o=go, **kw)
    _, _, ldq, ldk, ldv = reference(q, k, v, dtype=dtype, grad_o=go, **kw)
    for t, (name, r, low) in enumerate((("dq", rdq, ldq), ("dk", rdk, ldk), ("dv", rdv, ldv))):
        x_new, x_old = grads["1"][t], grads["0"][t]
        assert torch.isfinite(x_new).all(), name
        assert err(x_new, r) <= 2 * err(low, r) + 2e-3, name
        assert err(x_new, x_old) <= 2 * err(low, r) + 2e-3, name
    if det:
        again = ops.sparse_attention_backward(go, q, k, v, o, lse, *args, None, True)
        assert all(torch.equal(a, b) for a, b in zip(again, grads["1"]))


@pytest.mark.cuda
def test_cuda_matches_cpu_reference_and_is_deterministic():
    g = gen(11)
    S = 300
    q, k, v = (torch.randn(1, h, S, 64, generator=g).to(torch.bfloat16) for h in (4, 1, 1))
    bi, bc = random_selection(1, 1, S, 64, 3, g, True)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    args = (bi, bc, cu, 40, 2, 64)
    co, clse = ops.sparse_attention(q, k, v, *args)
    go = torch.randn(1, 4, S, 64, generator=g).to(torch.bfloat16)
    dargs = [a.cuda() for a in args[:3]] + list(args[3:])
    o, lse = ops.sparse_attention(q.cuda(), k.cuda(), v.cuda(), *dargs)
    torch.testing.assert_close(o.cpu().float(), co.float(), rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(lse.cpu(), clse, rtol=1e-3, atol=1e-3)
    g1 = ops.sparse_attention_backward(go.cuda(), q.cuda(), k.cuda(), v.cuda(), o, lse, *dargs, None, True)
    g2 = ops.sparse_attention_backward(go.cuda(), q.cuda(), k.cuda(), v.cuda(), o, lse, *dargs, None, True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_bad_inputs():
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        ops.sparse_attention(q.float(), k.float(), v.float())
    with pytest.raises(RuntimeError, match="block_indices must lie in"):
        ops.sparse_attention(q, k, v, torch.full((1, 2, 1, 1), 7, dtype=torch.int32, device="cuda"))
    q, k = (torch.randn(1, 2, 64, 192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with pytest.raises(RuntimeError, match="head dim"):
        ops.sparse_attention(q, k, v)
