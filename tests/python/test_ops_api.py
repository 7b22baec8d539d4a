"""The typed Python surface cannot drift from the compiled one:
- every registered torch.ops.anvil op has a wrapper in anvil.ops with the schema's argument names, order,
  defaults and types (and no wrapper names a missing op), documented with every argument;
- a wrong dtype or shape through a wrapper raises the op's own error, naming the op;
- the wrappers compose with torch.compile(fullgraph=True) and autograd as the ops do;
- bindings/anvil/_C.pyi is what bindings/stubgen.py writes from the built anvil._C, and names every public name.
"""
import ast
import importlib.util
import inspect
import os
import typing

import pytest
import torch

import anvil
import anvil.ops

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STUB = os.path.join(ROOT, "bindings", "anvil", "_C.pyi")


def registered_ops():
    return sorted({n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("anvil::")})


def schema_of(name):
    return getattr(torch.ops.anvil, name).default._schema


_TYPES = {"Tensor": torch.Tensor, "Optional[Tensor]": typing.Optional[torch.Tensor], "int": int, "float": float,
          "bool": bool, "str": str, "ScalarType": torch.dtype, "Optional[ScalarType]": typing.Optional[torch.dtype],
          "Optional[float]": typing.Optional[float]}


def test_every_registered_op_has_a_wrapper_and_every_wrapper_an_op():
    ops = registered_ops()
    assert len(ops) >= 31, ops
    assert sorted(anvil.ops.__all__) == ops, (
        f"anvil.ops (bindings/anvil/ops.py) and torch.ops.anvil differ: missing wrappers "
        f"{sorted(set(ops) - set(anvil.ops.__all__))}, wrappers of no op {sorted(set(anvil.ops.__all__) - set(ops))}")


@pytest.mark.parametrize("name", registered_ops())
def test_wrapper_signature_is_the_schema(name):
    fn = getattr(anvil.ops, name)
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    args = schema_of(name).arguments
    assert [p.name for p in params] == [a.name for a in args], f"{name}: argument names or order differ from the schema"
    for p, a in zip(params, args):
        want = _TYPES[str(a.real_type)]
        assert hints[p.name] == want, f"{name}({p.name}): annotated {hints[p.name]}, schema says {a.real_type}"
        if a.has_default_value():
            assert p.default is not inspect.Parameter.empty and p.default == a.default_value, (
                f"{name}({p.name}): default {p.default!r}, schema's {a.default_value!r}")
        else:
            assert p.default is inspect.Parameter.empty, f"{name}({p.name}) has a default the schema lacks"
    returns = schema_of(name).returns
    ret = hints["return"]
    if not returns:
        assert ret is type(None)
    elif len(returns) == 1:
        assert ret is torch.Tensor
    else:
        assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == len(returns)


@pytest.mark.parametrize("name", registered_ops())
def test_wrapper_docstring_names_every_argument_and_a_shape(name):
    doc = getattr(anvil.ops, name).__doc__ or ""
    for a in schema_of(name).arguments:
        assert a.name in doc, f"anvil.ops.{name}'s docstring does not mention {a.name}"
    assert "(" in doc and any(w in doc for w in ("fp32", "int32", "int64", "dtype", "e4m3", "int8")), (
        f"anvil.ops.{name}'s docstring states no shape or dtype")


