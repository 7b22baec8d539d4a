"""bench/train_ops: anvil's fused training ops (rms_norm, swiglu, rope, cross_entropy_chunk) beside the PyTorch
composites they replace in the model layer (transformers' formulas, eager) and torch.compile of the same
composites, forward and forward+backward, on LLM shapes: T = 8192 tokens (batch 8 x 1024), hidden 2048 / 4096,
FFN 5632 / 14336, head_dim 128, vocabulary 32000, bf16. Each line gives the bytes-roofline fraction (the
least bytes the computation must move / time, against the copy bandwidth measured in the same run).

Goal (issue 7, "fused kernels where they pay"): each fused op faster than eager and not slower than
torch.compile; the fraction of the copy roofline says how much is left.

    python3 bench/train_ops.py [--json out.json] [--tokens 8192] [--no-compile]   (scripts/gpu-bench.sh train_ops)
"""
import argparse
import math

import torch
import torch.nn.functional as F

import anvil
from common import copy_bandwidth_gbs, device_info, time_ms, write_json

ops = anvil.ops
BF16 = torch.bfloat16


# ---- the composites (what transformers runs) ---------------------------------------------------------------

def rms_norm_composite(x, w, eps=1e-6):  # LlamaRMSNorm.forward
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def swiglu_composite(g, u):  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
    return F.silu(g) * u


def rope_composite(x, cos, sin):  # apply_rotary_pos_emb on the (B, H, S, D) view of x (B, S, H, D)
    xt = x.transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    half = xt.shape[-1] // 2
    rotated = torch.cat((-xt[..., half:], xt[..., :half]), dim=-1)
    return xt * c + rotated * s


def cross_entropy_composite(logits, labels):  # LlamaForCausalLM's loss: logits upcast to fp32
    return F.cross_entropy(logits.float(), labels, ignore_index=-100)


# ---- cases ---------------------------------------------------------------------------------------------------

def fwd_bwd(fn, inputs, grad_out):
    """forward, then autograd.grad of its (first) output with respect to `inputs` given grad_out."""
    def run():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, inputs, grad_out)
    return run


