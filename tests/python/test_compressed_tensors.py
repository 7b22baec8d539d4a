"""compressed-tensors (anvil/model/compressed_tensors.h and load_causal_lm): the format against the
compressed-tensors 0.19.0 package itself, and anvil reading llm-compressor's checkpoints
(tests/data/quantized, made by make_fixtures.py there) against transformers 5.17 loading the same folders.

Oracles: pack_to_int32 / unpack_from_int32 (byte-equal, random data, odd shapes, both packed dims, 3-D);
the package's compressors (decompress bit-equal on every quantized module of every fixture and on random
modules of every preset; compress byte-equal); its QuantizationConfig (anvil's to_json of a parsed config
equals what llm-compressor wrote); transformers' logits on the fixtures (fp32, ARCHITECTURE.md's rule
max |diff| <= 1e-4 x max |logit|), with transformers' activation fake-quantization switched off, since
anvil's dense path runs the dequantized weights on unquantized activations."""
import json
import os
import shutil
import subprocess
import sys
import zlib

import pytest
import torch

import anvil

_C = anvil._C
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, preset_name_to_scheme  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES_DIR = os.path.join(ROOT, "tests", "data", "quantized")
FIXTURES = sorted(d for d in os.listdir(FIXTURES_DIR) if os.path.isfile(os.path.join(FIXTURES_DIR, d, "config.json")))
LOCAL = ("weight", "weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "input_scale",
         "input_zero_point")


def test_every_recipe_has_a_fixture():
    assert FIXTURES == ["llama-fp8-block", "llama-fp8-dynamic", "llama-fp8-static", "llama-w4a16", "llama-w4a16-asym",
                        "llama-w8a16-asym", "llama-w8a8-int8", "mixtral-w4a16"]


# ---- packing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("packed_dim", [0, 1])
def test_packing_is_byte_equal_to_compressed_tensors(bits, packed_dim):
    g = torch.Generator().manual_seed(100 * bits + packed_dim)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    for shape in [(1, 1), (3, 7), (5, 31), (2, 32), (4, 33), (7, 100), (33, 129), (3, 4, 65)]:
        v = torch.randint(lo, hi, shape, generator=g, dtype=torch.int8)
        ours = _C.ct_pack_int32(v, bits, packed_dim)
        theirs = pack_to_int32(v, bits, packed_dim=packed_dim)
        assert ours.dtype == torch.int32 and torch.equal(ours, theirs.contiguous()), (bits, shape)
        assert torch.equal(_C.ct_unpack_int32(theirs.contiguous(), bits, list(shape), packed_dim), v)
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=packed_dim), v)


def test_packing_refuses_what_would_corrupt_neighbours():
    with pytest.raises(RuntimeError, match=r"\[-8, 7\].*got \[-9"):
        _C.ct_pack_int32(torch.tensor([[-9, 0]], dtype=torch.int8), 4, 1)
    with pytest.raises(RuntimeError, match="got \\[2, 3\\]"):
        _C.ct_unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, [2, 64], 1)


# ---- (de)quantization ------------------------------------------------------------------------------------

def scheme_json(scheme):
    return json.dumps(scheme.model_dump(mode="json"))


def module_tensors(tensors, module):
    return {k[len(module) + 1:]: v for k, v in tensors.items()
            if k.startswith(module + ".") and k[len(module) + 1:] in LOCAL}


def fixture_modules(name):
    """(module, local tensors, scheme, format) for every quantized module of a fixture."""
    folder = os.path.join(FIXTURES_DIR, name)
    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    config = QuantizationConfig.model_validate(qc)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(("weight_scale", "weight_packed"))})
    assert modules, name
    scheme = next(iter(config.config_groups.values()))
    out = []
    for m in modules:
        fmt = scheme.format or config.format
        out.append((m, module_tensors(tensors, m), scheme, fmt))
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_dequantization_equals_the_packages_decompress_on_every_fixture_module(name):
    for module, local, scheme, fmt in fixture_modules(name):
        compressor = BaseCompressor.get_value_from_registry(fmt)
        theirs = compressor.decompress(dict(local), scheme)["weight"]
        ours = _C.ct_dequantize_module(local, scheme_json(scheme), fmt, "", module)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (name, module)
        # and into a wider dtype: q * scale exact in fp32, as transformers computes it loading in fp32
        wide = _C.ct_dequantize_module(local, scheme_json(scheme), fmt, "float32", module)
        assert wide.dtype == torch.float32 and (wide - theirs.float()).abs().max() <= theirs.float().abs().max() * 2 ** -8