def _bad_calls():
    """One call per op with an input that breaks a rule of the op (CPU)."""
    f32, i32 = torch.float32, torch.int32
    z = torch.zeros
    fp8 = z(4, 128).to(torch.float8_e4m3fn)
    return {
        "quantize_fp8": lambda: anvil.ops.quantize_fp8(z(4, 8, dtype=i32), "row"),
        "dequantize_fp8": lambda: anvil.ops.dequantize_fp8(z(4, 8), z(4, 1), "row", f32),
        "quantize_int8": lambda: anvil.ops.quantize_int8(z(4, 8, dtype=i32), "row"),
        "dequantize_int8": lambda: anvil.ops.dequantize_int8(z(4, 8), z(4, 1), "row", f32),
        "moe_gate": lambda: anvil.ops.moe_gate(z(4, 8, dtype=i32), None, None, 2),
        "moe_gate_backward": lambda: anvil.ops.moe_gate_backward(z(4, 3), z(4, 8), z(4, 2, dtype=i32), "softmax",
                                                                 True, 1.0),
        "moe_route": lambda: anvil.ops.moe_route(z(4, 2), 8),
        "moe_permute": lambda: anvil.ops.moe_permute(z(4, 16), z(4, 2), 8),
        "moe_permute_backward": lambda: anvil.ops.moe_permute_backward(z(8, 16), z(4, 2)),
        "moe_unpermute": lambda: anvil.ops.moe_unpermute(z(8, 16), z(4, 2), z(4, 2)),
        "moe_unpermute_backward": lambda: anvil.ops.moe_unpermute_backward(z(4, 16), z(8, 16), z(4, 2), z(4, 2)),
        "moe_expert_load": lambda: anvil.ops.moe_expert_load(z(4, 2), 8),
        "moe_update_bias": lambda: anvil.ops.moe_update_bias(z(8, dtype=i32), z(8, dtype=i32), 0.1),
        "fp8_gemm": lambda: anvil.ops.fp8_gemm(z(4, 128), z(4, 1), fp8, z(4, 1)),
        "fp8_grouped_gemm": lambda: anvil.ops.fp8_grouped_gemm(z(4, 128), z(4, 1), fp8[None], z(1, 1, 1),
                                                               torch.tensor([0, 4], dtype=i32)),
        "fp8_grouped_gemm_masked": lambda: anvil.ops.fp8_grouped_gemm_masked(z(1, 4, 128), z(1, 4, 1), fp8[None],
                                                                             z(1, 1, 1), z(1, dtype=i32)),
        "fp8_linear": lambda: anvil.ops.fp8_linear(z(2, 128), z(4, 128), z(1, 1)),
        "fp8_linear_backward": lambda: anvil.ops.fp8_linear_backward(z(2, 4), z(4, 128), z(1, 1)),
        "int8_gemm": lambda: anvil.ops.int8_gemm(z(4, 16), z(4, 1), z(4, 16, dtype=torch.int8), z(4, 1)),
        "sparse_attention": lambda: anvil.ops.sparse_attention(z(1, 2, 8, 64, dtype=i32), z(1, 2, 8, 64),
                                                               z(1, 2, 8, 64)),
        "sparse_attention_backward": lambda: anvil.ops.sparse_attention_backward(
            z(1, 2, 8, 64), z(1, 2, 8, 64, dtype=i32), z(1, 2, 8, 64), z(1, 2, 8, 64), z(1, 2, 8, 64), z(1, 2, 8),
            None, None, None, -1, 0, 64, None, False),
        "select_blocks": lambda: anvil.ops.select_blocks(z(1, 2, 8, 64, dtype=i32), z(1, 2, 8, 64), 64, 1),
        "rms_norm": lambda: anvil.ops.rms_norm(z(4, 8, dtype=i32), z(8, dtype=i32), 1e-6),
        "rms_norm_backward": lambda: anvil.ops.rms_norm_backward(z(4, 8), z(4, 8), z(7), z(4)),
        "swiglu": lambda: anvil.ops.swiglu(z(4, 8), z(4, 8, dtype=torch.bfloat16)),
        "swiglu_backward": lambda: anvil.ops.swiglu_backward(z(4, 8), z(4, 8), z(4, 8, dtype=torch.bfloat16)),
        "rope": lambda: anvil.ops.rope(z(2, 4, 8), z(1, 4, 8), z(1, 4, 8)),
        "rope_backward": lambda: anvil.ops.rope_backward(z(2, 4, 8), z(1, 4, 8), z(1, 4, 8)),
        "cross_entropy_chunk": lambda: anvil.ops.cross_entropy_chunk(z(4, 8), z(4, dtype=i32)),
        "cross_entropy_chunk_backward": lambda: anvil.ops.cross_entropy_chunk_backward(z(4, 8), z(4, dtype=i32),
                                                                                       z(4), z(())),
        # CUDA only: on the CPU the dispatcher's own error names the op and the backend.
        "kd_rows": lambda: anvil.ops.kd_rows(z(4, 8), z(4, 8), None, 0, 1.0, 0.1, 0.5, 1.0, 0.0, False),
    }


