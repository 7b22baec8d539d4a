"""The MoE routing ops from Python (docs/FORMATS.md, "MoE routing"): parity with the routers in
transformers itself (DeepSeek-V3, DeepSeek-V2, Mixtral, Qwen2-MoE, Kimi K2), agreement with the plain-torch
reference of the spec in moe_reference.py (exact indices under the tie rule, many exact ties), gradients,
permute/unpermute, load balancing, torch.library.opcheck, bad inputs, and CUDA == CPU."""
import math

import pytest
import torch

import anvil
import moe_reference as ref

ops = torch.ops.anvil  # the dispatcher ops themselves (anvil.ops holds the typed wrappers)

FP32 = dict(rtol=1.3e-6, atol=1e-5)        # docs/ARCHITECTURE.md, numerical tolerances
BF16 = dict(rtol=1.6e-2, atol=1e-3)
WEIGHTS = dict(rtol=1e-6, atol=1e-7)       # gate weights: anvil's exp is a few ulp from torch's
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def by_weight(w, idx):
    """Indices and weights of each token sorted by weight, largest first."""
    order = torch.sort(w, dim=-1, descending=True, stable=True).indices
    return idx.long().gather(1, order), w.double().gather(1, order)


def assert_same_routing(w, idx, w_ref, idx_ref):
    """Same experts per token as sets, and in the same order once sorted by weight; weights close."""
    assert idx.shape == idx_ref.shape
    assert torch.equal(idx.long().sort(-1).values, idx_ref.long().sort(-1).values), "different experts"
    i, v = by_weight(w, idx)
    i_ref, v_ref = by_weight(w_ref, idx_ref)
    assert torch.equal(i, i_ref), "same experts, different order by weight"
    torch.testing.assert_close(v, v_ref, **WEIGHTS)


# ---------------------------------------------------------------------------------------------------
# Parity with transformers 5.17.0 (the oracle): each router module is built from a config of the real
# model's routing hyper-parameters, with hidden_size = E and an identity router weight, so that its
# router_logits are exactly the logits we choose and hand to moe_gate. Rows are tie-free (every deciding
# comparison differs by > 1e-5 relative), so any faithful fp32 arithmetic routes them the same.
# ---------------------------------------------------------------------------------------------------
HF_MODELS = {
    # transformers/models/deepseek_v3/modeling_deepseek_v3.py, DeepseekV3TopkRouter (noaux_tc)
    "deepseek_v3": dict(E=256, top_k=8, n_group=8, topk_group=4, score="sigmoid", renormalize=True,
                        routed_scale=2.5, bias=True),
    # transformers/models/deepseek_v2/modeling_deepseek_v2.py, DeepseekV2TopkRouter (group_limited_greedy)
    "deepseek_v2": dict(E=160, top_k=6, n_group=8, topk_group=3, score="softmax", renormalize=False,
                        routed_scale=16.0, bias=False),
    # transformers/models/mixtral/modeling_mixtral.py, MixtralTopKRouter
    "mixtral": dict(E=8, top_k=2, n_group=1, topk_group=1, score="softmax", renormalize=True, routed_scale=1.0,
                    bias=False),
    # transformers/models/qwen2_moe/modeling_qwen2_moe.py, Qwen2MoeTopKRouter (norm_topk_prob False)
    "qwen2_moe": dict(E=60, top_k=4, n_group=1, topk_group=1, score="softmax", renormalize=False,
                      routed_scale=1.0, bias=False),
    # Kimi K2 ships as model_type deepseek_v3 (transformers/models/kimi_k25/configuration_kimi_k25.py):
    # DeepseekV3TopkRouter with one group of 384 experts
    "kimi_k2": dict(E=384, top_k=8, n_group=1, topk_group=1, score="sigmoid", renormalize=True,
                    routed_scale=2.827, bias=True),
}


def hf_router(name, bias):
    """The transformers router module for HF_MODELS[name], weight = identity, bias loaded."""
    pytest.importorskip("transformers")
    m = HF_MODELS[name]
    e = m["E"]
    if name in ("deepseek_v3", "kimi_k2"):
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
        cfg = DeepseekV3Config(n_routed_experts=e, hidden_size=e, n_group=m["n_group"], topk_group=m["topk_group"],
                               num_experts_per_tok=m["top_k"], routed_scaling_factor=m["routed_scale"],
                               norm_topk_prob=m["renormalize"])
        router = DeepseekV3TopkRouter(cfg)
        router.e_score_correction_bias.copy_(bias)
    elif name == "deepseek_v2":
        from transformers import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
        cfg = DeepseekV2Config(n_routed_experts=e, hidden_size=e, n_group=m["n_group"], topk_group=m["topk_group"],
                               num_experts_per_tok=m["top_k"], routed_scaling_factor=m["routed_scale"],
                               topk_method="group_limited_greedy")
        router = DeepseekV2TopkRouter(cfg)
    elif name == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
        router = MixtralTopKRouter(MixtralConfig(num_local_experts=e, hidden_size=e, num_experts_per_tok=m["top_k"]))
    else:
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
        router = Qwen2MoeTopKRouter(Qwen2MoeConfig(num_experts=e, hidden_size=e, num_experts_per_tok=m["top_k"],
                                                   norm_topk_prob=m["renormalize"]))
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
    return router