PRESETS = [("W4A16", "pack-quantized"), ("W4A16_ASYM", "pack-quantized"), ("W8A16", "pack-quantized"),
           ("W8A8", "int-quantized"), ("FP8", "float-quantized"), ("FP8_DYNAMIC", "float-quantized"),
           ("FP8_BLOCK", "float-quantized"), ("W8A8", "naive-quantized")]


@pytest.mark.parametrize("preset,fmt", PRESETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compress_and_decompress_equal_the_package_on_random_modules(preset, fmt, dtype):
    """Random weights and observer-style scales of odd shapes (a partial 128-block, 384 columns)."""
    from compressed_tensors.quantization.utils import calculate_qparams
    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    g = torch.Generator().manual_seed(zlib.crc32(f"{preset} {fmt} {dtype}".encode()))
    w = (torch.randn(200, 384, generator=g) * 0.05).to(dtype)
    if args.strategy == "group":
        x = w.float().view(200, -1, args.group_size)
        mn, mx = x.amin(-1), x.amax(-1)
    elif args.strategy == "block":
        xp = torch.nn.functional.pad(w.float(), (0, 0, 0, 56))  # 256 rows: two 128-row blocks
        x = xp.view(2, 128, 3, 128).transpose(1, 2).reshape(2, 3, -1)
        mn, mx = x.amin(-1), x.amax(-1)
    elif args.strategy == "channel":
        mn, mx = w.float().amin(1, keepdim=True), w.float().amax(1, keepdim=True)
    else:
        mn, mx = w.float().amin().reshape(1), w.float().amax().reshape(1)
    scale, zp = calculate_qparams(mn.to(dtype), mx.to(dtype), args)
    sd = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
    compressor = BaseCompressor.get_value_from_registry(fmt)
    theirs = compressor.compress(dict(sd), scheme)
    ours = _C.ct_compress_module(w, scale, None if args.symmetric else zp, scheme_json(scheme), fmt)
    assert sorted(ours) == sorted(theirs), (sorted(ours), sorted(theirs))
    for k in theirs:
        a, b = ours[k], theirs[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        as_bytes = (lambda t: t.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else (lambda t: t)
        assert torch.equal(as_bytes(a.contiguous()), as_bytes(b.contiguous())), k
    back = compressor.decompress(dict(theirs), scheme)["weight"]
    assert torch.equal(_C.ct_dequantize_module(theirs, scheme_json(scheme), fmt, "", "m"), back)


def test_legacy_act_order_g_idx_selects_each_columns_group():
    """Checkpoints of compressed-tensors < 0.19 with actorder "group" store weight_g_idx: column c uses
    the scale of group g_idx[c] (the package removed the option, so the rule is written out here)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-8, 8, (6, 256), generator=g, dtype=torch.int8)
    g_idx = torch.randint(0, 2, (256,), generator=g, dtype=torch.int32)
    scale = torch.rand(6, 2, generator=g) + 0.1
    scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 128,
                                                 "actorder": "group"}}
    local = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([6, 256]), "weight_scale": scale,
             "weight_g_idx": g_idx}
    ours = _C.ct_dequantize_module(local, json.dumps(scheme), "pack-quantized", "", "m")
    assert torch.equal(ours, q.float() * scale[:, g_idx.long()])
    with pytest.raises(RuntimeError, match="'m.weight_g_idx' is missing"):
        _C.ct_dequantize_module({k: v for k, v in local.items() if k != "weight_g_idx"}, json.dumps(scheme),
                                "pack-quantized", "", "m")


# ---- config ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_config_round_trips_as_llm_compressor_wrote_it(name):
    qc = json.load(open(os.path.join(FIXTURES_DIR, name, "config.json")))["quantization_config"]
    assert json.loads(_C.ct_parse_config(json.dumps(qc))) == qc
    # and the package reads anvil's output as the same config
    ours = QuantizationConfig.model_validate(json.loads(_C.ct_parse_config(json.dumps(qc))))
    assert ours == QuantizationConfig.model_validate(qc)


def test_required_keys_are_what_the_fixtures_hold():
    for name in FIXTURES:
        for module, local, scheme, fmt in fixture_modules(name):
            assert sorted(_C.ct_required_keys("", scheme_json(scheme), fmt)) == sorted(local), (name, module)


def test_targets_match_as_compressed_tensors():
    from compressed_tensors.utils.match import is_match
    qc = {"format": "pack-quantized", "quantization_status": "compressed",
          "ignore": ["lm_head", "re:.*mlp\\.gate$", "model.layers.1.self_attn.o_proj"],
          "config_groups": {"a": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}},
                            "b": {"targets": ["re:.*layers\\.0\\..*down_proj"], "weights": {"num_bits": 8, "strategy": "channel"}}}}
    lin = torch.nn.Linear(2, 2)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj",
             "model.layers.0.mlp.gate", "model.layers.0.mlp.gate_proj", "lm_head", "lm_head_2"]
    for n in names:
        ours = _C.ct_scheme_for(json.dumps(qc), n, ["Linear"])
        ignored = is_match(n, lin, qc["ignore"])
        expect = None if ignored else ("b" if is_match(n, lin, qc["config_groups"]["b"]["targets"]) else "a")
        assert ours == expect, n


# ---- loading: logits against transformers -------------------------------------------------------------------

def dense_copy(folder, dst):
    """The checkpoint decompressed by compressed-tensors, module by module (scales in fp32, so q * scale is
    exact), as a dense checkpoint with Mixtral's published expert names (w1/w3/w2). transformers 5.17 cannot
    load llm-compressor's per-expert MoE output itself (it leaves the experts' weight_packed keys unexpected
    and the fused experts uninitialized), so for MoE fixtures the package's decompress + transformers'
    modelling of the dense result is the oracle."""
    os.makedirs(dst, exist_ok=True)
    name = os.path.basename(folder)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    out = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in LOCAL or k.endswith("norm.weight")
           or k.endswith("gate.weight") or k.endswith("embed_tokens.weight")}
    for module, local, scheme, fmt in fixture_modules(name):
        local = {k: (v.float() if k.endswith("_scale") else v) for k, v in local.items()}
        w = BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)["weight"]
        key = module + ".weight"
        for a, b in [(".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2.")]:
            if ".experts." in key:
                key = key.replace(a, b)
        out[key] = w.contiguous()
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(folder, "config.json")))
    del cfg["quantization_config"]
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def transformers_model(folder, tmp=None):
    from transformers import AutoModelForCausalLM
    if os.path.basename(folder).startswith("mixtral"):
        folder = dense_copy(folder, os.path.join(tmp, "dense"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for m in model.modules():  # dense comparison: activations unquantized on both sides
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = False
    return model


def ids_for(seed, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 24), generator=g)


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_equal_transformers(name, tmp_path):
    folder = os.path.join(FIXTURES_DIR, name)
    ids = ids_for(FIXTURES.index(name))
    with torch.no_grad():
        theirs = transformers_model(folder, str(tmp_path))(ids).logits
    ours = _C.CausalLM(folder, "float32", "cpu", "dense").logits(ids)
    assert ours.shape == theirs.shape
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * theirs.abs().max().item(), (name, err)
    # the quantization matters: the same model from the unquantized weights would differ
    assert theirs.abs().max() > 1


def test_bf16_load_holds_the_packages_bf16_weights():
    """Loaded in the checkpoint's bf16, every weight is compressed-tensors' decompress bit for bit (Mixtral's
    experts renamed to anvil's w1/w3/w2)."""
    for name in ["llama-w4a16-asym", "mixtral-w4a16"]:
        model = _C.CausalLM(os.path.join(FIXTURES_DIR, name), "", "cpu", "dense")
        assert model.dtype == "bfloat16"
        state = model.state_dict()
        for module, local, scheme, fmt in fixture_modules(name):
            theirs = BaseCompressor.get_value_from_registry(fmt).decompress(dict(local), scheme)["weight"]
            key = module + ".weight"
            for a, b in [(".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2.")]:
                if ".experts." in key:
                    key = key.replace(a, b)
            assert theirs.dtype == torch.bfloat16 and torch.equal(state[key], theirs), (name, module)


# ---- kept quantized: the Linear weight formats ------------------------------------------------------------

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def enable_activation_quant(model):
    for m in model.modules():
        if hasattr(m, "quantization_scheme"):
            m.quantization_enabled = True
    return model


def sqnr_db(x, ref):
    return (10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum())).item()


@pytest.mark.parametrize("name,fmt", [("llama-w4a16", "int4"), ("llama-w4a16-asym", "int4"),
                                      ("llama-w8a16-asym", "int8"), ("mixtral-w4a16", "int4")])
def test_auto_keeps_weight_only_checkpoints_quantized_with_the_dense_logits(name, fmt):
    """base_weights auto (the default) keeps W4A16 / W8A16 weights as stored (unpacked int4 / int8 with their
    group scales and zero points): every projection in that format, the logits those of the dense load
    (the same products: (q - zp) * scale in fp32, rounded once to the model dtype)."""
    folder = os.path.join(FIXTURES_DIR, name)
    for dtype in ["float32", "bfloat16"]:
        kept = _C.CausalLM(folder, dtype, "cpu", "auto")
        formats = kept.weight_formats()
        assert {f for n, f in formats.items() if n.endswith(PROJ)} == {fmt}, formats
        assert formats["lm_head"] == "dense" if "lm_head" in formats else True
        ids = ids_for(7)
        dense = _C.CausalLM(folder, dtype, "cpu", "dense").logits(ids).float()
        ours = kept.logits(ids).float()
        assert (ours - dense).abs().max() <= 1e-5 * dense.abs().max(), (name, dtype)


@pytest.mark.parametrize("name,fmt", [("llama-fp8-dynamic", "fp8-channel"), ("llama-fp8-block", "fp8")])
def test_fp8_checkpoints_kept_as_stored_equal_transformers_quantizing_activations(name, fmt):
    """Kept fp8 (base_weights = the format; "auto" does this where the FP8 GEMM runs): activations are
    quantized per token (FP8_DYNAMIC) or per 1x128 block (FP8_BLOCK) as compressed-tensors' dynamic
    activation quantization does, so transformers with its fake quantization on is the oracle."""
    folder = os.path.join(FIXTURES_DIR, name)
    model = _C.CausalLM(folder, "float32", "cpu", fmt)
    formats = model.weight_formats()
    assert {f for n, f in formats.items() if n.endswith(PROJ)} == {fmt}, formats
    ids = ids_for(11)
    with torch.no_grad():
        theirs = enable_activation_quant(transformers_model(folder))(ids).logits
        dense = transformers_model(folder)(ids).logits
    ours = model.logits(ids)
    # activation quantization changes the logits (so the oracle sees it) ...
    assert (dense - theirs).abs().max() > 1e-3 * theirs.abs().max()
    # ... and anvil's quantized product computes what transformers' fake quantization does
    assert sqnr_db(ours, theirs) > 10 + sqnr_db(dense, theirs), (sqnr_db(ours, theirs), sqnr_db(dense, theirs))


@pytest.mark.parametrize("name,fmt", [("llama-w8a8-int8", "w8a8"), ("llama-fp8-static", "fp8-tensor")])
def test_w8a8_and_static_fp8_kept_as_stored_are_as_close_as_transformers_quantized_forward(name, fmt):
    """w8a8 quantizes activations per token with anvil's amax / 127 (vLLM's kernels' rule; compressed-tensors'
    own fake quantization divides by 127.5), fp8-tensor per token where the checkpoint's input_scale is
    static per tensor: not transformers' arithmetic, so the bound is relative: anvil's quantized logits are
    at least as close to the dense model's as transformers' quantized forward is (SQNR, 1 dB slack), and
    differ from the dense logits (the quantized product ran)."""
    folder = os.path.join(FIXTURES_DIR, name)
    model = _C.CausalLM(folder, "float32", "cpu", fmt)
    assert {f for n, f in model.weight_formats().items() if n.endswith(PROJ)} == {fmt}
    ids = ids_for(13)
    with torch.no_grad():
        quantized = enable_activation_quant(transformers_model(folder))(ids).logits
        dense = transformers_model(folder)(ids).logits
    ours = model.logits(ids)
    assert sqnr_db(ours, dense) >= sqnr_db(quantized, dense) - 1, (sqnr_db(ours, dense), sqnr_db(quantized, dense))
    assert sqnr_db(ours, dense) < 60


def test_dense_and_gpu_only_formats_stay_dense_on_the_cpu_under_auto():
    for name in ["llama-fp8-dynamic", "llama-w8a8-int8", "llama-fp8-block"]:
        formats = _C.CausalLM(os.path.join(FIXTURES_DIR, name), "float32", "cpu", "auto").weight_formats()
        assert set(formats.values()) == {"dense"}, (name, formats)
    formats = _C.CausalLM(os.path.join(FIXTURES_DIR, "llama-w4a16"), "float32", "cpu", "dense").weight_formats()
    assert set(formats.values()) == {"dense"}


# ---- damaged checkpoints -----------------------------------------------------------------------------------

def damaged(tmp_path, name, edit_tensors=None, edit_config=None):
    src = os.path.join(FIXTURES_DIR, name)
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if edit_tensors:
        t = load_file(os.path.join(src, "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        cfg = json.load(open(dst / "config.json"))
        edit_config(cfg["quantization_config"])
        json.dump(cfg, open(dst / "config.json", "w"))
    return str(dst)


def test_a_missing_weight_scale_is_named(tmp_path):
    key = "model.layers.1.mlp.up_proj.weight_scale"
    d = damaged(tmp_path, "llama-fp8-dynamic", lambda t: t.pop(key))
    with pytest.raises(RuntimeError, match=f"missing tensors.*{key.replace('.', '[.]')}"):
        _C.CausalLM(d, "float32", "cpu", "dense")


def test_every_missing_tensor_is_listed(tmp_path):
    keys = ["model.layers.0.self_attn.q_proj.weight_shape", "model.layers.1.mlp.down_proj.weight_zero_point",
            "model.layers.1.self_attn.k_proj.weight_scale"]
    d = damaged(tmp_path, "llama-w4a16-asym", lambda t: [t.pop(k) for k in keys])
    with pytest.raises(RuntimeError) as e:
        _C.CausalLM(d, "float32", "cpu", "dense")
    assert all(k in str(e.value) for k in keys), str(e.value)


def test_a_missing_static_input_scale_is_named(tmp_path):
    key = "model.layers.0.self_attn.o_proj.input_scale"
    d = damaged(tmp_path, "llama-fp8-static", lambda t: t.pop(key))
    with pytest.raises(RuntimeError, match=key.replace(".", "[.]")):
        _C.CausalLM(d, "float32", "cpu", "dense")


@pytest.mark.parametrize("key,shape,message", [
    ("model.layers.0.mlp.gate_proj.weight_scale", (256, 2), "must have shape \\[256, 1\\], got \\[256, 2\\]"),
    ("model.layers.0.mlp.gate_proj.weight_packed", (256, 8), "gate_proj.weight_packed.*got \\[256, 8\\]"),
    ("model.layers.0.mlp.gate_proj.weight_shape", (3,), "gate_proj.weight_shape' must hold two integers"),
])
def test_wrong_shapes_are_named(tmp_path, key, shape, message):
    def edit(t):
        t[key] = torch.zeros(shape, dtype=t[key].dtype) if t[key].dtype != torch.bfloat16 else torch.ones(shape, dtype=t[key].dtype)
    d = damaged(tmp_path, "llama-w4a16", edit)
    with pytest.raises(RuntimeError, match=message):
        _C.CausalLM(d, "float32", "cpu", "dense")


def test_an_untargeted_quantized_module_is_an_error(tmp_path):
    d = damaged(tmp_path, "llama-fp8-dynamic", edit_config=lambda q: q["ignore"].append("model.layers.0.mlp.up_proj"))
    with pytest.raises(RuntimeError, match="'model.layers.0.mlp.up_proj' holds quantized tensors"):
        _C.CausalLM(d, "float32", "cpu", "dense")


@pytest.mark.parametrize("edit,message", [
    (lambda q: (q.update(format="sparse-bitmask"), q["config_groups"]["group_0"].update(format=None)),
     "group_0: unsupported compressed-tensors scheme: format 'sparse-bitmask'"),
    (lambda q: q["config_groups"]["group_0"].update(format="marlin-24"), "format 'marlin-24'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits="4"), "group_0.weights.num_bits: must be an integer"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor_group", group_size=16, type="float",
                                                               num_bits=4),
     "unsupported compressed-tensors scheme"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "kv_cache_scheme"),
    (lambda q: q.update(quantization_status="frozen"), "quantization_status 'frozen'"),
])
def test_unsupported_or_malformed_configs_are_named(tmp_path, edit, message):
    d = damaged(tmp_path, "llama-w4a16", edit_config=edit)
    with pytest.raises(RuntimeError, match=message):
        _C.CausalLM(d, "float32", "cpu", "dense")


# ---- the command line ----------------------------------------------------------------------------------------

def anvil_binary():
    return anvil.executable()  # the build tree's bin/anvil, or the installed wheel's


def run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([anvil_binary(), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("name", ["llama-w8a8-int8", "mixtral-w4a16"])
def test_generate_and_eval_run_on_fixtures(name, tmp_path):
    """`anvil generate` runs; `anvil eval`'s perplexity (fp32) equals transformers' on the same folder."""
    from transformers import AutoTokenizer
    folder = os.path.join(FIXTURES_DIR, name)
    out = run_cli("generate", "--model", folder, "--device", "cpu", "--prompt", "Hello world", "-n", "8",
                  "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert "new tokens/s" in out.stderr
    texts = ["the cat sat on the mat", "int main() { return 0; }"]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = run_cli("eval", "--model", folder, "--device", "cpu", "--dtype", "float32", "--data", str(data), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    tok, model = AutoTokenizer.from_pretrained(folder), transformers_model(folder, str(tmp_path))
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t).input_ids])
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(float(torch.tensor(nll / n).exp()), rel=1e-4)


def test_lora_trains_over_a_compressed_tensors_base(tmp_path):
    folder = os.path.join(FIXTURES_DIR, "llama-w4a16")
    g = torch.Generator().manual_seed(0)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"input_ids": torch.randint(0, 511, (16,), generator=g).tolist()}) + "\n"
                             for _ in range(16)))
    cfg = {"model": {"path": folder, "dtype": "float32", "device": "cpu"},
           "data": {"train": str(train), "seq_len": 16},
           "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},
           "train": {"batch_size": 2, "grad_accum": 1, "steps": 6, "lr": 2e-2, "warmup_steps": 0,
                     "schedule": "constant", "seed": 3},
           "output": {"dir": str(tmp_path / "run"), "log_every": 1}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = run_cli("lora", "--config", str(tmp_path / "cfg.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    # and the adapter merges into the dequantized base: a dense folder transformers loads
    merged = tmp_path / "merged"
    out = run_cli("merge", "--base", folder, "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(merged),
                  "--dtype", "float32")
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.load(open(merged / "config.json"))
    assert "quantization_config" not in cfg
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ids = ids_for(3)
    with torch.no_grad():
        theirs = hf(ids).logits
    ours = _C.CausalLM(str(merged), "float32", "cpu", "dense").logits(ids)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    base = _C.CausalLM(folder, "float32", "cpu", "dense").logits(ids)
    assert (ours - base).abs().max() > 1e-3  # the adapter is in the merged weights


# ---- the fixtures reproduce --------------------------------------------------------------------------------

@pytest.mark.slow  # eight llm-compressor runs: about 2 minutes on the 2-core development machine
def test_make_fixtures_check_reproduces_the_committed_fixtures():
    pytest.importorskip("llmcompressor")
    proc = subprocess.run([sys.executable, os.path.join(FIXTURES_DIR, "make_fixtures.py"), "--check"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 fixtures reproduce" in proc.stdout
