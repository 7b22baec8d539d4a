import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; scripts/gpu-test.sh runs them)")
    config.addinivalue_line("markers", "build: checks of how the libraries were built (run everywhere, GPU machine too)")
    config.addinivalue_line("markers", "slow: over a minute on the 2-core CI machine (still run by scripts/test.sh; "
                                       "-m 'not slow' skips them)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