def hf_case(name, t, dtype, seed):
    """(logits in dtype, bias or None, router) for a tie-free parity test."""
    m = HF_MODELS[name]
    g = gen(seed)
    bias = (torch.rand(m["E"], generator=g) * 0.2 - 0.1) if m["bias"] else None
    route = dict(top_k=m["top_k"], n_group=m["n_group"], topk_group=m["topk_group"], score=m["score"], bias=bias)
    logits = ref.tie_free_logits(t, m["E"], dtype, g, 1e-5, route)
    return logits, bias, hf_router(name, bias if bias is not None else torch.zeros(m["E"]))


def anvil_gate(name, logits, bias):
    m = HF_MODELS[name]
    return ops.moe_gate(logits, bias, None, m["top_k"], m["n_group"], m["topk_group"], m["score"], m["renormalize"],
                        m["routed_scale"])


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("name", HF_MODELS)
def test_gate_matches_transformers(name, dtype):
    logits, bias, router = hf_case(name, 512, dtype, seed=1)
    with torch.no_grad():
        hf_logits, hf_w, hf_idx = router(logits.float())     # transformers on the same logits, upcast to fp32
    assert torch.equal(hf_logits, logits.float())
    w, idx = anvil_gate(name, logits, bias)
    assert w.dtype == torch.float32 and idx.dtype == torch.int32 and w.shape == (512, HF_MODELS[name]["top_k"])
    assert_same_routing(w, idx, hf_w, hf_idx)


@pytest.mark.parametrize("name", HF_MODELS)
def test_gate_gradient_matches_transformers(name):
    """d(weights)/d(logits) against autograd through the transformers router (identity weight, so the
    gradient wrt its hidden states is the gradient wrt the logits)."""
    logits, bias, router = hf_case(name, 64, torch.float32, seed=2)
    x_hf = logits.clone().requires_grad_()
    _, hf_w, hf_idx = router(x_hf)
    x = logits.clone().requires_grad_()
    w, idx = anvil_gate(name, x, bias)
    g = torch.randn(w.shape, generator=gen(3))
    dense = torch.zeros_like(logits).scatter_(1, idx.long(), g)    # the same upstream gradient per expert
    (grad_hf,) = torch.autograd.grad(hf_w, x_hf, dense.gather(1, hf_idx))
    (grad,) = torch.autograd.grad(w, x, g)
    torch.testing.assert_close(grad, grad_hf, **FP32)


def test_moe_layer_matches_transformers():
    """A whole DeepSeek-V3 routed-expert layer: moe_gate -> moe_permute -> each expert's MLP on its
    contiguous rows -> moe_unpermute, against DeepseekV3TopkRouter + DeepseekV3Experts (eager loop)."""
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts, DeepseekV3TopkRouter
    e, hidden, inter, t = 16, 32, 24, 100
    cfg = DeepseekV3Config(n_routed_experts=e, hidden_size=hidden, moe_intermediate_size=inter, n_group=4,
                           topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5, norm_topk_prob=True)
    cfg._experts_implementation = "eager"
    g = gen(4)
    router, experts = DeepseekV3TopkRouter(cfg), DeepseekV3Experts(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(e, hidden, generator=g) / math.sqrt(hidden))
        router.e_score_correction_bias.copy_(torch.rand(e, generator=g) * 0.1)
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) / math.sqrt(hidden))
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) / math.sqrt(inter))
    x = torch.randn(t, hidden, generator=g)
    with torch.no_grad():
        logits, hf_w, hf_idx = router(x)
        expected = experts(x, hf_idx, hf_w)
        w, idx = ops.moe_gate(logits, router.e_score_correction_bias, None, 4, 4, 2, "sigmoid", True, 2.5)
        assert_same_routing(w, idx, hf_w, hf_idx)
        permuted, slot_rows, counts, offsets, dropped = ops.moe_permute(x, idx, e, 8, -1)
        out = torch.zeros_like(permuted)
        for ex in range(e):
            rows = slice(int(offsets[ex]), int(offsets[ex + 1]))
            gate, up = torch.nn.functional.linear(permuted[rows], experts.gate_up_proj[ex]).chunk(2, dim=-1)
            out[rows] = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, experts.down_proj[ex])
        got = ops.moe_unpermute(out, slot_rows, w)
    assert int(dropped) == 0 and int(counts.sum()) == t * 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The spec's reference (moe_reference.gate) on logits drawn from a few discrete values: exact ties
# everywhere (within groups, between groups, at the top_k boundary), decided by the lower index.
# ---------------------------------------------------------------------------------------------------
TIE_CASES = {
    # E, top_k, n_group, topk_group, score, renormalize, routed_scale, bias, noise, skewed logits
    "v3_group_bias": (256, 8, 8, 4, "sigmoid", True, 2.5, "group", False, True),
    "v3_uniform": (256, 8, 8, 4, "sigmoid", True, 2.5, None, False, False),
    "v2_noise": (160, 6, 8, 3, "softmax", False, 16.0, "expert_int", True, True),
    "e96_groups6": (96, 16, 6, 2, "sigmoid", True, 1.0, None, False, True),
    "e1000_groups8": (1000, 16, 8, 3, "softmax", True, 1.0, None, True, False),
    "e1024_flat_noise": (1024, 16, 1, 1, "sigmoid", True, 2.827, "expert", True, True),
    "e60_flat": (60, 4, 1, 1, "softmax", False, 1.0, None, False, False),
    "e7_all": (7, 7, 1, 1, "sigmoid", False, 1.0, None, False, False),
    # softmax: dropped groups score 0.0, so they outrank kept experts whose bias made them negative
    # (FORMATS.md 3); sigmoid: dropped groups score -inf and never win
    "negative_bias_dropped_inf": (64, 8, 8, 1, "sigmoid", True, 1.0, "negative", False, False),
    "negative_bias_dropped_zero": (64, 8, 8, 1, "softmax", True, 1.0, "negative", False, False),
}
SKEWED = (6, 6, 5, 4, 3, 2, 0.3)   # the largest value rare: group top-2 and top_k boundaries vary


