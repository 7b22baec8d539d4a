"""anvil's safetensors reader and writer against the `safetensors` package and transformers
(docs/FORMATS.md, "safetensors"): files the reference writes read back bit-identical, files anvil
writes load in `safetensors.torch.load_file` bit-identical (and are byte-identical to the reference's
own file), sharded directories written by `save_pretrained` load, directories anvil writes load in
`from_pretrained`, a write that fails midway leaves no file behind, and `anvil inspect` on the CLI."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import anvil

C = anvil._C

# Every dtype both torch and the format have (the format's sub-byte F4/F6 have no torch dtype of that shape).
DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
          torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
          torch.float8_e8m0fnu]
SHAPES = [(3, 5), (7,), (), (0, 4), (2, 1, 3)]


def random_tensor(dtype, shape, gen):
    """Random bytes viewed as dtype: every bit pattern of the float types, NaNs included."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    n = 1
    for d in shape:
        n *= d
    size = torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)


def same_bits(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True


def all_dtypes_dict(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"{str(d).removeprefix('torch.')}.{i}": random_tensor(d, s, gen)
            for d in DTYPES for i, s in enumerate(SHAPES)}


def test_reads_files_written_by_safetensors(tmp_path):
    tensors = all_dtypes_dict(1)
    path = str(tmp_path / "ref.safetensors")
    save_file(tensors, path, metadata={"format": "pt", "note": "written by safetensors"})
    ours = C.load_checkpoint(path)
    assert sorted(ours) == sorted(tensors) == C.checkpoint_keys(path)
    for name, want in tensors.items():
        assert same_bits(ours[name], want), name
    assert C.checkpoint_metadata(path) == {"format": "pt", "note": "written by safetensors"}
    # The reference keeps every tensor aligned, so every non-empty one is a view of the mapping.
    assert all(C.is_zero_copy(path, n) for n, t in tensors.items() if t.numel())


def test_safetensors_reads_files_written_by_anvil_and_bytes_match(tmp_path):
    tensors = all_dtypes_dict(2)
    ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    C.save_safetensors(ours, list(tensors.items()), {"format": "pt"})
    back = load_file(ours)
    assert sorted(back) == sorted(tensors)
    for name, want in tensors.items():
        assert same_bits(back[name], want), name
    with safe_open(ours, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    save_file(tensors, theirs, metadata={"format": "pt"})
    assert open(ours, "rb").read() == open(theirs, "rb").read(), "header or layout differs from the reference writer"


def test_empty_and_metadata_only_files_match_the_reference(tmp_path):
    for meta in (None, {"format": "pt"}):
        ours, theirs = str(tmp_path / "o.safetensors"), str(tmp_path / "t.safetensors")
        C.save_safetensors(ours, [], meta or {})
        save_file({}, theirs, metadata=meta)
        assert open(ours, "rb").read() == open(theirs, "rb").read()
        assert load_file(ours) == {}


def test_non_contiguous_inputs_are_written_as_their_values(tmp_path):
    base = torch.randn(6, 8)
    path = str(tmp_path / "s.safetensors")
    C.save_safetensors(path, [("t", base.t()), ("s", base[:, 1::2])])
    back = load_file(path)
    assert torch.equal(back["t"], base.t()) and torch.equal(back["s"], base[:, 1::2])


def tiny_llama(layers=3):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers, transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_loads_sharded_directories_from_save_pretrained(tmp_path):
    _, model = tiny_llama()
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    state = model.state_dict()
    ours = C.load_checkpoint(str(tmp_path))
    assert sorted(ours) == sorted(state) == C.checkpoint_keys(str(tmp_path))
    for name, want in state.items():
        assert same_bits(ours[name], want), name
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert C.checkpoint_metadata(str(tmp_path))["total_size"] == str(index["metadata"]["total_size"])


def test_from_pretrained_loads_directories_written_by_anvil(tmp_path):
    transformers, model = tiny_llama()
    model.config.save_pretrained(str(tmp_path))
    state = model.state_dict()
    C.save_checkpoint(str(tmp_path), list(state.items()), 20_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert set(index["weight_map"]) == set(state)
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, want in state.items():
        assert same_bits(loaded.state_dict()[name], want), name
    # Shards as huggingface_hub splits them: the same file names for the same bound.
    ref_dir = tmp_path / "ref"
    model.save_pretrained(str(ref_dir), max_shard_size=20_000)
    ref_index = json.load(open(ref_dir / "model.safetensors.index.json"))
    assert ref_index["weight_map"] == index["weight_map"]


def test_malformed_files_raise_naming_the_rule(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(RuntimeError, match=r"is 8 bytes but data_offsets \[0, 4\] span 4"):
        C.load_checkpoint(str(path))
    with pytest.raises(RuntimeError, match="no such file or directory"):
        C.load_checkpoint(str(tmp_path / "missing"))


def test_failed_write_leaves_no_partial_file(tmp_path):
    """A write that fails midway (the file-size limit reached after a few KB) leaves neither the target
    nor the temporary file, and an existing target is untouched."""
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old contents")
    script = textwrap.dedent(f"""
        import resource, signal, torch, anvil
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            anvil._C.save_safetensors({str(target)!r}, [("w", torch.randn(1 << 16))])
        except RuntimeError as e:
            print("ERROR", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert "ERROR" in out.stdout and "cannot write" in out.stdout, out.stdout + out.stderr
    assert str(target) in out.stdout
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["model.safetensors"]
    with pytest.raises(RuntimeError, match="no safetensors equivalent"):
        C.save_safetensors(str(tmp_path / "new.safetensors"), [("x", torch.ones(2, dtype=torch.complex128))])
    assert os.listdir(tmp_path) == ["model.safetensors"]


@pytest.mark.cuda
def test_load_all_to_cuda_equals_safetensors(tmp_path):
    _, model = tiny_llama()
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    ours = C.load_checkpoint(str(tmp_path), "cuda")
    for name, want in model.state_dict().items():
        assert ours[name].is_cuda and same_bits(ours[name].cpu(), want), name


def anvil_binary():
    return anvil.executable()  # the build tree's bin/anvil, or the installed wheel's


def run_cli(*args, env=None):
    return subprocess.run([anvil_binary(), *args], capture_output=True, text=True, env=env or os.environ)


def test_inspect_lists_what_safetensors_sees(tmp_path):
    tensors = all_dtypes_dict(3)
    path = str(tmp_path / "ref.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    out = run_cli("inspect", path, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    with safe_open(path, framework="pt") as f:
        assert {t["name"] for t in report["tensors"]} == set(f.keys())
        for t in report["tensors"]:
            s = f.get_slice(t["name"])
            assert t["dtype"] == s.get_dtype() and t["shape"] == s.get_shape(), t
            assert t["bytes"] == tensors[t["name"]].numel() * tensors[t["name"]].element_size()
        assert report["metadata"] == f.metadata()
    assert report["total"]["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert report["total"]["tensors"] == len(tensors)
    text = run_cli("inspect", path)
    assert text.returncode == 0 and "F8_E4M3" in text.stdout and "F8_E8M0" in text.stdout
    assert f"total: {len(tensors)} tensors" in text.stdout and "format: pt" in text.stdout


def test_inspect_resolves_hub_ids_in_the_local_cache(tmp_path, monkeypatch):
    _, model = tiny_llama(layers=11)  # layers.10 must come after layers.2 (natural order)
    repo = tmp_path / "hub" / "models--org--tiny-llama"
    snapshot = repo / "snapshots" / "abc123"
    model.save_pretrained(str(tmp_path / "saved"), max_shard_size="20KB")
    # The cache's layout: files in blobs/, the snapshot holds relative symlinks to them.
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(tmp_path / "saved"))):
        os.rename(tmp_path / "saved" / name, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert C.resolve_model_path("org/tiny-llama") == str(snapshot)
    ours = C.load_checkpoint(C.resolve_model_path("org/tiny-llama"))
    for name, want in model.state_dict().items():
        assert same_bits(ours[name], want), name
    out = run_cli("inspect", "org/tiny-llama", "--json", env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["path"] == str(snapshot) and len(report["files"]) > 2
    assert {t["name"] for t in report["tensors"]} == set(model.state_dict())
    names = [t["name"] for t in report["tensors"]]
    assert names == sorted(names, key=lambda s: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)])
    assert names.index("model.layers.2.mlp.up_proj.weight") < names.index("model.layers.10.mlp.up_proj.weight")
    missing = run_cli("inspect", "org/absent", env=env)
    assert missing.returncode == 1 and "models--org--absent" in missing.stderr and "nothing is downloaded" in missing.stderr


def test_inspect_reports_broken_files_without_a_backtrace(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"abc")
    out = run_cli("inspect", str(path))
    assert out.returncode == 1
    assert "not contiguous" in out.stderr and "(overlap)" in out.stderr and "Exception raised from" not in out.stderr
