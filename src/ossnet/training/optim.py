"""The paper's optimiser: RAdam inside Lookahead (k = 5, alpha = 0.8), PAU coefficients at a higher
learning rate, no weight decay, and a step schedule (docs/method.md §4)."""

import torch
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

from ossnet.models.layers import PadeActivation

# The authors train Padé coefficients at 1e-2 against a base of 3e-4; kept fixed when --lr changes.
PAU_LR = 1e-2
LOOKAHEAD_STEPS = 5
LOOKAHEAD_ALPHA = 0.8
# The paper steps the learning rate down 10x at epochs 20 and 30 of 50, i.e. after 40 % and 60 % of
# training; other run lengths keep those fractions.
MILESTONE_FRACTIONS = (0.4, 0.6)
LR_DECAY = 0.1


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al., NeurIPS 2019) around an inner optimiser.

    The inner optimiser moves the (fast) parameters; every k of its steps the slow weights move
    alpha of the way towards them and the parameters restart from there. Parameter groups (learning
    rates) are the inner optimiser's, so schedulers act on both.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = LOOKAHEAD_STEPS,
                 alpha: float = LOOKAHEAD_ALPHA) -> None:
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.param_groups = optimizer.param_groups
        self.inner_steps = 0
        self.slow_weights = [p.detach().clone() for p in self._params()]

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.inner_steps += 1
        if self.inner_steps % self.k == 0:  # one fused pass over all tensors, not one kernel per parameter
            fast = self._params()
            torch._foreach_lerp_(self.slow_weights, fast, self.alpha)
            torch._foreach_copy_(fast, self.slow_weights)
        return loss

    def state_dict(self) -> dict:
        return {"inner": self.optimizer.state_dict(), "slow_weights": [w.clone() for w in self.slow_weights],
                "inner_steps": self.inner_steps, "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["inner"])
        self.param_groups = self.optimizer.param_groups  # the inner optimiser made new group dicts
        self.k, self.alpha, self.inner_steps = state_dict["k"], state_dict["alpha"], state_dict["inner_steps"]
        for slow, saved in zip(self.slow_weights, state_dict["slow_weights"], strict=True):
            slow.copy_(saved)


def build_optimizer(model: nn.Module, lr: float) -> Lookahead:
    """RAdam (no weight decay) in Lookahead; PAU numerator/denominator coefficients in a group at PAU_LR."""
    pau = {id(p) for module in model.modules() if isinstance(module, PadeActivation) for p in module.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in pau], "lr": lr},
              {"params": [p for p in model.parameters() if id(p) in pau], "lr": PAU_LR}]
    return Lookahead(torch.optim.RAdam([g for g in groups if g["params"]], lr=lr, weight_decay=0.0))


def lr_milestones(epochs: int) -> list[int]:
    """Epochs after which the learning rate drops: 40 % and 60 % of `epochs` (20 and 30 of 50)."""
    return sorted({max(1, round(fraction * epochs)) for fraction in MILESTONE_FRACTIONS})


def build_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> MultiStepLR:
    """MultiStepLR at `lr_milestones(epochs)`, gamma LR_DECAY, stepped once per epoch."""
    return MultiStepLR(optimizer, milestones=lr_milestones(epochs), gamma=LR_DECAY)
