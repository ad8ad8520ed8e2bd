import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# the tests run on the random zoo (`tiny`) unless they name a profile; the embedded default (`world`, the trained
# world models) is what `make demo` runs, tested by name in tests/e2e/test_world_default.py
os.environ.setdefault("PREFMILL_PROFILE", "tiny")

import labelers  # noqa: E402,F401  (installs the torchvision compat shim before any test imports transformers)
import pytest  # noqa: E402


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no CUDA
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