def tie_inputs(case, t, dtype, seed):
    e, top_k, n_group, topk_group, score, renorm, scale, bias_kind, use_noise, skewed = TIE_CASES[case]
    g = gen(seed)
    logits = ref.discrete((t, e), ref.TIE_VALUES, g, SKEWED if skewed else None).to(dtype)
    sig = torch.sigmoid(torch.tensor(ref.TIE_VALUES, dtype=torch.float64)).tolist()
    bias_values, noise_values = (0.0, 0.0625, 0.375), (0.0, 0.5)
    bias = noise = None
    if bias_kind == "group":          # constant within a group, so group scores are sums of like pairs
        bias = ref.discrete((n_group,), bias_values, g).repeat_interleave(e // n_group)
        assert ref.min_gap([p + 2 * b for p in ref.pair_sums(sig) for b in bias_values]) > 1e-4
    elif bias_kind == "expert":
        bias = ref.discrete((e,), bias_values, g)
    elif bias_kind == "expert_int":   # softmax scores < 1: integer offsets never create near-ties
        bias = ref.discrete((e,), (0.0, 1.0, 2.0), g)
    elif bias_kind == "negative":
        bias = ref.discrete((e,), (-1.0, 0.0), g)
    if use_noise:
        noise = ref.discrete((t, e), noise_values if score == "sigmoid" else (0.0, 3.0), g)
    if score == "sigmoid":
        b = bias_values if bias is not None else (0.0,)
        n = noise_values if noise is not None else (0.0,)
        assert ref.min_gap([s + x + y for s in sig for x in b for y in n]) > 1e-3
        if n_group > 1:
            assert ref.min_gap(ref.pair_sums(sig)) > 1e-3
    return logits, bias, noise, (top_k, n_group, topk_group, score, renorm, scale)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("t", [0, 1, 7, 4096])
@pytest.mark.parametrize("case", TIE_CASES)
def test_gate_matches_reference_with_ties(case, t, dtype):
    logits, bias, noise, args = tie_inputs(case, t, dtype, seed=10 + t)
    w, idx = ops.moe_gate(logits, bias, noise, *args)
    w_ref, idx_ref, c_ref = ref.gate(logits.float(), bias, noise, *args)
    assert w.shape == (t, args[0]) and w.dtype == torch.float32 and idx.dtype == torch.int32
    assert torch.equal(idx, idx_ref)                  # exactly, in order: descending score, ties to lower index
    torch.testing.assert_close(w.double(), w_ref, **WEIGHTS)
    if case == "negative_bias_dropped_zero" and t > 0:  # the case does what its name says
        assert (c_ref.gather(1, idx_ref.long()) == 0).any(-1).all()
    if case == "negative_bias_dropped_inf" and t > 0:   # sigmoid: never a dropped expert
        assert (c_ref.gather(1, idx_ref.long()) > float("-inf")).all()


def test_gate_tie_rule_by_hand():
    """Everything equal: the lowest indices, in order; groups tied: the lowest groups."""
    w, idx = ops.moe_gate(torch.zeros(3, 12), None, None, 4, 1, 1, "softmax", True, 1.0)
    assert idx.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(w, torch.full((3, 4), 0.25), rtol=1e-6, atol=0)
    # 4 groups of 3; the groups 1 and 3 tie for best, group 0 and 2 tie for second: keep groups 1 and 3...
    x = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0, 1.0, 0.0, 1.0, 0.0, 2.0, 0.0, 1.0]])
    _, idx = ops.moe_gate(x, None, None, 4, 4, 2, "sigmoid", True, 1.0)
    assert idx.tolist() == [[3, 9, 5, 11]]
    # ...and with the softmax group score (the maximum), groups 1 and 3 again; then 5 before 11
    _, idx = ops.moe_gate(x, None, None, 3, 4, 2, "softmax", True, 1.0)
    assert idx.tolist() == [[3, 9, 5]]
    # one group kept of the tied groups 1 and 3: group 1; its zero-logit expert 4 still outranks the
    # dropped experts (selection score 0.0 < sigmoid(0))
    _, idx = ops.moe_gate(x, None, None, 3, 4, 1, "sigmoid", True, 1.0)
    assert idx.tolist() == [[3, 5, 4]]


def test_gate_bias_and_noise_select_but_do_not_weigh():
    x = torch.randn(50, 32, generator=gen(5))
    bias = torch.zeros(32)
    bias[31] = 10.0
    noise = torch.zeros(50, 32)
    noise[:, 30] = 5.0
    w, idx = ops.moe_gate(x, bias, noise, 4, 1, 1, "sigmoid", False, 1.0)
    assert (idx[:, 0] == 31).all() and (idx[:, 1] == 30).all()
    torch.testing.assert_close(w.double(), torch.sigmoid(x.double()).gather(1, idx.long()), **WEIGHTS)


# ---------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------
def float64_accepted(call):
    """FORMATS.md promises fp32/bf16/fp16 logits; gradcheck in float64 where the op takes float64 too."""
    try:
        call()
        return True
    except RuntimeError:
        return False


