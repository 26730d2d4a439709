"""The device of the device-dependent model tests (marked `device`): OSSNET_TEST_DEVICE, default cpu.

`benchmarks/gpu.sh` runs them on a GPU: `OSSNET_TEST_DEVICE=cuda pytest -m device tests/models`.
"""

import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs on OSSNET_TEST_DEVICE (cpu unless set; gpu.sh: cuda)")


def pytest_collection_modifyitems(items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device() -> torch.device:
    name = os.environ.get("OSSNET_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"OSSNET_TEST_DEVICE={name}, but torch sees no CUDA device")
    return torch.device(name)
