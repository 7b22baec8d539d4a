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


def selfcheck(cuda: bool = True) -> str:
    """Runs the op self-check (as ``anvil selfcheck``) and returns its table."""
    if _C is None:
        raise ImportError(f"anvil._C was not built: {_C_error}")
    return _C.format_selfcheck(cuda)


__all__ = ["ops", "quantize_fp8", "dequantize_fp8", "quantize_int8", "dequantize_int8", "GRANULARITIES", "selfcheck"]