GRAD_ROUTES = [  # top_k, n_group, topk_group, score, renormalize, routed_scale
    (4, 1, 1, "sigmoid", True, 2.5), (4, 1, 1, "sigmoid", False, 1.0), (4, 4, 2, "sigmoid", True, 1.0),
    (3, 1, 1, "softmax", True, 1.0), (3, 1, 1, "softmax", False, 16.0), (3, 4, 2, "softmax", False, 1.0),
]


def grad_logits(t, e, route, seed, margin=1e-3):
    top_k, n_group, topk_group, score = route[:4]
    return ref.tie_free_logits(t, e, torch.float32, gen(seed), margin,
                               dict(top_k=top_k, n_group=n_group, topk_group=topk_group, score=score))


@pytest.mark.parametrize("route", GRAD_ROUTES)
def test_gate_backward_matches_reference_autograd(route):
    """moe_gate_backward against float64 autograd of the reference weights for the same indices
    (dropped and unselected experts get whatever the chain rule gives them: zero for sigmoid or
    renormalized softmax, -s_e * sum_j g_j s_j through the softmax normalizer otherwise)."""
    logits = grad_logits(9, 16, route, seed=6)
    _, idx = ops.moe_gate(logits, None, None, *route)
    g = torch.randn(9, route[0], generator=gen(7))
    x64 = logits.double().requires_grad_()
    w_ref = ref.weights_from_indices(x64, idx, route[3], route[4], route[5])
    (grad_ref,) = torch.autograd.grad(w_ref, x64, g.double())
    grad = ops.moe_gate_backward(g, logits, idx, route[3], route[4], route[5])
    assert grad.shape == logits.shape
    torch.testing.assert_close(grad.double(), grad_ref, **FP32)


@pytest.mark.parametrize("route", GRAD_ROUTES)
def test_gate_autograd_calls_backward(route):
    logits = grad_logits(9, 16, route, seed=8)
    x = logits.clone().requires_grad_()
    w, idx = ops.moe_gate(x, torch.rand(16) * 0.01, None, *route)
    g = torch.randn(w.shape, generator=gen(9))
    w.backward(g)
    assert torch.equal(x.grad, ops.moe_gate_backward(g, logits, idx, route[3], route[4], route[5]))


@pytest.mark.parametrize("route", GRAD_ROUTES)
def test_gate_gradcheck(route):
    """torch.autograd.gradcheck: float64 if the op takes float64 logits, else fp32 with finite-difference
    tolerances (rows separated enough that a 1e-3 step never changes the selection)."""
    wide = float64_accepted(lambda: ops.moe_gate(torch.randn(2, 16, dtype=torch.float64), None, None, *route))
    logits = grad_logits(4, 16, route, seed=11, margin=0.05)
    f = lambda x: ops.moe_gate(x, None, None, *route)[0]
    if wide:
        assert torch.autograd.gradcheck(f, (logits.double().requires_grad_(),))
    else:
        assert torch.autograd.gradcheck(f, (logits.requires_grad_(),), eps=1e-3, atol=2e-3, rtol=2e-2)


def unpermute_inputs(dtype, seed=12):
    g = gen(seed)
    idx = ref.distinct_indices(6, 5, 3, g)
    _, slot_rows, _, _, _ = ops.moe_permute(torch.randn(6, 4), idx, 5, 4, 2)   # capacity 2: 8 or more dropped
    r = 6 * 3 + 5 * 3
    return torch.randn(r, 4, generator=g, dtype=dtype), slot_rows, torch.rand(6, 3, generator=g, dtype=dtype)


def test_unpermute_gradcheck():
    expert_out, slot_rows, w = unpermute_inputs(torch.float32)
    assert (slot_rows < 0).any()
    wide = float64_accepted(lambda: ops.moe_unpermute(expert_out.double(), slot_rows, w.double()))
    if wide:
        args = (expert_out.double().requires_grad_(), slot_rows, w.double().requires_grad_())
        assert torch.autograd.gradcheck(ops.moe_unpermute, args)
    else:
        args = (expert_out.requires_grad_(), slot_rows, w.requires_grad_())
        assert torch.autograd.gradcheck(ops.moe_unpermute, args, eps=1e-3, atol=2e-3, rtol=2e-2)
    # and against float64 autograd of the reference
    eo, ww = expert_out.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out_ref = ref.unpermute(eo, slot_rows, ww)
    go = torch.randn(out_ref.shape, generator=gen(13))
    grads_ref = torch.autograd.grad(out_ref, (eo, ww), go.double())
    eo32, w32 = expert_out.detach().requires_grad_(), w.detach().requires_grad_()
    grads = torch.autograd.grad(ops.moe_unpermute(eo32, slot_rows, w32), (eo32, w32), go)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b, **FP32)


def test_permute_gradcheck():
    idx = ref.distinct_indices(6, 5, 3, gen(14))
    wide = float64_accepted(lambda: ops.moe_permute(torch.randn(6, 4, dtype=torch.float64), idx, 5, 4, 2))
    h = torch.randn(6, 4, generator=gen(15), dtype=torch.float64 if wide else torch.float32)
    f = lambda x: ops.moe_permute(x, idx, 5, 4, 2)[0]
    if wide:
        assert torch.autograd.gradcheck(f, (h.requires_grad_(),))
    else:
        assert torch.autograd.gradcheck(f, (h.requires_grad_(),), eps=1e-3, atol=1e-3, rtol=1e-2)
    # the gradient sums a token's kept slots
    x = torch.randn(6, 4, generator=gen(16)).requires_grad_()
    permuted, slot_rows, _, _, _ = ops.moe_permute(x, idx, 5, 4, 2)
    gp = torch.randn(permuted.shape, generator=gen(17))
    (gx,) = torch.autograd.grad(permuted, x, gp)
    expected = ref.unpermute(gp, slot_rows, torch.ones(6, 3))
    torch.testing.assert_close(gx.double(), expected, **FP32)


