"""The fused training ops from Python (docs/FORMATS.md, "Fused training ops"): parity with the code they replace
in transformers itself (LlamaRMSNorm, apply_rotary_pos_emb and DeepSeek's interleaved variant, LlamaMLP's
act_fn(gate) * up, torch's cross_entropy), gradcheck in float64 on the CPU, torch.library.opcheck (schemas,
FakeTensor/Meta kernels, autograd registration), bad inputs, and CUDA against the CPU."""
import pytest
import torch

import anvil

ops = torch.ops.anvil  # the dispatcher ops themselves (anvil.ops holds the typed wrappers)

FP32 = dict(rtol=1.3e-6, atol=1e-5)  # docs/ARCHITECTURE.md, numerical tolerances
BF16 = dict(rtol=1.6e-2, atol=1e-3)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


def cos_sin(b, s, d, dtype, seed=1):
    ang = torch.rand(b, s, d // 2, generator=gen(seed)) * 50
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---- parity with transformers -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_llama_rms_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(320, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(320, seed=2, scale=0.3) + 1)
    x = randn(4, 33, 320, seed=3, dtype=dtype, scale=3)
    with torch.no_grad():
        want = norm(x)
    y, rstd = ops.rms_norm(x, norm.weight.detach(), 1e-5)
    assert y.dtype == dtype and rstd.dtype == torch.float32 and rstd.shape == (4, 33)
    if dtype == torch.float32:
        torch.testing.assert_close(y, want, **FP32)
    else:
        torch.testing.assert_close(y.float(), want.float(), **BF16)
        # the same two roundings as transformers: only a last-bit rstd difference can move a value
        assert (y == want).float().mean() > 0.99


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_equals_transformers_bit_for_bit(dtype, interleaved):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    b, s, h, d = 2, 17, 4, 64
    q = randn(b, h, s, d, seed=4, dtype=dtype)  # transformers' (B, H, S, D)
    k = randn(b, 2, s, d, seed=5, dtype=dtype)
    cos, sin = cos_sin(b, s, d, dtype)
    fn = apply_rotary_pos_emb_interleave if interleaved else apply_rotary_pos_emb
    q_want, k_want = fn(q, k, cos, sin)
    q_got = ops.rope(q.transpose(1, 2), cos, sin, interleaved).transpose(1, 2)  # a strided (B, S, H, D) view in
    k_got = ops.rope(k.transpose(1, 2).contiguous(), cos, sin, interleaved).transpose(1, 2)
    assert torch.equal(q_got, q_want)
    assert torch.equal(k_got, k_want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_llama_mlp_activation(dtype):
    from transformers.activations import ACT2FN
    gate, up = randn(8, 700, seed=6, dtype=dtype, scale=4), randn(8, 700, seed=7, dtype=dtype)
    want = ACT2FN["silu"](gate) * up
    got = ops.swiglu(gate, up)
    tol = FP32 if dtype == torch.float32 else BF16
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_chunk_matches_torch(dtype):
    logits = randn(50, 3000, seed=8, dtype=dtype, scale=3)
    labels = torch.randint(0, 3000, (50,), generator=gen(9))
    labels[[0, 17]] = -100
    loss, lse = ops.cross_entropy_chunk(logits, labels, -100)
    want = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(loss, want, **FP32)
    torch.testing.assert_close(lse, torch.logsumexp(logits.float(), -1), **FP32)
    # The chunked-loss pattern: mean over the valid tokens, backward written into the logits buffer.
    n_valid = (labels != -100).sum()
    buf = logits.clone()
    ops.cross_entropy_chunk_backward(buf, labels, lse, torch.full((50,), 1.0 / n_valid.item()), -100)
    ref = logits.float().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref, labels, ignore_index=-100).backward()
    torch.testing.assert_close(buf.float(), ref.grad, **(FP32 if dtype == torch.float32 else BF16))


# ---- gradcheck in float64 ---------------------------------------------------------------------------------


def test_gradcheck_rms_norm():
    x = randn(3, 5, 12, seed=10, dtype=torch.float64).requires_grad_(True)
    w = (randn(12, seed=11, dtype=torch.float64) + 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, 1e-6)[0], (x, w))


def test_gradcheck_swiglu():
    g = randn(4, 9, seed=12, dtype=torch.float64, scale=3).requires_grad_(True)
    u = randn(4, 9, seed=13, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.swiglu, (g, u))


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_rope(interleaved):
    x = randn(2, 3, 2, 8, seed=14, dtype=torch.float64).requires_grad_(True)
    cos, sin = randn(2, 3, 8, seed=15, dtype=torch.float64), randn(2, 3, 8, seed=16, dtype=torch.float64)  # general
    assert torch.autograd.gradcheck(lambda x: ops.rope(x, cos, sin, interleaved), (x,))


