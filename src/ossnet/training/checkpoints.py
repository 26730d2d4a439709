"""Training checkpoints that never lose work: RUN_DIR/last.pt (every epoch) and best.pt (best validation Dice).

Both are `ossnet.models.save` files (written to a temporary file, then renamed, so a process killed at
any moment leaves the previous complete file), so `ossnet.models.load(path)` rebuilds the model alone.
Entries besides the model's:
  run metadata (both files): train_config (dict), preprocess_config (dict), layout, target, class_names,
    channel_names, epoch (completed epochs), best_dice (float or None), split ({"train": ids, "val": ids}),
    postprocessing (`inference.postprocess.Postprocessing.to_dict()` of the file's weights, or None);
  training state (last.pt only): optimizer_state, scheduler_state, scaler_state (None unless fp16 on
    CUDA), rng_state (torch, CUDA, numpy and Python generators).
Everything is tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` accepts it.
"""

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ossnet import models
from ossnet.errors import CheckpointError, OssnetError

LAST = "last.pt"
BEST = "best.pt"
TRAINING_STATE_KEYS = ("optimizer_state", "scheduler_state", "scaler_state", "rng_state")


def check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuses to overwrite a run or resume nothing."""
    last = Path(run_dir) / LAST
    if resume and not last.is_file():
        raise CheckpointError(f"{last}: no checkpoint to resume from; drop --resume to start a new run")
    if not resume and last.exists():
        raise OssnetError(f"{run_dir} already holds a training run ({LAST}); pass --resume to continue it "
                          f"or choose another -o")
    return last if resume else None


def capture_rng_state() -> dict:
    """The global torch, CUDA, numpy and Python random generator states, as weights-only-loadable values."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state` (CUDA states only where as many devices are present)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def save_checkpoint(path: Path, model: nn.Module, metadata: dict, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, scaler: torch.amp.GradScaler | None = None,
                    rng_states: list[dict] | None = None) -> None:
    """Write model + metadata (+ the training state when an optimizer is given) to `path` atomically.

    rng_states: `capture_rng_state()` of every rank, in rank order (default: this process's)."""
    training = {}
    if optimizer is not None:
        training = {"optimizer_state": optimizer.state_dict(), "scheduler_state": scheduler.state_dict(),
                    "scaler_state": scaler.state_dict() if scaler is not None else None,
                    "rng_state": rng_states or [capture_rng_state()]}
    models.save(path, model, **metadata, **training)


def load_training_checkpoint(path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The model (moved to `device`) and the checkpoint dict (on the CPU) of a last.pt to resume;
    CheckpointError if it holds no training state."""
    model, checkpoint = models.load(path, map_location="cpu")
    if missing := [key for key in TRAINING_STATE_KEYS if key not in checkpoint]:
        raise CheckpointError(f"{path}: no training state to resume from (missing {missing})")
    return model.to(device), checkpoint


def restore_training_state(checkpoint: dict, optimizer: torch.optim.Optimizer, scheduler,
                           scaler: torch.amp.GradScaler | None, rank: int = 0, world_size: int = 1) -> None:
    """Load optimiser, scheduler, loss scaler and this rank's random generator states saved by
    `save_checkpoint` (the optimiser's parameters must already be on their device)."""
    optimizer.load_state_dict(checkpoint["optimizer_state"])
    scheduler.load_state_dict(checkpoint["scheduler_state"])
    if scaler is not None and checkpoint["scaler_state"] is not None:
        scaler.load_state_dict(checkpoint["scaler_state"])
    states = checkpoint["rng_state"]
    states = states if isinstance(states, list) else [states]  # written before per-rank states
    restore_rng_state(states[rank] if len(states) == world_size else states[0])