# ---------------------------------------------------------------------------------------------------
# moe_permute / moe_unpermute
# ---------------------------------------------------------------------------------------------------
PERMUTE_CASES = [  # T, E, k, align, capacity
    (0, 8, 2, 1, -1), (0, 8, 2, 16, -1), (1, 8, 2, 1, -1), (7, 5, 3, 4, -1), (64, 16, 4, 1, 10),
    (300, 60, 4, 8, 12), (300, 60, 4, 1, 0), (4096, 256, 8, 128, -1), (4096, 256, 8, 1, 100), (2000, 7, 7, 3, 1500),
]


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("t,e,k,align,capacity", PERMUTE_CASES)
def test_permute_matches_reference(t, e, k, align, capacity, dtype):
    g = gen(20 + t)
    hidden = torch.randn(t, 24, generator=g).to(dtype)
    idx = ref.distinct_indices(t, e, k, g)
    got = ops.moe_permute(hidden, idx, e, align, capacity)
    want = ref.permute(hidden, idx, e, align, capacity)
    names = ("permuted", "slot_rows", "counts", "offsets", "dropped")
    assert got[0].shape == (t * k + e * (align - 1), 24) and got[0].dtype == dtype
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name


def test_permute_empty_experts():
    """Only even experts are used: odd experts get count 0 and an empty block."""
    g = gen(21)
    idx = (ref.distinct_indices(50, 8, 3, g) * 2).to(torch.int32)
    hidden = torch.randn(50, 8, generator=g)
    got = ops.moe_permute(hidden, idx, 16, 4, -1)
    for a, b in zip(got, ref.permute(hidden, idx, 16, 4, -1)):
        assert torch.equal(a, b)
    counts, offsets = got[2], got[3]
    assert (counts[1::2] == 0).all() and torch.equal(offsets[2::2], offsets[1:-1:2])
    assert (offsets % 4 == 0).all()


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("t,e,k,align,capacity", PERMUTE_CASES)
def test_unpermute_matches_reference(t, e, k, align, capacity, dtype):
    g = gen(30 + t)
    idx = ref.distinct_indices(t, e, k, g)
    _, slot_rows, _, offsets, _ = ops.moe_permute(torch.zeros(t, 1, dtype=dtype), idx, e, align, capacity)
    expert_out = torch.randn(t * k + e * (align - 1), 40, generator=g).to(dtype)
    w = torch.rand(t, k, generator=g)
    out = ops.moe_unpermute(expert_out, slot_rows, w)
    assert out.shape == (t, 40) and out.dtype == dtype
    tol = FP32 if dtype == torch.float32 else BF16
    torch.testing.assert_close(out.double(), ref.unpermute(expert_out, slot_rows, w), **tol)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("align", [1, 64])
def test_unpermute_inverts_permute(dtype, align):
    """Weights summing to 1: unpermute(permute(x)) == x (exactly in bf16/fp16, where the fp32 sum rounds
    back to x)."""
    g = gen(40)
    x = torch.randn(333, 96, generator=g).to(dtype)
    idx = ref.distinct_indices(333, 40, 6, g)
    w = torch.softmax(torch.randn(333, 6, generator=g), -1)
    permuted, slot_rows, counts, offsets, dropped = ops.moe_permute(x, idx, 40, align, -1)
    assert int(dropped) == 0 and int(counts.sum()) == 333 * 6
    back = ops.moe_unpermute(permuted, slot_rows, w)
    if dtype == torch.float32:
        torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(back, x)


# ---------------------------------------------------------------------------------------------------
# Load balancing
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t,e,k", [(0, 8, 2), (1, 8, 2), (4096, 256, 8), (1000, 1024, 16), (77, 7, 7)])
def test_expert_load_is_bincount(t, e, k):
    idx = ref.distinct_indices(t, e, k, gen(50))
    counts = ops.moe_expert_load(idx, e)
    assert counts.dtype == torch.int32 and counts.shape == (e,)
    assert torch.equal(counts, torch.bincount(idx.flatten().long(), minlength=e).to(torch.int32))


def update_bias_reference(bias, counts, gamma):
    c = counts.double()
    return bias + (gamma * torch.sign(c.mean() - c)).float()