def test_gradcheck_cross_entropy_chunk():
    logits = randn(5, 11, seed=17, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([1, -100, 10, 0, 3])
    assert torch.autograd.gradcheck(lambda l: ops.cross_entropy_chunk(l, labels, -100)[0], (logits,))


# ---- opcheck ----------------------------------------------------------------------------------------------


def opcheck_cases():
    x, w = randn(4, 6, 32, seed=18), randn(32, seed=19)
    y, rstd = ops.rms_norm(x, w, 1e-6)
    g, u = randn(5, 40, seed=20), randn(5, 40, seed=21)
    q = randn(2, 5, 3, 16, seed=22)
    cos, sin = cos_sin(2, 5, 16, torch.float32)
    logits, labels = randn(7, 30, seed=23), torch.tensor([1, 2, -100, 4, 5, 29, 0])
    lse = ops.cross_entropy_chunk(logits, labels, -100)[1]
    return [
        (ops.rms_norm.default, (x.clone().requires_grad_(True), w.clone().requires_grad_(True), 1e-6)),
        (ops.rms_norm_backward.default, (randn(4, 6, 32, seed=24), x, w, rstd)),
        (ops.swiglu.default, (g.clone().requires_grad_(True), u.clone().requires_grad_(True))),
        (ops.swiglu_backward.default, (randn(5, 40, seed=25), g, u)),
        (ops.rope.default, (q.clone().requires_grad_(True), cos, sin, False)),
        (ops.rope.default, (q.transpose(1, 2).contiguous().transpose(1, 2), cos, sin, True)),
        (ops.rope_backward.default, (q, cos, sin, True)),
        (ops.cross_entropy_chunk.default, (logits.clone().requires_grad_(True), labels, -100)),
        (ops.cross_entropy_chunk_backward.default, (logits.clone(), labels, lse, torch.rand(7), -100)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ---- bad inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,words", [
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.randn(7), 1e-6), ["anvil::rms_norm", "weight"]),
    (lambda: ops.swiglu(torch.randn(4, 8), torch.randn(4, 9)), ["anvil::swiglu", "up", "shape"]),
    (lambda: ops.rope(torch.randn(2, 3, 4, 8), *cos_sin(2, 4, 8, torch.float32)), ["anvil::rope", "cos", "shape"]),
    (lambda: ops.cross_entropy_chunk(torch.randn(3, 10), torch.tensor([0, 10, 1])), ["labels[1] = 10"]),
])
def test_bad_inputs_name_the_argument(call, words):
    with pytest.raises(RuntimeError) as e:
        call()
    for w in words:
        assert w in str(e.value)


# ---- CUDA against the CPU -----------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    tol = FP32 if dtype == torch.float32 else BF16
    x, w = randn(300, 2048, seed=26, dtype=dtype, scale=2), randn(2048, seed=27, dtype=dtype) + 1
    y, rstd = ops.rms_norm(x, w, 1e-6)
    yc, rstdc = ops.rms_norm(x.cuda(), w.cuda(), 1e-6)
    torch.testing.assert_close(yc.cpu().float(), y.float(), **tol)
    # rstd is an fp32 reduction over 2048 terms summed in another order: the house fp32 rule.
    torch.testing.assert_close(rstdc.cpu(), rstd, rtol=1.3e-6, atol=1e-5)
    g, u = randn(64, 5632, seed=28, dtype=dtype, scale=4), randn(64, 5632, seed=29, dtype=dtype)
    torch.testing.assert_close(ops.swiglu(g.cuda(), u.cuda()).cpu().float(), ops.swiglu(g, u).float(), **tol)
    q = randn(2, 33, 16, 128, seed=30, dtype=dtype)
    cos, sin = cos_sin(2, 33, 128, dtype)
    for inter in (False, True):
        assert torch.equal(ops.rope(q.cuda(), cos.cuda(), sin.cuda(), inter).cpu(), ops.rope(q, cos, sin, inter))
    logits = randn(40, 32000, seed=31, dtype=dtype, scale=3)
    labels = torch.randint(0, 32000, (40,), generator=gen(32))
    loss, lse = ops.cross_entropy_chunk(logits, labels)
    lossc, lsec = ops.cross_entropy_chunk(logits.cuda(), labels.cuda())
    torch.testing.assert_close(lossc.cpu(), loss, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lsec.cpu(), lse, rtol=1e-5, atol=2e-5)


@pytest.mark.cuda
def test_cuda_opcheck():
    for op, args in opcheck_cases():
        args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)


# ---- the model layer runs them ------------------------------------------------------------------------------

MODEL_SCRIPT = r"""
import sys, json, torch
sys.path.insert(0, {tests!r})
import anvil
from test_models import build_hf, tokens
out = {{}}
for case in ("qwen3", "deepseek_v3"):
    d = {tmp!r} + "/" + case
    hf = build_hf(case, d)
    model = anvil._C.CausalLM(d)
    ids = tokens(2, 9, 0)
    with torch.profiler.profile() as prof:
        logits = model.logits(ids)
    with torch.no_grad():
        ref = hf(ids).logits
    out[case] = dict(ops=sorted({{e.name for e in prof.events() if e.name.startswith("anvil::")}}),
                     err=(logits - ref).abs().max().item() / ref.abs().max().item())
print(json.dumps(out))
"""


@pytest.mark.parametrize("fused", [True, False])
def test_model_layer_uses_the_fused_ops(fused, tmp_path):
    """Qwen3 (q/k norm, half rotation) and DeepSeek-V3 (MLA, interleaved rotation, MoE experts) run anvil's
    rms_norm, rope and swiglu, unless ANVIL_FUSED_OPS=0; the logits match transformers either way."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, ANVIL_FUSED_OPS="1" if fused else "0")
    script = MODEL_SCRIPT.format(tests=os.path.dirname(__file__), tmp=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for case, r in out.items():
        used = {"anvil::rms_norm", "anvil::rope", "anvil::swiglu"} & set(r["ops"])
        assert used == ({"anvil::rms_norm", "anvil::rope", "anvil::swiglu"} if fused else set()), (case, r["ops"])
        assert r["err"] <= 1e-4, (case, r["err"])
