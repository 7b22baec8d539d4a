"""anvil: LLM adaptation ops and pipelines, from Python.

``import anvil`` loads the operator library, after which every op is ``torch.ops.anvil.<name>``
(dispatcher ops: autograd, torch.compile, FakeTensor and opcheck work on them). The C++ core
(self-check, and the pipelines as they land) is ``anvil._C``.
"""
import os as _os

import torch as _torch

from . import _build_info  # written by CMake beside the libraries (bindings/_build_info.py.in)

__version__ = _build_info.version


def _check_torch():
    """The libraries are compiled against one torch (its C++ ABI and CUDA runtime): any other would fail to
    load or, worse, load and crash, so a mismatch stops the import with the fix."""
    have, have_cuda = _torch.__version__, _torch.version.cuda
    if have == _build_info.torch_version and have_cuda == _build_info.torch_cuda:
        return
    raise ImportError(
        f"anvil {__version__} was built for torch {_build_info.torch_version} "
        f"(CUDA {_build_info.torch_cuda or 'none'}), but this Python imports torch {have} "
        f"(CUDA {have_cuda or 'none'}) from {_os.path.dirname(_torch.__file__)}: install "
        f"torch=={_build_info.torch_version.split('+')[0]} with CUDA {_build_info.torch_cuda or 'none'}, or rebuild "
        f"anvil against this torch (pip install . --no-build-isolation; docs/PYTHON.md, \"Install\")")


_check_torch()


def _package_file(name):
    # An editable install (pip install -e .) splits the package: the .py files stay in bindings/anvil, the
    # built files are installed in site-packages; __path__ lists both (the install tree first).
    for d in __path__:
        if _os.path.exists(_os.path.join(d, name)):
            return _os.path.join(d, name)
    raise ImportError(f"anvil: {name} is not in the package ({', '.join(__path__)}): build it first "
                      "(scripts/setup.sh, or pip install .)")


_here = _os.path.dirname(_package_file("libanvil_ops.so"))
_torch.ops.load_library(_os.path.join(_here, "libanvil_ops.so"))

try:  # the C++ core; absent when the build found no Python headers (the ops above still work)
    from . import _C  # noqa: E402  (needs the op library loaded first)
except ImportError as _e:  # pragma: no cover
    _C = None
    _C_error = _e

from . import ops  # noqa: E402  (typed wrappers of every torch.ops.anvil.* op; needs the op library loaded)
from .ops import (dequantize_fp8, dequantize_int8, fp8_gemm, fp8_grouped_gemm,  # noqa: E402,F401
                  fp8_grouped_gemm_masked, fp8_linear, int8_gemm, quantize_fp8, quantize_int8, select_blocks,
                  sparse_attention)

GRANULARITIES = ("tensor", "row", "block1x128", "block128x128")

from . import nn  # noqa: E402  (anvil.nn: modules over the fused ops; needs the op library loaded)
from .nn import Fp8Linear  # noqa: E402,F401  (kept as anvil.Fp8Linear)
from .patching import PatchReport, patch  # noqa: E402,F401  (anvil.patch(model): the kernels into a transformers model)

if _C is not None:  # the pipelines: the recipes of the command line, in this process (anvil/pipelines.py)
    from . import pipelines  # noqa: E402
    from .pipelines import RunError, RunResult, distill, lora, quantize, recipes, train  # noqa: E402,F401


def build_info() -> dict:
    """What this build is: ``version``, ``torch_version`` and ``torch_cuda`` (the torch it compiled against and
    that torch's CUDA), ``cuda_kernels`` (anvil's CUDA kernels compiled in), ``nvcc_version``, ``cuda_archs``,
    ``sm90a_kernels``, ``python_version``, ``build_type``, ``cxx_compiler``."""
    return {k: v for k, v in vars(_build_info).items() if not k.startswith("_")}


def executable() -> str:
    """The path of the ``anvil`` command line built with this package: ``<build>/bin/anvil`` beside a build tree's
    ``<build>/python/anvil``, else the one the wheel installed in the environment's scripts folder."""
    import shutil
    import sysconfig
    build_tree = _os.path.normpath(_os.path.join(_here, "..", "..", "bin", "anvil"))
    for path in (build_tree, _os.path.join(sysconfig.get_path("scripts"), "anvil")):
        if _os.access(path, _os.X_OK):
            return path
    found = shutil.which("anvil")
    if found is None:
        raise FileNotFoundError(f"anvil: no `anvil` executable beside the package ({build_tree}) or in "
                                f"{sysconfig.get_path('scripts')} or on PATH")
    return found


def selfcheck(cuda: bool = True, check: bool = True) -> str:
    """Runs the op self-check (as ``anvil selfcheck``: every registered op on random data against its reference,
    on the CPU and, with ``cuda`` and a GPU, on CUDA) and returns its table. With ``check``, a failed op or one
    the self-check has no case for raises RuntimeError with the table."""
    if _C is None:
        raise ImportError(f"anvil._C was not built: {_C_error}")
    table = _C.format_selfcheck(cuda)
    # Rows are "op device status ms detail"; the header, the rule and the count line have no such status.
    bad = [line for line in table.splitlines() if len(line.split()) >= 3 and line.split()[2] in ("FAIL", "unchecked")]
    if check and bad:
        raise RuntimeError(f"anvil self-check: {len(bad)} op(s) failed or unchecked:\n{table}")
    return table


__all__ = ["__version__", "build_info", "executable", "ops", "quantize_fp8", "dequantize_fp8", "quantize_int8", "dequantize_int8", "GRANULARITIES", "selfcheck",
           "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_gemm_masked", "fp8_linear", "Fp8Linear", "fp8_gemm_configs",
           "fp8_gemm_config", "int8_gemm", "int8_gemm_path", "nn", "patch", "PatchReport",
           "pipelines", "lora", "train", "distill", "quantize", "recipes", "RunResult", "RunError"]


def fp8_gemm_configs():
    """The sm_90a configurations compiled into this build ("name:dtype"), and fp8_gemm's choice for a problem:
    ``anvil.fp8_gemm_config(m, n, k)`` ("" when the fallback runs). ANVIL_FP8_GEMM_CONFIG=<name> forces one."""
    if _C is None:
        raise ImportError(f"anvil._C was not built: {_C_error}")
    return _C.fp8_gemm_configs()


def fp8_gemm_config(m, n, k, out_dtype=_torch.bfloat16):
    """The configuration fp8_gemm runs for (m, n, k) on the current device ("" when the fallback runs)."""
    if _C is None:
        raise ImportError(f"anvil._C was not built: {_C_error}")
    return _C.fp8_gemm_config(m, n, k, str(out_dtype).replace("torch.", ""))


def int8_gemm_path(m, n, k, out_dtype=_torch.bfloat16):
    """The path int8_gemm takes for (m, n, k) on the current device: "sm90" (the fused CUTLASS kernel), "int_mm"
    (cuBLASLt int32 + epilogue), "simt", or "cpu" without CUDA. ANVIL_INT8_GEMM_PATH=<path> forces one."""
    if _C is None:
        raise ImportError(f"anvil._C was not built: {_C_error}")
    return _C.int8_gemm_path(m, n, k, str(out_dtype).replace("torch.", ""))
