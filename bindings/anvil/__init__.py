"""anvil: LLM adaptation ops and pipelines, from Python.

``import anvil`` loads the operator library, after which every op is ``torch.ops.anvil.<name>``
(dispatcher ops: autograd, torch.compile, FakeTensor and opcheck work on them). The C++ core
(self-check, and the pipelines as they land) is ``anvil._C``.
"""
import os as _os

import torch as _torch

_here = _os.path.dirname(_os.path.abspath(__file__))
_torch.ops.load_library(_os.path.join(_here, "libanvil_ops.so"))

try:  # the C++ core; absent when the build found no Python headers (the ops above still work)
    from . import _C  # noqa: E402  (needs the op library loaded first)
except ImportError as _e:  # pragma: no cover
    _C = None
    _C_error = _e

ops = _torch.ops.anvil

quantize_fp8 = ops.quantize_fp8
dequantize_fp8 = ops.dequantize_fp8
quantize_int8 = ops.quantize_int8
dequantize_int8 = ops.dequantize_int8

GRANULARITIES = ("tensor", "row", "block1x128", "block128x128")

fp8_gemm = ops.fp8_gemm
fp8_grouped_gemm = ops.fp8_grouped_gemm
fp8_grouped_gemm_masked = ops.fp8_grouped_gemm_masked
fp8_linear = ops.fp8_linear
int8_gemm = ops.int8_gemm  # docs/FORMATS.md, "INT8 GEMM"

sparse_attention = ops.sparse_attention  # docs/FORMATS.md, "Sparse attention"
select_blocks = ops.select_blocks


from . import nn  # noqa: E402  (anvil.nn: modules over the fused ops; needs the op library loaded)
from .nn import Fp8Linear  # noqa: E402,F401  (kept as anvil.Fp8Linear)
from .patching import PatchReport, patch  # noqa: E402,F401  (anvil.patch(model): the kernels into a transformers model)


def selfcheck(cuda: bool = True) -> str:
    """Runs the op self-check (as ``anvil selfcheck``) and returns its table."""
    if _C is None:
        raise ImportError(f"anvil._C was not built: {_C_error}")
    return _C.format_selfcheck(cuda)


__all__ = ["ops", "quantize_fp8", "dequantize_fp8", "quantize_int8", "dequantize_int8", "GRANULARITIES", "selfcheck",
           "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_gemm_masked", "fp8_linear", "Fp8Linear", "fp8_gemm_configs",
           "fp8_gemm_config", "int8_gemm", "int8_gemm_path", "nn", "patch", "PatchReport"]


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
