"""RAdam in Lookahead, the PAU learning rate, and the step schedule."""

import copy
import io

import pytest
import torch
from torch import nn

from ossnet.models.layers import PadeActivation
from ossnet.training.optim import PAU_LR, Lookahead, build_optimizer, build_scheduler, lr_milestones


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), PadeActivation(), nn.Linear(8, 1))


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 3, generator=generator)
        optimizer.zero_grad()
        ((model(x) - x.sum(1, keepdim=True)) ** 2).mean().backward()
        optimizer.step()


def descend(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.ones(4, 2)).pow(2).mean().backward()
        optimizer.step()


def test_lookahead_moves_alpha_of_the_way_to_the_fast_weights_every_k_steps():
    model = nn.Linear(2, 1)
    start = [p.detach().clone() for p in model.parameters()]
    fast = copy.deepcopy(model)
    descend(fast, torch.optim.SGD(fast.parameters(), lr=0.1), 3)
    descend(model, Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=3, alpha=0.8), 3)
    for p, p0, p_fast in zip(model.parameters(), start, fast.parameters()):
        torch.testing.assert_close(p, p0 + 0.8 * (p_fast - p0))


def test_lookahead_state_dict_round_trip_continues_identically():
    model = small_model()
    optimizer = build_optimizer(model, 3e-4)
    train_steps(model, optimizer, 7, seed=1)  # mid-way through a Lookahead cycle
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(resumed_model, 1.0)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train_steps(model, optimizer, 6, seed=2)
    train_steps(resumed_model, resumed, 6, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_pau_coefficients_train_at_their_own_rate_without_weight_decay():
    model = small_model()
    optimizer = build_optimizer(model, 3e-4)
    pau = {id(p) for p in model[1].parameters()}
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_lr[PAU_LR] == pau
    assert len(by_lr[3e-4]) == len(list(model.parameters())) - len(pau)
    assert all(group["weight_decay"] == 0 for group in optimizer.param_groups)


def test_milestones_sit_at_the_papers_fractions_of_training():
    assert lr_milestones(50) == [20, 30]
    assert lr_milestones(10) == [4, 6]


def test_scheduler_steps_every_group_down_tenfold_at_each_milestone():
    model = small_model()
    optimizer = build_optimizer(model, 3e-4)
    scheduler = build_scheduler(optimizer, 10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[3] == pytest.approx(3e-4) and rates[4] == pytest.approx(3e-5) and rates[6] == pytest.approx(3e-6)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(PAU_LR / 100)
