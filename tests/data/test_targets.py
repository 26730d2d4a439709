"""Targets map raw label values to class maps 0..K as the paper and the challenges define them."""

from dataclasses import asdict

import numpy as np
import pytest

from ossnet.data import Target, get_target
from ossnet.errors import DatasetError

BRATS_LABEL = np.array([0, 1, 2, 4, 2, 0], dtype=np.int16).reshape(1, 2, 3)
LITS_LABEL = np.array([0, 1, 2, 1, 0, 2], dtype=np.int16).reshape(1, 2, 3)


def test_defaults_are_the_papers_binary_targets():
    assert get_target("brats").name == "wt"
    assert get_target("lits").name == "liver"
    assert get_target("msd", label_values=(0, 1, 2)).name == "foreground"


def test_brats_whole_tumour_is_label_above_zero():
    class_map = get_target("brats", "wt").apply(BRATS_LABEL)
    assert class_map.dtype == np.uint8
    np.testing.assert_array_equal(class_map, (BRATS_LABEL > 0).astype(np.uint8))


def test_brats_regions_unions_give_wt_tc_et():
    target = get_target("brats", "regions")
    class_map = target.apply(BRATS_LABEL)
    assert target.num_classes == 3
    np.testing.assert_array_equal(class_map > 0, BRATS_LABEL > 0)  # WT = {1, 2, 3}
    np.testing.assert_array_equal(class_map >= 2, np.isin(BRATS_LABEL, (1, 4)))  # TC = {2, 3}
    np.testing.assert_array_equal(class_map == 3, BRATS_LABEL == 4)  # ET = {3}
    np.testing.assert_array_equal(class_map == 1, BRATS_LABEL == 2)  # oedema


def test_lits_liver_includes_tumour_and_liver_tumour_keeps_both():
    np.testing.assert_array_equal(get_target("lits").apply(LITS_LABEL), LITS_LABEL >= 1)
    np.testing.assert_array_equal(get_target("lits", "liver-tumour").apply(LITS_LABEL), LITS_LABEL)


def test_msd_all_makes_every_label_value_a_class_in_order():
    label = np.array([0, 3, 7, 3], dtype=np.int16)
    target = get_target("msd", "all", label_values=(7, 0, 3))
    assert target.class_names == ("label-3", "label-7")
    np.testing.assert_array_equal(target.apply(label), [0, 1, 2, 1])
    np.testing.assert_array_equal(get_target("nifti", label_values=(0, 3, 7)).apply(label), label > 0)


def test_target_is_plain_data_rebuilt_from_its_name():
    target = get_target("brats", "regions")
    assert Target(**asdict(target)) == target == get_target("brats", target.name)


@pytest.mark.parametrize(("layout", "name", "values"), [
    ("brats", "liver", None), ("lits", "regions", None), ("camelyon", None, None), ("msd", "foreground", None),
    ("msd", "all", (0,)),
])
def test_unknown_or_unbuildable_targets_raise(layout, name, values):
    with pytest.raises(DatasetError):
        get_target(layout, name, values)


def test_class_maps_go_back_to_the_datasets_label_values():
    class_map = np.array([0, 1, 2, 3], dtype=np.uint8)
    np.testing.assert_array_equal(get_target("brats", "regions").to_label_values(class_map), [0, 2, 1, 4])
    np.testing.assert_array_equal(get_target("brats").to_label_values(class_map[:2]), [0, 1])  # wt: 1, 2, 4 -> 1
    np.testing.assert_array_equal(get_target("lits", "liver-tumour").to_label_values(class_map[:3]), [0, 1, 2])
    many = get_target("msd", "all", (0, 3, 300)).to_label_values(class_map[:3])
    np.testing.assert_array_equal(many, [0, 3, 300])
    assert many.dtype == np.uint16
    regions = get_target("brats", "regions")
    raw = np.array([0, 1, 2, 4])
    np.testing.assert_array_equal(regions.to_label_values(regions.apply(raw)), raw)  # a round trip
