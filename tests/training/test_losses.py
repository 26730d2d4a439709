"""One loss family for all models: BCE / cross-entropy, and the auxiliary head's downscaled target."""

import pytest
import torch

from ossnet.training.losses import aux_loss, downscale_label, segmentation_loss


def test_binary_loss_is_bce_of_the_single_channel_against_foreground():
    logits = torch.randn(2, 1, 50)
    targets = torch.randint(0, 2, (2, 50))
    p = torch.sigmoid(logits[:, 0])
    expected = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    assert segmentation_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_multiclass_loss_is_cross_entropy_over_channels():
    logits = torch.randn(2, 4, 6, 5, 3)
    targets = torch.randint(0, 4, (2, 6, 5, 3))
    log_p = logits.log_softmax(1)
    expected = -log_p.gather(1, targets[:, None]).mean()
    assert segmentation_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_downscaled_label_marks_every_cell_that_touches_the_label():
    label = torch.zeros(16, 16, 8, dtype=torch.uint8)
    label[5, 12, 7] = 1
    target = downscale_label(label, 1, (4, 4, 2))
    assert target.shape == (1, 4, 4, 2)
    assert target.sum() == 1 and target[0, 1, 3, 1] == 1


def test_multiclass_aux_target_spreads_over_the_classes_present_in_a_cell():
    label = torch.zeros(8, 8, 8, dtype=torch.uint8)
    label[0, 0, 0], label[1, 1, 1] = 1, 2  # both in cell (0, 0, 0)
    label[7, 7, 7] = 2
    target = downscale_label(label, 3, (2, 2, 2))
    assert target.shape == (3, 2, 2, 2)
    torch.testing.assert_close(target.sum(0), torch.ones(2, 2, 2))
    torch.testing.assert_close(target[:, 0, 0, 0], torch.tensor([0.0, 0.5, 0.5]))
    torch.testing.assert_close(target[:, 1, 1, 1], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(target[:, 0, 1, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_aux_loss_falls_as_logits_agree_with_the_target():
    label = torch.zeros(8, 8, 8, dtype=torch.uint8)
    label[:4] = 1
    target = downscale_label(label, 1, (2, 2, 2))[None]
    agreeing = 10 * (2 * target - 1)
    assert aux_loss(agreeing, target) < 1e-3 < aux_loss(-agreeing, target)
    two_class = downscale_label(label, 2, (2, 2, 2))[None]
    assert aux_loss(10 * (2 * two_class - 1), two_class) < 1e-3
