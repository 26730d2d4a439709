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


def tiny_training_checkpoint(path):
    from ossnet.models import create
    from ossnet.training.checkpoints import save_checkpoint
    from ossnet.training.optim import build_optimizer, build_scheduler

    model = create("ossnet-c", input_shape=(16, 16, 16), encoder_channels=(4, 8), decoder_width=8,
                   decoder_blocks=1)
    optimizer = build_optimizer(model, 1e-3)
    model(torch.randn(2, 4, 8, 8, 8), torch.rand(2, 5, 3) * 2 - 1,
          torch.randn(2, 5, 4, 7, 7, 7))[0].sum().backward()
    optimizer.step()
    save_checkpoint(path, model, {}, optimizer, build_scheduler(optimizer, 4))
    return model


def test_a_training_checkpoint_loads_its_state_on_the_cpu_whatever_the_device(tmp_path):
    """On a GPU, mapping the whole checkpoint to the device put the numpy RNG state there (`.numpy()`
    failed) and RAdam's step counters too (a GPU sync per parameter per step). "meta" stands in for the GPU."""
    from ossnet.training.checkpoints import load_training_checkpoint

    tiny_training_checkpoint(tmp_path / "last.pt")
    model, checkpoint = load_training_checkpoint(tmp_path / "last.pt", torch.device("meta"))
    assert all(p.device.type == "meta" for p in model.parameters())
    state_tensors = [value for entry in ("optimizer_state", "rng_state") for value in _tensors(checkpoint[entry])]
    assert state_tensors and all(t.device.type == "cpu" for t in state_tensors)
    restore_rng_state(checkpoint["rng_state"][0])


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


PER_RANK_SCRIPT = """
import sys, torch
from ossnet.distributed import barrier, gather_objects, init_distributed, shutdown
from ossnet.training.checkpoints import capture_rng_state, restore_training_state, save_checkpoint
from ossnet.training.optim import build_optimizer, build_scheduler
from ossnet.models import load

context = init_distributed(torch.device("cpu"))
torch.manual_seed(100 + context.rank)
states = gather_objects(capture_rng_state(), context)
expected = torch.rand(4)
if context.is_main:
    model, _ = load(sys.argv[1])
    optimizer = build_optimizer(model, 1e-3)
    save_checkpoint(sys.argv[2], model, {}, optimizer, build_scheduler(optimizer, 4), rng_states=states)
barrier(context)
torch.manual_seed(12345)
model, checkpoint = load(sys.argv[2])
optimizer = build_optimizer(model, 1e-3)
restore_training_state(checkpoint, optimizer, build_scheduler(optimizer, 4), None, context.rank, context.world_size)
again = torch.rand(4)
draws = gather_objects(again.tolist(), context)
assert torch.equal(again, expected), (context.rank, again, expected)
assert draws[0] != draws[1], draws
barrier(context)
shutdown(context)
"""


def test_every_rank_resumes_its_own_random_state_under_torchrun(tmp_path, torchrun_two):
    tiny_training_checkpoint(tmp_path / "model.pt")
    (tmp_path / "script.py").write_text(PER_RANK_SCRIPT)
    done = torchrun_two(tmp_path / "script.py", tmp_path / "model.pt", tmp_path / "last.pt", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(torch.load(tmp_path / "last.pt", weights_only=True)["rng_state"]) == 2
