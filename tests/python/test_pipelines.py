"""The pipelines from Python (anvil/pipelines.py over bindings/pipelines.cpp and recipes/registry.h):

  (a) anvil.lora on the embedded demo gives the loss curve, gradient norms and validation loss the `anvil lora`
      command line gives for the same config (the same C++ run: equal up to fp32 noise), and its progress
      callback sees every logged step;
  (b) anvil.distill and anvil.quantize run their demos and return the metrics / report the CLI writes;
  (c) a bad key is a ValueError naming it; a non-finite run is a RunError with the CLI's advice; an exception in
      the progress callback stops the run and arrives as itself; a dry run trains nothing;
  (d) an installed wheel carries the demos' files, so the demo configs resolve to files inside the package.
"""
import json
import os
import subprocess

import pytest

import anvil

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# The lora demo, cut down: 4 steps of 4 rows of 64 tokens, validation at step 2 and at the end.
SMALL = {"train.steps": 4, "train.batch_size": 4, "data.seq_len": 64, "eval.every": 2, "eval.max_batches": 2,
         "eval.prompts": [], "output.log_every": 1, "output.plot": False}


def anvil_binary():
    path = anvil.executable()
    return path


def with_dir(overrides, out):
    return dict(overrides, **{"output.dir": str(out)})


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # The CLI subprocess runs with OMP_NUM_THREADS=1; the in-process run must add in the same order.
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_recipes_are_the_command_lines():
    assert anvil.recipes() == ["lora", "train", "distill", "quantize"]


def test_lora_from_python_equals_the_command_line(tmp_path):
    seen = []
    result = anvil.lora(overrides=with_dir(SMALL, tmp_path / "py"), progress=seen.append)
    assert result.status == "finished" and result.out_dir == str(tmp_path / "py")
    assert [s["step"] for s in seen] == [1, 2, 3, 4] and seen == result.steps
    assert all(s["total_steps"] == 4 and s["tokens_per_s"] > 0 and s["tokens"] > 0 for s in seen)
    assert os.path.exists(os.path.join(result.out_dir, "adapter", "adapter_model.safetensors"))
    assert result.config["train"]["steps"] == 4 and result.config["lora"]["r"] == 16  # resolved: the demo's r

    cli = str(tmp_path / "cli")
    args = [anvil_binary(), "lora", *[f"--{k}={json.dumps(v)}" for k, v in with_dir(SMALL, cli).items()]]
    r = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(cli, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    train_cli = [l for l in lines if "loss" in l]
    train_py = [m for m in result.metrics if "loss" in m]
    assert len(train_py) == len(train_cli) == 4
    for a, b in zip(train_py, train_cli):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    val_cli = [l["val_loss"] for l in lines if "val_loss" in l]
    assert len(result.val_losses) == len(val_cli) == 3  # step 0, step 2, the end
    assert result.val_losses == pytest.approx(val_cli, rel=1e-6)
    for s, m in zip(seen, train_py):  # the callback saw what metrics.jsonl holds
        assert s["loss"] == pytest.approx(m["loss"], rel=1e-9)


def test_distill_and_quantize_demos_from_python(tmp_path):
    small = {"train.steps": 2, "train.batch_size": 4, "data.seq_len": 64, "eval.every": 0, "eval.max_batches": 2,
             "eval.prompts": [], "output.log_every": 1, "output.plot": False}
    d = anvil.distill(overrides=with_dir(small, tmp_path / "distill"))
    assert [s["step"] for s in d.steps] == [1, 2]
    assert all("kd" in s for s in d.steps), d.steps[0]  # the loss's terms arrive by name
    assert d.metrics[-1].get("val_kl", 0) > 0 and len(d.val_losses) == 1
    assert os.path.exists(os.path.join(d.out_dir, "model", "config.json"))

    q = anvil.quantize(overrides={"output.dir": str(tmp_path / "q"), "data.calib_samples": 4,
                                  "data.eval_max_tokens": 2048})
    assert q.report is not None and q.report["scheme"] == "fp8-channel"
    assert q.report["eval"]["tokens"] > 0 and q.metrics == [] and q.steps == []
    with open(os.path.join(q.out_dir, "config.json")) as f:
        assert "quantization_config" in json.load(f)


def test_a_config_dict_or_file_and_its_errors(tmp_path):
    with open(os.path.join(ROOT, "examples/tiny/lora.json")) as f:
        demo = json.load(f)
    demo["model"]["path"] = os.path.join(ROOT, demo["model"]["path"])
    for k in ("train", "validation"):
        demo["data"][k] = os.path.join(ROOT, demo["data"][k])
    resolved = anvil.pipelines.resolve_config("lora", demo, {"train.lr": 1e-3})
    assert resolved["train"]["lr"] == 1e-3 and resolved["train"]["warmup_steps"] == 5
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(demo))
    assert anvil.pipelines.resolve_config("lora", str(path))["lora"]["alpha"] == 32

    with pytest.raises(ValueError, match="train.lrr"):
        anvil.lora(demo, overrides={"train.lrr": 1})
    with pytest.raises(ValueError, match="no such recipe"):
        anvil.pipelines.run("lorax")
    with pytest.raises(ValueError, match="'steps'.*section.key"):
        anvil.lora(overrides={"steps": 3})
    with pytest.raises(TypeError, match="config must be a dict"):
        anvil.lora(42)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        anvil.lora(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="a config is required|no embedded demo"):
        anvil.train()
    with pytest.raises(TypeError, match="progress must be callable"):
        anvil.lora(progress=3)


def test_failures_arrive_as_exceptions(tmp_path):
    # A learning rate no run survives: the loss is not finite by step 2; the message is the CLI's.
    with pytest.raises(anvil.RunError, match="lower train.lr") as e:
        anvil.lora(overrides=with_dir(dict(SMALL, **{"train.lr": 1e30, "train.max_grad_norm": 0.0,
                                                     "train.warmup_steps": 0, "eval.every": 0}),
                                      tmp_path / "nan"))
    assert e.value.result.steps == [] or all(s["step"] < 4 for s in e.value.result.steps)

    class Stop(Exception):
        pass

    def stop_at_2(report):
        if report["step"] == 2:
            raise Stop("enough")

    with pytest.raises(Stop, match="enough"):
        anvil.lora(overrides=with_dir(SMALL, tmp_path / "stop"), progress=stop_at_2)
    with open(tmp_path / "stop" / "metrics.jsonl") as f:
        assert max(json.loads(l).get("step", 0) for l in f if l.strip()) == 2

    dry = anvil.lora(overrides=with_dir(SMALL, tmp_path / "dry"), dry_run=True)
    assert dry.status == "dry-run" and dry.steps == [] and not os.path.exists(tmp_path / "dry" / "metrics.jsonl")


def test_the_wheel_carries_the_demos():
    pkg = os.path.dirname(anvil.__file__)
    demo = os.path.join(pkg, "demo")
    if not os.path.isdir(demo):
        pytest.skip("anvil is imported from a build tree (the wheel's install step copies the demos)")
    for name in ("lora.json", "distill.json", "quantize.json", "base/config.json", "data/foldoc_train.jsonl"):
        assert os.path.exists(os.path.join(demo, "examples", "tiny", name)), name
    cfg = json.loads(anvil._C.resolve_recipe_config("lora", "", [], demo))
    assert cfg["model"]["path"] == os.path.join(demo, "examples/tiny/base")
    assert cfg["data"]["train"].startswith(os.path.join(demo, "examples/tiny/data"))
