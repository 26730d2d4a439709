"""Specifications of TrainConfig's settings that come from elsewhere: the augmentation presets."""

import argparse
import re

import pytest

from ossnet.cli import build_parser
from ossnet.data import AUGMENT_PRESETS, AugmentConfig
from ossnet.errors import OssnetError
from ossnet.training import TrainConfig


def train_option(dest: str) -> argparse.Action:
    verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return next(action for action in verbs["train"]._actions if action.dest == dest)


def test_the_augment_choices_are_the_augmentation_presets(tmp_path):
    assert tuple(train_option("augment").choices) == tuple(AUGMENT_PRESETS)
    for name in AUGMENT_PRESETS:
        assert TrainConfig(data=tmp_path, run_dir=tmp_path / "run", augment=name).augment == name


def test_a_new_augmentation_preset_is_a_valid_augment_setting(tmp_path, monkeypatch):
    monkeypatch.setitem(AUGMENT_PRESETS, "no-rotation", AugmentConfig(rotation_probability=0.0))
    assert TrainConfig(data=tmp_path, run_dir=tmp_path / "run", augment="no-rotation").augment == "no-rotation"


def test_an_augment_that_is_no_preset_is_refused_naming_the_presets(tmp_path):
    message = f"augment must be one of {', '.join(AUGMENT_PRESETS)}, got 'strong'"
    with pytest.raises(OssnetError, match=re.escape(message)):
        TrainConfig(data=tmp_path, run_dir=tmp_path / "run", augment="strong")
