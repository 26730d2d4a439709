"""Training checkpoints: random generator states, and a run folder is never silently overwritten."""

import io
import random

import numpy as np
import pytest
import torch

from ossnet.errors import CheckpointError, OssnetError
from ossnet.training.checkpoints import capture_rng_state, check_run_dir, restore_rng_state


def draws() -> tuple:
    return torch.rand(3), np.random.rand(3), random.random()


def test_rng_states_survive_a_weights_only_round_trip():
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    expected = draws()
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))
    again = draws()
    torch.testing.assert_close(again[0], expected[0])
    np.testing.assert_array_equal(again[1], expected[1])
    assert again[2] == expected[2]


def test_a_run_folder_with_last_pt_refuses_a_new_run(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(OssnetError, match="--resume"):
        check_run_dir(tmp_path, resume=False)
    assert check_run_dir(tmp_path, resume=True) == tmp_path / "last.pt"


def test_resuming_a_folder_without_last_pt_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        check_run_dir(tmp_path, resume=True)
    assert check_run_dir(tmp_path / "new", resume=False) is None