@pytest.mark.parametrize("device", devices())
def test_update_bias_in_place(device):
    bias = torch.randn(6, generator=gen(51)).to(device)
    counts = torch.tensor([4, 4, 2, 6, 7, 1], dtype=torch.int32, device=device)   # mean 4: two signs are 0
    expected = update_bias_reference(bias, counts, 1e-3)
    ptr = bias.data_ptr()
    assert ops.moe_update_bias(bias, counts, 1e-3) is None
    assert bias.data_ptr() == ptr
    torch.testing.assert_close(bias, expected, rtol=1.3e-6, atol=1e-8)
    # from a real load
    idx = ref.distinct_indices(4096, 256, 8, gen(52)).to(device)
    counts = ops.moe_expert_load(idx, 256)
    bias = torch.randn(256, generator=gen(53)).to(device) * 0.01
    expected = update_bias_reference(bias, counts, 0.001)
    ops.moe_update_bias(bias, counts, 0.001)
    torch.testing.assert_close(bias, expected, rtol=1.3e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------
# opcheck: schema, FakeTensor/Meta, autograd registration, AOT dispatch
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_opcheck_gate(device, dtype):
    g = gen(60)
    logits = torch.randn(33, 64, generator=g).to(dtype).to(device).requires_grad_()
    bias = (torch.rand(64, generator=g) * 0.1).to(device)
    noise = (torch.rand(33, 64, generator=g) * 0.01).to(device)
    torch.library.opcheck(ops.moe_gate, (logits, bias, noise, 6, 8, 3, "sigmoid", True, 2.5))
    torch.library.opcheck(ops.moe_gate, (logits, None, None, 4, 1, 1, "softmax", False, 1.0))


@pytest.mark.parametrize("device", devices())
def test_opcheck_gate_backward(device):
    logits = torch.randn(33, 64, generator=gen(61)).to(device)
    _, idx = ops.moe_gate(logits, None, None, 6, 8, 3, "sigmoid", True, 2.5)
    gw = torch.randn(33, 6, generator=gen(62)).to(device)
    torch.library.opcheck(ops.moe_gate_backward, (gw, logits, idx, "sigmoid", True, 2.5))
    torch.library.opcheck(ops.moe_gate_backward, (gw, logits, idx, "softmax", False, 1.0))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_opcheck_permute_unpermute(device, dtype):
    g = gen(63)
    idx = ref.distinct_indices(40, 12, 3, g).to(device)
    hidden = torch.randn(40, 16, generator=g).to(dtype).to(device).requires_grad_()
    torch.library.opcheck(ops.moe_permute, (hidden, idx, 12, 8, -1))
    torch.library.opcheck(ops.moe_permute, (hidden, idx, 12, 1, 5))
    _, slot_rows, _, _, _ = ops.moe_permute(hidden.detach(), idx, 12, 8, 5)
    expert_out = torch.randn(40 * 3 + 12 * 7, 16, generator=g).to(dtype).to(device).requires_grad_()
    w = torch.rand(40, 3, generator=g).to(device).requires_grad_()
    torch.library.opcheck(ops.moe_unpermute, (expert_out, slot_rows, w))


@pytest.mark.parametrize("device", devices())
def test_opcheck_load_balancing(device):
    idx = ref.distinct_indices(40, 12, 3, gen(64)).to(device)
    torch.library.opcheck(ops.moe_expert_load, (idx, 12))
    counts = ops.moe_expert_load(idx, 12)
    torch.library.opcheck(ops.moe_update_bias, (torch.zeros(12, device=device), counts, 0.01))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(4096, 256, dtype=torch.bfloat16)
        w, idx = ops.moe_gate(logits, torch.empty(256), None, 8, 8, 4, "sigmoid", True, 2.5)
        assert w.shape == (4096, 8) and w.dtype == torch.float32 and idx.dtype == torch.int32
        hidden = torch.empty(4096, 7168, dtype=torch.bfloat16)
        permuted, slot_rows, counts, offsets, dropped = ops.moe_permute(hidden, idx, 256, 128, -1)
        assert permuted.shape == (4096 * 8 + 256 * 127, 7168) and permuted.dtype == torch.bfloat16
        assert slot_rows.shape == (4096, 8) and counts.shape == (256,) and offsets.shape == (257,)
        assert dropped.shape == () and slot_rows.dtype == counts.dtype == offsets.dtype == dropped.dtype == torch.int32
        out = ops.moe_unpermute(permuted, slot_rows, w)
        assert out.shape == (4096, 7168) and out.dtype == torch.bfloat16
        assert ops.moe_expert_load(idx, 256).shape == (256,)


# ---------------------------------------------------------------------------------------------------
# Bad inputs: RuntimeError (c10::Error) naming the argument and the rule
# ---------------------------------------------------------------------------------------------------
def test_gate_bad_inputs():
    x = torch.randn(4, 64)
    gate = lambda *a, **kw: ops.moe_gate(*a, **kw)
    with pytest.raises(RuntimeError, match=r"n_group"):            # 64 experts do not split into 6 groups
        gate(x, None, None, 4, 6, 2, "sigmoid", True, 1.0)
    with pytest.raises(RuntimeError, match=r"top_k"):              # 2 of 8 groups keep 16 experts, not 17
        gate(x, None, None, 17, 8, 2, "sigmoid", True, 1.0)
    with pytest.raises(RuntimeError, match=r"top_k"):              # more than E
        gate(x, None, None, 65, 1, 1, "softmax", True, 1.0)
    with pytest.raises(RuntimeError, match=r"top_k"):
        gate(x, None, None, 0, 1, 1, "softmax", True, 1.0)
    with pytest.raises(RuntimeError, match=r"topk_group"):         # keeps 9 of 8 groups
        gate(x, None, None, 4, 8, 9, "sigmoid", True, 1.0)
    with pytest.raises(RuntimeError, match=r"score"):
        gate(x, None, None, 4, 1, 1, "relu", True, 1.0)
    with pytest.raises(RuntimeError, match=r"logits"):             # integer logits
        gate(torch.ones(4, 64, dtype=torch.int32), None, None, 4, 1, 1, "softmax", True, 1.0)
    with pytest.raises(RuntimeError, match=r"logits"):             # rank 1
        gate(torch.randn(64), None, None, 4, 1, 1, "softmax", True, 1.0)
    with pytest.raises(RuntimeError, match=r"logits"):             # rank 3
        gate(torch.randn(2, 4, 64), None, None, 4, 1, 1, "softmax", True, 1.0)
    with pytest.raises(RuntimeError, match=r"bias"):               # wrong length
        gate(x, torch.zeros(63), None, 4, 1, 1, "sigmoid", True, 1.0)
    with pytest.raises(RuntimeError, match=r"bias"):               # not fp32
        gate(x, torch.zeros(64, dtype=torch.bfloat16), None, 4, 1, 1, "sigmoid", True, 1.0)
    with pytest.raises(RuntimeError, match=r"noise"):              # wrong shape
        gate(x, None, torch.zeros(4, 63), 4, 1, 1, "sigmoid", True, 1.0)
    with pytest.raises(RuntimeError, match=r"noise"):              # not fp32
        gate(x, None, torch.zeros(4, 64, dtype=torch.float16), 4, 1, 1, "sigmoid", True, 1.0)


def test_gate_backward_bad_inputs():
    x = torch.randn(4, 64)
    _, idx = ops.moe_gate(x, None, None, 4, 1, 1, "softmax", True, 1.0)
    with pytest.raises(RuntimeError, match=r"grad_weights"):
        ops.moe_gate_backward(torch.zeros(4, 3), x, idx, "softmax", True, 1.0)
    with pytest.raises(RuntimeError, match=r"indices"):
        ops.moe_gate_backward(torch.zeros(4, 4), x, idx.long(), "softmax", True, 1.0)
    with pytest.raises(RuntimeError, match=r"score"):
        ops.moe_gate_backward(torch.zeros(4, 4), x, idx, "tanh", True, 1.0)


def test_permute_bad_inputs():
    h = torch.randn(5, 8)
    idx = ref.distinct_indices(5, 6, 2, gen(70))
    with pytest.raises(RuntimeError, match=r"indices"):            # expert 6 of 6
        ops.moe_permute(h, torch.full((5, 2), 6, dtype=torch.int32), 6, 1, -1)
    with pytest.raises(RuntimeError, match=r"indices"):            # negative expert
        ops.moe_permute(h, torch.full((5, 2), -1, dtype=torch.int32), 6, 1, -1)
    with pytest.raises(RuntimeError, match=r"indices"):            # int64
        ops.moe_permute(h, idx.long(), 6, 1, -1)
    with pytest.raises(RuntimeError, match=r"indices"):            # 4 tokens of indices for 5 of hidden
        ops.moe_permute(h, idx[:4], 6, 1, -1)
    with pytest.raises(RuntimeError, match=r"hidden"):             # rank 3
        ops.moe_permute(h.view(5, 2, 4), idx, 6, 1, -1)
    with pytest.raises(RuntimeError, match=r"align"):
        ops.moe_permute(h, idx, 6, 0, -1)
    with pytest.raises(RuntimeError, match=r"num_experts"):
        ops.moe_permute(h, idx, 0, 1, -1)
    _, slot_rows, _, _, _ = ops.moe_permute(h, idx, 6, 1, -1)
    with pytest.raises(RuntimeError, match=r"weights"):            # (5, 3) for (5, 2) slots
        ops.moe_unpermute(torch.randn(10, 8), slot_rows, torch.rand(5, 3))
    with pytest.raises(RuntimeError, match=r"slot_rows"):          # a row past the end of expert_out
        ops.moe_unpermute(torch.randn(10, 8), slot_rows + 10, torch.rand(5, 2))
    with pytest.raises(RuntimeError, match=r"indices"):
        ops.moe_expert_load(torch.full((5, 2), 6, dtype=torch.int32), 6)
    with pytest.raises(RuntimeError, match=r"bias"):
        ops.moe_update_bias(torch.zeros(6, dtype=torch.bfloat16), torch.zeros(6, dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match=r"counts"):
        ops.moe_update_bias(torch.zeros(6), torch.zeros(5, dtype=torch.int32), 0.1)


# ---------------------------------------------------------------------------------------------------
# CUDA == CPU (the CPU loops are the oracle): indices exactly, weights within 1e-6 relative
# ---------------------------------------------------------------------------------------------------
CUDA_ROUTES = {  # E, top_k, n_group, topk_group, score, renormalize, routed_scale, bias, noise
    "deepseek_v3": (256, 8, 8, 4, "sigmoid", True, 2.5, True, False),
    "deepseek_v2": (160, 6, 8, 3, "softmax", False, 16.0, False, False),
    "mixtral": (8, 2, 1, 1, "softmax", True, 1.0, False, False),
    "kimi_k2": (384, 8, 1, 1, "sigmoid", True, 2.827, True, False),
    "e1000_noise": (1000, 16, 8, 3, "softmax", True, 1.0, True, True),
    "e72_top16": (72, 16, 1, 1, "sigmoid", False, 1.0, False, True),
}


def cuda_logits(t, e, kind, score, dtype, g):
    if kind == "ties":
        return ref.discrete((t, e), ref.TIE_VALUES, g, SKEWED).to(dtype)
    x = torch.randn(t, e, generator=g) * 2
    if kind == "inf":  # +-inf for sigmoid; -inf (masked experts) for softmax, where +inf has no meaning
        u = torch.rand(t, e, generator=g)
        x[u < 0.05] = -math.inf
        if score == "sigmoid":
            x[u > 0.95] = math.inf
    return x.to(dtype)


# every kind and dtype up to T = 4096; at T = 65536 (where the CPU reference takes seconds) random logits
# in every dtype, and ties and infinities in fp32
CUDA_GATE_INPUTS = [(t, dtype, kind) for t in (0, 1, 7, 4096, 65536) for dtype in LOGIT_DTYPES
                    for kind in ("random", "ties", "inf") if t < 65536 or kind == "random" or dtype == torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("t,dtype,kind", CUDA_GATE_INPUTS)
@pytest.mark.parametrize("route", CUDA_ROUTES)
def test_cuda_gate_matches_cpu(route, t, dtype, kind):
    e, top_k, n_group, topk_group, score, renorm, scale, use_bias, use_noise = CUDA_ROUTES[route]
    g = gen(80 + t)
    logits = cuda_logits(t, e, kind, score, dtype, g)
    bias = (torch.rand(e, generator=g) * 0.2 - 0.1) if use_bias else None
    noise = (torch.rand(t, e, generator=g) * 0.01) if use_noise else None
    args = (top_k, n_group, topk_group, score, renorm, scale)
    w, idx = ops.moe_gate(logits, bias, noise, *args)
    cuda = lambda v: None if v is None else v.cuda()
    wc, idxc = ops.moe_gate(logits.cuda(), cuda(bias), cuda(noise), *args)
    assert torch.equal(idxc.cpu(), idx)
    torch.testing.assert_close(wc.cpu(), w, rtol=1e-6, atol=1e-30, equal_nan=True)
    # and the gradient
    gw = torch.randn(t, top_k, generator=g)
    gl = ops.moe_gate_backward(gw, logits, idx, score, renorm, scale)
    glc = ops.moe_gate_backward(gw.cuda(), logits.cuda(), idxc, score, renorm, scale)
    tol = FP32 if dtype == torch.float32 else BF16
    torch.testing.assert_close(glc.cpu().double(), gl.double(), equal_nan=True, **tol)


# the CPU reference copies a row at a time (about 10 us a slot): the largest case in bf16 only
CUDA_PERMUTE_INPUTS = [(*case, dtype) for case in PERMUTE_CASES for dtype in LOGIT_DTYPES] + [
    (16384, 256, 8, 128, -1, torch.bfloat16), (16384, 64, 6, 1, 1400, torch.bfloat16)]


@pytest.mark.cuda
@pytest.mark.parametrize("t,e,k,align,capacity,dtype", CUDA_PERMUTE_INPUTS)
def test_cuda_permute_unpermute_match_cpu(t, e, k, align, capacity, dtype):
    g = gen(90 + t)
    hidden = torch.randn(t, 136, generator=g).to(dtype)
    idx = ref.distinct_indices(t, e, k, g)
    cpu = ops.moe_permute(hidden, idx, e, align, capacity)
    gpu = ops.moe_permute(hidden.cuda(), idx.cuda(), e, align, capacity)
    for name, a, b in zip(("permuted", "slot_rows", "counts", "offsets", "dropped"), gpu, cpu):
        assert torch.equal(a.cpu(), b), name
    expert_out = torch.randn(cpu[0].shape, generator=g).to(dtype)
    w = torch.rand(t, k, generator=g)
    out = ops.moe_unpermute(expert_out, cpu[1], w)
    outc = ops.moe_unpermute(expert_out.cuda(), gpu[1], w.cuda())
    tol = FP32 if dtype == torch.float32 else BF16
    torch.testing.assert_close(outc.cpu(), out, **tol)
    assert torch.equal(ops.moe_expert_load(idx.cuda(), e).cpu(), ops.moe_expert_load(idx, e))
    # backward of both, through autograd
    eo, ww = expert_out.clone().requires_grad_(), w.clone().requires_grad_()
    eoc, wwc = expert_out.cuda().requires_grad_(), w.cuda().requires_grad_()
    go = torch.randn(t, 136, generator=g).to(dtype)
    grads = torch.autograd.grad(ops.moe_unpermute(eo, cpu[1], ww), (eo, ww), go)
    gradsc = torch.autograd.grad(ops.moe_unpermute(eoc, gpu[1], wwc), (eoc, wwc), go.cuda())
    for a, b in zip(gradsc, grads):
        torch.testing.assert_close(a.cpu().double(), b.double(), **tol)


# ---------------------------------------------------------------------------------------------------
# The helper ops registration.cpp adds behind permute/unpermute and their autograd
# ---------------------------------------------------------------------------------------------------
HELPER_OPS = ("moe_route", "moe_permute_backward", "moe_unpermute_backward")


@pytest.mark.parametrize("device", devices())
def test_helper_ops(device):
    if not all(hasattr(ops, name) for name in HELPER_OPS):
        pytest.skip("helper ops not registered")
    g = gen(100)
    idx = ref.distinct_indices(40, 12, 3, g).to(device)
    hidden = torch.randn(40, 16, generator=g).to(device)
    permuted, slot_rows, counts, offsets, dropped = ops.moe_permute(hidden, idx, 12, 8, 5)
    for a, b in zip(ops.moe_route(idx, 12, 8, 5), (slot_rows, counts, offsets, dropped)):
        assert torch.equal(a, b)
    torch.library.opcheck(ops.moe_route, (idx, 12, 8, 5))
    torch.library.opcheck(ops.moe_permute_backward, (torch.randn(permuted.shape, generator=g).to(device), slot_rows))
    w = torch.rand(40, 3, generator=g).to(device)
    grad_out = torch.randn(40, 16, generator=g).to(device)
    torch.library.opcheck(ops.moe_unpermute_backward, (grad_out, permuted, slot_rows, w))