def make_cases(t, compile_composites):
    cases = []
    c = torch.compile if compile_composites else None

    for h in (2048, 4096):
        x = torch.randn(t, h, device="cuda", dtype=BF16).requires_grad_(True)
        w = (torch.randn(h, device="cuda", dtype=BF16) * 0.1 + 1).requires_grad_(True)
        dy = torch.randn(t, h, device="cuda", dtype=BF16)
        comp = c(rms_norm_composite) if c else None
        nb = t * h * 2
        cases.append((f"rms_norm fwd T={t} H={h}", lambda x=x, w=w: ops.rms_norm(x, w, 1e-6),
                      lambda x=x, w=w: rms_norm_composite(x, w), (lambda x=x, w=w, comp=comp: comp(x, w)) if c else None,
                      2 * nb + t * 4))
        cases.append((f"rms_norm fwd+bwd T={t} H={h}", fwd_bwd(lambda x=x, w=w: ops.rms_norm(x, w, 1e-6), (x, w), dy),
                      fwd_bwd(lambda x=x, w=w: rms_norm_composite(x, w), (x, w), dy),
                      fwd_bwd(lambda x=x, w=w, comp=comp: comp(x, w), (x, w), dy) if c else None, 5 * nb + 2 * t * 4))

    for f in (5632, 14336):
        g = torch.randn(t, f, device="cuda", dtype=BF16).requires_grad_(True)
        u = torch.randn(t, f, device="cuda", dtype=BF16).requires_grad_(True)
        dy = torch.randn(t, f, device="cuda", dtype=BF16)
        comp = c(swiglu_composite) if c else None
        nb = t * f * 2
        cases.append((f"swiglu fwd T={t} F={f}", lambda g=g, u=u, comp=comp: ops.swiglu(g, u), lambda g=g, u=u, comp=comp: swiglu_composite(g, u),
                      (lambda g=g, u=u, comp=comp: comp(g, u)) if c else None, 3 * nb))
        cases.append((f"swiglu fwd+bwd T={t} F={f}", fwd_bwd(lambda g=g, u=u, comp=comp: ops.swiglu(g, u), (g, u), dy),
                      fwd_bwd(lambda g=g, u=u, comp=comp: swiglu_composite(g, u), (g, u), dy),
                      fwd_bwd(lambda g=g, u=u, comp=comp: comp(g, u), (g, u), dy) if c else None, 8 * nb))

    b = max(1, t // 1024)
    s = t // b
    for heads in (16, 32):
        d = 128
        x = torch.randn(b, s, heads, d, device="cuda", dtype=BF16).requires_grad_(True)
        ang = torch.rand(b, s, d // 2, device="cuda") * s
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
        dy = torch.randn(b, heads, s, d, device="cuda", dtype=BF16)
        dy_ours = dy.transpose(1, 2)  # the gradient arrives in the (B, H, S, D) layout attention uses
        comp = c(rope_composite) if c else None
        nb = b * s * heads * d * 2
        cases.append((f"rope fwd T={t} heads={heads} d={d}", lambda x=x, cos=cos, sin=sin, comp=comp: ops.rope(x, cos, sin, False),
                      lambda x=x, cos=cos, sin=sin, comp=comp: rope_composite(x, cos, sin), (lambda x=x, cos=cos, sin=sin, comp=comp: comp(x, cos, sin)) if c else None,
                      2 * nb + 2 * b * s * d * 2))
        cases.append((f"rope fwd+bwd T={t} heads={heads} d={d}",
                      fwd_bwd(lambda x=x, cos=cos, sin=sin, comp=comp: ops.rope(x, cos, sin, False).transpose(1, 2), (x,), dy),
                      fwd_bwd(lambda x=x, cos=cos, sin=sin, comp=comp: rope_composite(x, cos, sin), (x,), dy),
                      fwd_bwd(lambda x=x, cos=cos, sin=sin, comp=comp: comp(x, cos, sin), (x,), dy) if c else None, 4 * nb + 4 * b * s * d * 2))
        del dy_ours

    v = 32000
    logits = torch.randn(t, v, device="cuda", dtype=BF16) * 3
    labels = torch.randint(0, v, (t,), device="cuda")
    logits_g = logits.clone().requires_grad_(True)
    comp = c(cross_entropy_composite) if c else None
    nb = t * v * 2
    grad = torch.full((t,), 1.0 / t, device="cuda")

    def ce_ours_fwd_bwd():  # the chunked-loss pattern: forward, then the backward in place into the logits buffer
        loss, lse = ops.cross_entropy_chunk(logits, labels, -100)
        ops.cross_entropy_chunk_backward(logits, labels, lse, grad, -100)
        return loss

    cases.append((f"cross_entropy fwd T={t} V={v}", lambda: ops.cross_entropy_chunk(logits, labels, -100),
                  lambda: cross_entropy_composite(logits, labels), (lambda comp=comp: comp(logits, labels)) if c else None, nb))
    one = torch.ones((), device="cuda")
    cases.append((f"cross_entropy fwd+bwd T={t} V={v}", ce_ours_fwd_bwd,
                  fwd_bwd(lambda: cross_entropy_composite(logits_g, labels), (logits_g,), one),
                  fwd_bwd(lambda comp=comp: comp(logits_g, labels), (logits_g,), one) if c else None, 3 * nb))
    return cases


def check_agreement(t):
    """Same answers as the composites before anything is timed (bf16 tolerances)."""
    x, w = torch.randn(t, 2048, device="cuda", dtype=BF16), torch.randn(2048, device="cuda", dtype=BF16)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6)[0].float(), rms_norm_composite(x, w).float(), rtol=1.6e-2, atol=1e-3)
    g, u = torch.randn(t, 256, device="cuda", dtype=BF16) * 4, torch.randn(t, 256, device="cuda", dtype=BF16)
    torch.testing.assert_close(ops.swiglu(g, u).float(), swiglu_composite(g, u).float(), rtol=1.6e-2, atol=1e-3)
    q = torch.randn(2, 64, 4, 128, device="cuda", dtype=BF16)
    ang = torch.rand(2, 64, 64, device="cuda") * 64
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
    assert torch.equal(ops.rope(q, cos, sin, False).transpose(1, 2), rope_composite(q, cos, sin)), "rope differs"
    logits = torch.randn(64, 32000, device="cuda", dtype=BF16) * 3
    labels = torch.randint(0, 32000, (64,), device="cuda")
    torch.testing.assert_close(ops.cross_entropy_chunk(logits, labels, -100)[0].mean(), cross_entropy_composite(logits, labels),
                               rtol=1e-5, atol=1e-5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = ap.parse_args()
    info = device_info()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{info['device']}, torch {info['torch']}, {info['date']}; copy bandwidth {copy_gbs:.0f} GB/s (read+write)")
    check_agreement(256)

    results = []
    print(f"\n{'case (bf16)':<40}{'ours ms':>9}{'% roof':>8}{'eager ms':>10}{'compile ms':>12}{'vs eager':>10}"
          f"{'vs compile':>12}")
    for name, ours, eager, compiled, nbytes in make_cases(args.tokens, not args.no_compile):
        t_ours, t_eager = time_ms(ours), time_ms(eager)
        t_comp = time_ms(compiled) if compiled else float("nan")
        frac = nbytes / t_ours / 1e6 / copy_gbs
        r = {"case": name, "ours_ms": t_ours, "eager_ms": t_eager, "compile_ms": t_comp, "bytes": nbytes,
             "fraction_of_copy": frac, "speedup_vs_eager": t_eager / t_ours, "speedup_vs_compile": t_comp / t_ours}
        results.append(r)
        print(f"{name:<40}{t_ours:9.3f}{100 * frac:7.1f}%{t_eager:10.3f}{t_comp:12.3f}{t_eager / t_ours:9.2f}x"
              f"{t_comp / t_ours:11.2f}x")
    geo = lambda key: math.exp(sum(math.log(r[key]) for r in results if r[key] == r[key]) /
                               max(1, sum(1 for r in results if r[key] == r[key])))
    ratio_eager, ratio_compile = geo("speedup_vs_eager"), geo("speedup_vs_compile")
    write_json(args.json, {"bench": "train_ops", **info, "tokens": args.tokens, "copy_gbs": copy_gbs,
                           "results": results, "geomean_speedup_vs_eager": ratio_eager,
                           "geomean_speedup_vs_compile": ratio_compile})
    print(f"\nratio (geometric mean over {len(results)} cases): {ratio_eager:.2f}x eager, "
          f"{ratio_compile:.2f}x torch.compile")


if __name__ == "__main__":
    main()
