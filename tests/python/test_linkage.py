"""The libraries link the process's libstdc++ dynamically. A toolchain that links it statically into a
shared library (as the GPU image's /opt/gcc g++ does) gives the process two copies of the iostream
machinery, and formatting an error message then crashes (docs/GPU.md)."""
import os
import shutil
import subprocess

import pytest

import anvil


@pytest.mark.build
@pytest.mark.parametrize("lib", ["libanvil_ops.so", "libanvil_core.so"])
def test_libstdcxx_is_a_shared_dependency(lib):
    if shutil.which("readelf") is None:
        pytest.skip("readelf not available")
    path = os.path.join(os.path.dirname(anvil.__file__), lib)
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in dynamic, f"{lib} does not list libstdc++.so as NEEDED: statically linked libstdc++?"