def test_every_op_has_a_bad_input_case():
    assert sorted(_bad_calls()) == registered_ops()


@pytest.mark.parametrize("name", registered_ops())
def test_bad_input_through_the_wrapper_is_the_ops_own_error(name):
    with pytest.raises(RuntimeError, match=f"anvil::{name}\\b") as e:
        _bad_calls()[name]()
    # The message says what rule broke (ANVIL_CHECK's "<arg> must ..." or the dispatcher's backend line).
    assert "must" in str(e.value) or "Could not run" in str(e.value) or "expected" in str(e.value), str(e.value)


@pytest.mark.cuda
def test_wrong_device_through_a_wrapper_is_the_ops_own_error():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"anvil::rms_norm"):
        anvil.ops.rms_norm(x, torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match=r"anvil::swiglu"):
        anvil.ops.swiglu(x, torch.randn(4, 8))


def test_wrappers_compute_the_op_and_compose_with_autograd_and_compile():
    torch.manual_seed(0)
    x = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, dtype=torch.float64, requires_grad=True)
    y, rstd = anvil.ops.rms_norm(x, w, 1e-6)
    y_op, rstd_op = torch.ops.anvil.rms_norm(x, w, 1e-6)
    assert torch.equal(y, y_op) and torch.equal(rstd, rstd_op)
    assert torch.autograd.gradcheck(lambda a, b: anvil.ops.rms_norm(a, b, 1e-6)[0], (x, w))

    def f(gate, up, logits):
        weights, idx = anvil.ops.moe_gate(logits, None, None, 2, score="sigmoid")
        return anvil.ops.swiglu(gate, up).sum() + weights.sum(), idx

    gate, up, logits = torch.randn(4, 16), torch.randn(4, 16), torch.randn(4, 8)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (a, ia), (b, ib) = f(gate, up, logits), compiled(gate, up, logits)
    assert torch.equal(a, b) and torch.equal(ia, ib)


def test_top_level_aliases_are_the_wrappers():
    for name in ("quantize_fp8", "dequantize_fp8", "quantize_int8", "dequantize_int8", "fp8_gemm", "fp8_linear",
                 "int8_gemm", "sparse_attention", "select_blocks"):
        assert getattr(anvil, name) is getattr(anvil.ops, name)


def _load_stubgen():
    spec = importlib.util.spec_from_file_location("anvil_stubgen", os.path.join(ROOT, "bindings", "stubgen.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_C_stubs_are_current():
    assert anvil._C is not None
    text = _load_stubgen().generate(anvil._C)
    with open(STUB) as f:
        committed = f.read()
    assert text == committed, "bindings/anvil/_C.pyi is out of date: run `python bindings/stubgen.py`"


def test_C_stubs_name_every_public_name():
    tree = ast.parse(open(STUB).read())
    stubbed = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    public = {n for n in dir(anvil._C) if not n.startswith("_")}
    assert public <= stubbed, f"not in bindings/anvil/_C.pyi: {sorted(public - stubbed)}"
    assert stubbed <= public, f"stubs of no binding: {sorted(stubbed - public)}"
    for cls in tree.body:
        if isinstance(cls, ast.ClassDef):
            members = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
            runtime = {k for k in vars(getattr(anvil._C, cls.name)) if not k.startswith("_")}
            assert runtime <= members, f"{cls.name}: not stubbed {sorted(runtime - members)}"


def test_package_is_typed():
    assert os.path.exists(os.path.join(ROOT, "bindings", "anvil", "py.typed"))
