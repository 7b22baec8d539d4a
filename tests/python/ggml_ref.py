"""ggml's own reference quantizers, compiled from ggml-quants.c at test time, as a byte-exact oracle.

gguf-py 0.19 quantizes Q8_0/Q4_0/Q5_0/Q5_1 but only dequantizes the K types, and llama.cpp has no wheel, so
the test compiles ggml-quants.c alone (with four tiny stubs for the ggml.c functions it links against) into a
shared library and calls quantize_row_*_ref through ctypes: the functions llama-quantize runs without an
importance matrix. The sources come from ANVIL_GGML_SRC: a ggml or llama.cpp checkout, the extracted
llama-cpp-python sdist (its vendor/llama.cpp), or a folder holding ggml-quants.c with the headers it includes.
Without it the byte-exact tests skip (tests/python/README or docs/FORMATS.md "GGUF export" say how to get one);
the other K-quant tests do not need it.

Compiled with -O2 -ffp-contract=off, as anvil's quantizer is: the x86-64 baseline has no FMA, and the flag keeps
it so under -march=native.
"""

import ctypes
import os
import shutil
import subprocess
import tempfile

import numpy as np

_STUBS = r"""
#include <stddef.h>
#include <stdlib.h>
void ggml_abort(const char * file, int line, const char * fmt, ...) { (void)file; (void)line; (void)fmt; abort(); }
size_t ggml_row_size(int type, long long ne) { (void)type; (void)ne; abort(); }
const char * ggml_type_name(int type) { (void)type; return "?"; }
size_t ggml_type_size(int type) { (void)type; abort(); }
"""

_CANDIDATES = ("ggml-quants.c", "src/ggml-quants.c", "ggml/src/ggml-quants.c", "vendor/llama.cpp/ggml/src/ggml-quants.c")

# (ggml type name) -> (ref function, elements per block, bytes per block)
FUNCS = {
    "Q4_K": ("quantize_row_q4_K_ref", 256, 144),
    "Q5_K": ("quantize_row_q5_K_ref", 256, 176),
    "Q6_K": ("quantize_row_q6_K_ref", 256, 210),
    "Q5_0": ("quantize_row_q5_0_ref", 32, 22),
    "Q5_1": ("quantize_row_q5_1_ref", 32, 24),
    "Q4_0": ("quantize_row_q4_0_ref", 32, 18),
    "Q8_0": ("quantize_row_q8_0_ref", 32, 34),
}

_lib = None


def find_source():
    root = os.environ.get("ANVIL_GGML_SRC", "")
    if not root:
        return None
    for c in _CANDIDATES:
        p = os.path.join(root, c)
        if os.path.isfile(p):
            return p
    return None


def load():
    """The compiled library, or None (no ANVIL_GGML_SRC, no compiler)."""
    global _lib
    if _lib is not None:
        return _lib
    src = find_source()
    cc = shutil.which("gcc") or shutil.which("cc")
    if src is None or cc is None:
        return None
    sdir = os.path.dirname(src)
    incs = [sdir, os.path.join(sdir, "..", "include"), os.path.join(sdir, "include")]
    out = tempfile.mkdtemp(prefix="ggml_ref_")
    stubs = os.path.join(out, "stubs.c")
    with open(stubs, "w") as f:
        f.write(_STUBS)
    so = os.path.join(out, "libggml_ref.so")
    cmd = [cc, "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-w", "-DNDEBUG", src, stubs, "-o", so, "-lm"]
    for i in incs:
        cmd[1:1] = ["-I", i]
    subprocess.run(cmd, check=True, capture_output=True)
    _lib = ctypes.CDLL(so)
    return _lib


def quantize(x, type_name):
    """x (float32 array whose size is a multiple of the block) -> ggml's bytes of `type_name` (uint8)."""
    lib = load()
    fn_name, block, nbytes = FUNCS[type_name]
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    assert x.size % block == 0
    out = np.zeros(x.size // block * nbytes, dtype=np.uint8)
    fn = getattr(lib, fn_name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    fn(x.ctypes.data, out.ctypes.data, ctypes.c_int64(x.size))
    return out
