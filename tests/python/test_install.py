"""The package as pip installs it (pyproject.toml, cmake/AnvilInstall.cmake; docs/PYTHON.md "Install"):
version and build info, the refusal of a torch it was not built for, the self-check from any folder, the
`anvil` executable, $ORIGIN-relative RPATHs, and the wheel's metadata.

scripts/test.sh runs the whole Python suite against the wheel installed into a fresh venv and sets
ANVIL_EXPECT_INSTALLED=1 there: then the tests below also check that the package really is the installed one
(not the build tree) and that nothing in it points at the build machine.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import anvil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PKG = os.path.dirname(os.path.abspath(anvil.__file__))
INSTALLED = os.environ.get("ANVIL_EXPECT_INSTALLED") == "1"


def _project_version():
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        return re.search(r"project\(anvil VERSION ([0-9.]+)", f.read()).group(1)


def _clean_env():
    """The environment of a user's shell: no PYTHONPATH (the build tree) and no test variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ANVIL_EXPECT_INSTALLED")}
    return env


def test_version_and_build_info():
    assert anvil.__version__ == _project_version()
    info = anvil.build_info()
    assert info["version"] == anvil.__version__
    assert info["torch_version"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert isinstance(info["cuda_kernels"], bool) and isinstance(info["sm90a_kernels"], bool)
    if info["cuda_kernels"]:
        assert info["nvcc_version"] and info["cuda_archs"]
    else:
        assert info["cuda_archs"] == "" and not info["sm90a_kernels"]


def test_the_cli_reports_the_same_version():
    out = subprocess.run([anvil.executable(), "version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"anvil {anvil.__version__} (torch "), out


def _fake_package(tmp_path, torch_version, torch_cuda):
    """A copy of the package (its .py files; the libraries linked) whose _build_info records another torch."""
    dst = tmp_path / "anvil"
    dst.mkdir()
    for name in os.listdir(PKG):
        src = os.path.join(PKG, name)
        if name.endswith(".py"):
            shutil.copy(src, dst / name)
        elif name.endswith(".so"):
            os.symlink(src, dst / name)
    info = (dst / "_build_info.py").read_text()
    info = re.sub(r'^torch_version = "[^"]*"', f'torch_version = "{torch_version}"', info, flags=re.M)
    info = re.sub(r'^torch_cuda = "[^"]*"', f'torch_cuda = "{torch_cuda}"', info, flags=re.M)
    (dst / "_build_info.py").write_text(info)
    return tmp_path


@pytest.mark.parametrize("fake_version,fake_cuda", [("2.10.0+cu128", "12.8"), (torch.__version__, "12.6")])
def test_a_torch_other_than_the_built_one_is_a_clear_import_error(tmp_path, fake_version, fake_cuda):
    root = _fake_package(tmp_path, fake_version, fake_cuda)
    env = _clean_env()
    env["PYTHONPATH"] = str(root)
    # One process: the import's error, then whether anything of anvil got registered before it.
    code = ("import torch\ntry:\n    import anvil\nexcept ImportError as e:\n    print('ImportError:', e)\n"
            "print('registered:', hasattr(torch.ops.anvil, 'rms_norm'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    err, registered = r.stdout.strip().splitlines()
    assert err.startswith("ImportError: anvil "), r.stdout
    assert f"was built for torch {fake_version} (CUDA {fake_cuda})" in err, err
    assert f"this Python imports torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})" in err, err
    assert f"install torch=={fake_version.split('+')[0]}" in err and "rebuild" in err, err
    # The check runs before the op library is loaded: nothing of anvil is registered in that process.
    assert registered == "registered: False", r.stdout


def test_the_unchanged_copy_imports(tmp_path):
    """The copy above with the true record imports: the error is the record's doing, not the copy's."""
    root = _fake_package(tmp_path, torch.__version__, torch.version.cuda)
    env = _clean_env()
    env["PYTHONPATH"] = str(root)
    r = subprocess.run([sys.executable, "-c", "import anvil; print(anvil.__file__)"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(root))


def test_selfcheck_from_another_folder(tmp_path):
    env = _clean_env()
    if not INSTALLED:  # the build tree's package, by an absolute path (the folder changes)
        env["PYTHONPATH"] = os.path.dirname(PKG)
    r = subprocess.run([sys.executable, "-c", "import anvil; print(anvil.selfcheck(cuda=False)); print(anvil.__file__)"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\d+ ok, 0 failed, \d+ skipped or unchecked$", r.stdout, re.M), r.stdout
    assert os.path.dirname(r.stdout.strip().splitlines()[-1]) == PKG


def test_the_executable_runs_from_another_folder(tmp_path):
    exe = anvil.executable()
    r = subprocess.run([exe, "ops"], capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "anvil::rms_norm(Tensor x, Tensor weight, float eps)" in r.stdout


def _runpath(path):
    if shutil.which("readelf") is None:
        pytest.skip("readelf not available")
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]", out)
    return m.group(1).split(":") if m else []


@pytest.mark.skipif(not INSTALLED, reason="checks of the installed wheel (scripts/test.sh sets ANVIL_EXPECT_INSTALLED)")
def test_the_installed_package_is_the_one_under_test():
    site = sysconfig.get_paths()["platlib"]
    assert PKG == os.path.join(site, "anvil"), f"anvil imported from {PKG}, not the venv's {site}"
    assert not os.path.exists(os.path.join(PKG, "..", "..", "CMakeCache.txt"))
    exe = anvil.executable()
    assert exe == os.path.join(sysconfig.get_path("scripts"), "anvil")
    import importlib.metadata as md
    dist = md.distribution("anvil")
    assert dist.version == anvil.__version__
    assert sorted(dist.metadata["Requires-Python"].split(",")) == ["<3.15", ">=3.10"]
    assert "torch==2.11.0" in dist.requires
    classifiers = dist.metadata.get_all("Classifier")
    assert f"Programming Language :: Python :: {sys.version_info.major}.{sys.version_info.minor}" in classifiers
    files = {str(f) for f in dist.files}
    for name in ("anvil/__init__.py", "anvil/ops.py", "anvil/_C.pyi", "anvil/py.typed", "anvil/_build_info.py",
                 "anvil/libanvil_ops.so", "anvil/libanvil_core.so"):
        assert name in files, f"{name} is not in the wheel"


@pytest.mark.skipif(not INSTALLED, reason="checks of the installed wheel (scripts/test.sh sets ANVIL_EXPECT_INSTALLED)")
def test_installed_files_find_torch_and_each_other_relative_to_themselves():
    libs = sorted(f for f in os.listdir(PKG) if f.endswith(".so"))
    assert "libanvil_ops.so" in libs and any(f.startswith("_C.") for f in libs)
    for lib in libs + ["../../../../bin/anvil"]:
        path = os.path.normpath(os.path.join(PKG, lib))
        entries = _runpath(path)
        assert entries, f"{path} has no RUNPATH"
        assert all(e.startswith("$ORIGIN") for e in entries), f"{path}: RUNPATH {entries} points outside the install"
    # And the loader resolves every anvil and torch library through them (ldd from another folder).
    if shutil.which("ldd"):
        for path in (os.path.join(PKG, "libanvil_core.so"), anvil.executable()):
            out = subprocess.run(["ldd", path], capture_output=True, text=True, cwd="/").stdout
            assert "not found" not in out, out


def test_pyproject_pins_the_torch_of_requirements():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        torch_pin = next(line.strip() for line in f if line.startswith("torch=="))
    assert torch_pin in meta["build-system"]["requires"]
    assert meta["project"]["dependencies"] == [torch_pin]
    assert torch.__version__.split("+")[0] == torch_pin.split("==")[1]
    lo, hi = re.match(r">=3\.(\d+),<3\.(\d+)", meta["project"]["requires-python"]).groups()
    listed = sorted(int(c.rsplit(".", 1)[1]) for c in meta["project"]["classifiers"]
                    if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert listed == list(range(int(lo), int(hi))), "classifiers and requires-python disagree"
