"""Training: the run's data, border-balanced location sampling, losses, the RAdam + Lookahead optimiser,
validation during training, checkpoints that survive interruption, the curves, and the loop
`train(TrainConfig)` (single process or torchrun / DDP)."""

from ossnet.training.config import TrainConfig
from ossnet.training.loop import TrainResult, train
from ossnet.training.optim import Lookahead, build_optimizer, build_scheduler, lr_milestones
from ossnet.training.sampling import case_rng, sample_locations

__all__ = ["Lookahead", "TrainConfig", "TrainResult", "build_optimizer", "build_scheduler", "case_rng",
           "lr_milestones", "sample_locations", "train"]
