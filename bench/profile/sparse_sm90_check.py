"""bench/profile/sparse_sm90_check: the Hopper (wgmma) forwards of sparse_attention beside the mma.sync one.

For a few shapes (window, sinks, NSA blocks, documents, GQA; D 64/128; bf16/fp16) prints the max error of
each kernel against an fp32 torch reference and against the mma.sync kernel, the same for lse, and the
forward time of each (median of CUDA-event timings). Kernels (ANVIL_SPARSE_SM90): pp = the overlapped
warp-specialized kernel with ping-pong (the default on sm_90), pp0 = the same without ping-pong
(ANVIL_SPARSE_SM90_PINGPONG=0), pp3 = with a third K stage at D = 128 (ANVIL_SPARSE_SM90_KSTAGES=3), old =
mma.sync (=0). Shapes too
large for the reference compare against the old kernel only. Exits non-zero when an error bound fails
(2x torch's own same-dtype error + 1e-3, as the tests).

    PYTHONPATH=build-gpu/python python3 bench/profile/sparse_sm90_check.py [--quick] [--kernels ...] [--bwd]
(--bwd: the backward's wgmma dq and dk/dv kernels against the mma.sync ones instead.)
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "python"))

import anvil  # noqa: E402
from common import time_ms  # noqa: E402
from test_sparse_attention import packed_cu, random_selection, reference  # noqa: E402

ops = anvil.ops

# name, S, Hq, Hkv, D, window, sinks, n (listed blocks), varlen, bs, dtype, check against the reference
SHAPES = [
    ("win100-sinks3-gqa4-D64-bf16", 1000, 8, 2, 64, 100, 3, 0, False, 64, torch.bfloat16, True),
    ("win100-sinks3-gqa4-D128-fp16", 1000, 8, 2, 128, 100, 3, 0, False, 64, torch.float16, True),
    ("docs-blocks-bs128-D128-bf16", 3000, 8, 8, 128, 200, 2, 4, True, 128, torch.bfloat16, True),
    ("docs-blocks-bs64-2heads-D64-fp16", 3000, 8, 2, 64, 64, 2, 6, True, 64, torch.float16, True),
    ("nsa-blocks-bs64-2heads-D128-bf16", 4096, 8, 2, 128, 512, 1, 8, False, 64, torch.bfloat16, True),
    ("dense-causal-D128-bf16", 4096, 8, 8, 128, -1, 0, 0, False, 64, torch.bfloat16, True),
    ("win4096-S32768-H16-D128-bf16", 32768, 16, 16, 128, 4096, 0, 0, False, 64, torch.bfloat16, True),
    ("win4096-S32768-H16-D64-bf16", 32768, 16, 16, 64, 4096, 0, 0, False, 64, torch.bfloat16, False),
    ("nsa-top16-w512-S65536-Hq64-Hkv4-D128", 65536, 64, 4, 128, 512, 0, 16, False, 64, torch.bfloat16, False),
]


def err(a, b):
    return (a.float() - b.float()).abs().max().item()


# name -> (ANVIL_SPARSE_SM90, ANVIL_SPARSE_SM90_PINGPONG, ANVIL_SPARSE_SM90_KSTAGES)
KERNELS = {"old": ("0", "1", "0"), "pp0": ("1", "0", "0"), "pp": ("1", "1", "0"), "pp3": ("1", "1", "3")}
ENV = ("ANVIL_SPARSE_SM90", "ANVIL_SPARSE_SM90_PINGPONG", "ANVIL_SPARSE_SM90_KSTAGES")


def run(q, k, v, args, kernel):
    for name, value in zip(ENV, KERNELS[kernel]):
        os.environ[name] = value
    return ops.sparse_attention(q, k, v, *args)


def check(shape, quick):
    name, S, Hq, Hkv, D, window, sinks, n, varlen, bs, dtype, with_ref = shape
    g = torch.Generator().manual_seed(S + D + n)
    q, k, v = (torch.randn(1, h, S, D, generator=g).to(dtype).cuda() for h in (Hq, Hkv, Hkv))
    bi, bc = random_selection(1, Hkv, S, bs, n, g, True) if n else (None, None)
    if n and S >= 65536:  # NSA-style: the first block, the local block and distinct blocks before it
        NB = (S + bs - 1) // bs
        qb = torch.arange(NB).view(1, 1, NB, 1)
        bi = (torch.rand(1, Hkv, NB, n, generator=g) * (qb + 1)).floor().int()
        bi[..., 0] = 0
        bi[..., 1] = qb[..., 0]
        bc = None
    cu = packed_cu(S, g) if varlen else None
    to = lambda t: None if t is None else t.cuda()
    args = (to(bi), to(bc), to(cu), window, sinks, bs)
    outs = {}
    for kn in KERNELS:  # old first: if a new kernel hangs, the run so far is printed
        outs[kn] = run(q, k, v, args, kn)
        torch.cuda.synchronize()
    o_old, lse_old = outs["old"]
    fin = torch.isfinite(lse_old)
    ok = True
    line = f"{name:38s}"
    for kn in (x for x in KERNELS if x != "old"):
        o, lse = outs[kn]
        ok &= torch.equal(torch.isfinite(lse), fin) and bool(torch.isfinite(o).all())
        line += f" {kn}-old o {err(o, o_old):.3g} lse {err(lse[fin], lse_old[fin]) if fin.any() else 0:.3g};"
    if with_ref and not quick or (with_ref and S <= 4096):
        kw = dict(window=window, sinks=sinks, bs=bs, block_indices=to(bi), block_counts=to(bc), cu_seqlens=to(cu))
        ro, rlse = reference(q, k, v, dtype=torch.float32, chunk=512, **kw)
        lo, _ = reference(q, k, v, dtype=dtype, chunk=512, **kw)
        e_torch = err(lo, ro)
        rf = torch.isfinite(rlse)
        line += f" | vs fp32 (torch-{str(dtype)[6:]} {e_torch:.3g}):"
        for kn in KERNELS:
            o, lse = outs[kn]
            e = err(o, ro)
            el = err(lse[rf], rlse[rf]) if rf.any() else 0.0
            ok &= e <= 2 * e_torch + 1e-3 and el <= 1e-3
            line += f" {kn} {e:.3g}/lse {el:.2g}"
    times = {kn: time_ms(lambda: run(q, k, v, args, kn), warmup=3, reps=10 if quick else 20) for kn in KERNELS}
    line += " | ms " + " ".join(f"{kn} {t:.3f}" for kn, t in times.items())
    t_new = min(times.values())
    if window > 0 and n == 0 and cu is None and sinks == 0:
        w = min(window, S)
        pairs = w * (w + 1) // 2 + (S - w) * w
        line += f" (fastest {4 * pairs * Hq * D / t_new / 1e9:.0f} TFLOP/s, {times['old'] / t_new:.2f}x old)"
    print(("OK   " if ok else "FAIL ") + line, flush=True)
    return ok


BWD_SHAPES = [
    # name, S, Hq, Hkv, D, window, sinks, n, varlen, bs, dtype, check against the reference
    ("bwd-win100-sinks3-gqa4-D128-bf16", 1000, 8, 2, 128, 100, 3, 0, False, 64, torch.bfloat16, True),
    ("bwd-docs-blocks-bs128-D64-fp16", 3000, 8, 8, 64, 200, 2, 4, True, 128, torch.float16, True),
    ("bwd-dense-causal-D128-bf16", 4096, 8, 8, 128, -1, 0, 0, False, 64, torch.bfloat16, True),
    ("bwd-nsa-bs64-2heads-D128-bf16", 4096, 8, 2, 128, 512, 1, 8, False, 64, torch.bfloat16, True),
    ("bwd-win4096-S32768-H16-D128-bf16", 32768, 16, 16, 128, 4096, 0, 0, False, 64, torch.bfloat16, False),
    ("bwd-win4096-S32768-Hq16-Hkv4-D128", 32768, 16, 4, 128, 4096, 0, 0, False, 64, torch.bfloat16, False),
]


def check_bwd(shape, quick):
    """The wgmma backward kernels (ANVIL_SPARSE_SM90_BWD=1, default) against the mma.sync ones (=0): dq/dk/dv
    errors between them and against the fp32 reference, backward ms of each, and fwd + bwd ms (new fwd +
    new bwd against old fwd + old bwd)."""
    name, S, Hq, Hkv, D, window, sinks, n, varlen, bs, dtype, with_ref = shape
    g = torch.Generator().manual_seed(S + D + n + 1)
    q, k, v, go = (torch.randn(1, h, S, D, generator=g).to(dtype).cuda() for h in (Hq, Hkv, Hkv, Hq))
    bi, bc = random_selection(1, Hkv, S, bs, n, g, True) if n else (None, None)
    cu = packed_cu(S, g) if varlen else None
    to = lambda t: None if t is None else t.cuda()
    args = (to(bi), to(bc), to(cu), window, sinks, bs)
    for var, value in zip(ENV, KERNELS["pp"]):  # (not `name`: that is the shape's label)
        os.environ[var] = value
    o, lse = ops.sparse_attention(q, k, v, *args)

    def bwd(flag):
        os.environ["ANVIL_SPARSE_SM90_BWD"] = flag
        return ops.sparse_attention_backward(go, q, k, v, o, lse, *args, None, False)

    old, new = bwd("0"), bwd("1")
    torch.cuda.synchronize()
    ok = all(bool(torch.isfinite(x).all()) for x in new)
    line = f"{name:34s} new-old dq {err(new[0], old[0]):.3g} dk {err(new[1], old[1]):.3g} dv {err(new[2], old[2]):.3g};"
    if with_ref and (not quick or S <= 4096):
        kw = dict(window=window, sinks=sinks, bs=bs, block_indices=to(bi), block_counts=to(bc), cu_seqlens=to(cu))
        _, _, rdq, rdk, rdv = reference(q, k, v, dtype=torch.float32, grad_o=go, chunk=512, **kw)
        _, _, ldq, ldk, ldv = reference(q, k, v, dtype=dtype, grad_o=go, chunk=512, **kw)
        for nm, x, xo, r, lo in (("dq", new[0], old[0], rdq, ldq), ("dk", new[1], old[1], rdk, ldk),
                                 ("dv", new[2], old[2], rdv, ldv)):
            e, eo, et = err(x, r), err(xo, r), err(lo, r)
            ok &= e <= 2 * et + 2e-3
            line += f" {nm} vs fp32 new {e:.3g} old {eo:.3g} torch {et:.3g};"
    reps = 5 if quick else 10
    t_old = time_ms(lambda: bwd("0"), warmup=2, reps=reps)
    t_new = time_ms(lambda: bwd("1"), warmup=2, reps=reps)

    def fwd_bwd(fwd_flag, bwd_flag):
        os.environ["ANVIL_SPARSE_SM90"] = fwd_flag
        o2, lse2 = ops.sparse_attention(q, k, v, *args)
        os.environ["ANVIL_SPARSE_SM90_BWD"] = bwd_flag
        return ops.sparse_attention_backward(go, q, k, v, o2, lse2, *args, None, False)

    tf_old = time_ms(lambda: fwd_bwd("0", "0"), warmup=2, reps=reps)
    tf_new = time_ms(lambda: fwd_bwd("1", "1"), warmup=2, reps=reps)
    line += f" | bwd ms old {t_old:.3f} new {t_new:.3f} ({t_old / t_new:.2f}x) | fwd+bwd ms old {tf_old:.3f} new {tf_new:.3f}"
    print(("OK   " if ok else "FAIL ") + line, flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="reference only for S <= 4096")
    ap.add_argument("--kernels", default="old,pp0,pp,pp3",
                    help="which of old, pp0, pp, pp3 (old always runs)")
    ap.add_argument("--bwd", action="store_true", help="only the backward check (the wgmma dq, dk/dv kernels)")
    a = ap.parse_args()
    for kn in list(KERNELS):
        if kn != "old" and kn not in a.kernels.split(","):
            del KERNELS[kn]
    cap = torch.cuda.get_device_capability()
    print(f"device {torch.cuda.get_device_name()} sm_{cap[0]}{cap[1]} (the new kernel runs on sm_90 only)")
    good = True
    for shape in BWD_SHAPES if a.bwd else SHAPES:
        try:
            good &= check_bwd(shape, a.quick) if a.bwd else check(shape, a.quick)
        except Exception as e:  # report and go on to the next shape
            print(f"FAIL {shape[0]}: {type(e).__name__}: {e}", flush=True)
            good = False
        torch.cuda.empty_cache()
    for name in ENV:
        os.environ.pop(name, None)
    os.environ.pop("ANVIL_SPARSE_SM90_BWD", None)
    print("all OK" if good else "SOME FAILED")
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
