"""`--device` names a device this machine has, once; torchrun processes each take their own GPU."""

import os
import subprocess
import sys

import pytest
import torch

from ossnet.device import check_memory, resolve_device
from ossnet.errors import OssnetError


def test_auto_and_cpu_resolve_to_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["foo", "cuda:x", "mps", ""])
def test_unknown_devices_are_refused(spec):
    with pytest.raises(OssnetError):
        resolve_device(spec)


def test_an_explicit_gpu_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(OssnetError, match="every process on GPU 0"):
        resolve_device("cuda:0")


def test_cuda_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OssnetError, match="no CUDA device"):
        resolve_device("cuda")


def test_a_request_beyond_the_available_memory_is_refused_with_the_figure():
    check_memory(1, "one byte")
    with pytest.raises(OssnetError, match="GiB"):
        check_memory(2**60, "an exbibyte")


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_ossnet_lets_idle_openmp_threads_sleep_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    out = subprocess.run([sys.executable, "-c", "import ossnet, os; print(os.environ['OMP_WAIT_POLICY'])"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected
