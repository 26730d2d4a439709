"""Post-processing decided on validation: component rules, the decision, its round trip through a checkpoint."""

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from ossnet.cli import main
from ossnet.data import open_dataset
from ossnet.inference.outputs import disk_array
from ossnet.inference.postprocess import (ComponentRule, ComponentTable, Postprocessing, SlabComponents,
                                          decide_postprocessing)
from ossnet.inference.predict import PredictOptions, Predictor
from ossnet.metrics import dice

SHAPE = (40, 40, 40)


def ball(centre, radius, shape=SHAPE) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2


def kept_components(mask: np.ndarray, rule: ComponentRule, voxel_volume: float) -> np.ndarray:
    """The voxels of the boolean mask that a post-processing of the one `rule` keeps."""
    return Postprocessing((rule,), dice=0.0, dice_gain=0.0, cases=1).apply(mask.astype(np.uint8), voxel_volume) > 0


def tables(predictions, labels, voxel_volume=1.0):
    """tables[case][class] of binary cases (one class)."""
    return [[ComponentTable.of(p, l, voxel_volume)] for p, l in zip(predictions, labels)]


def test_a_false_positive_island_is_removed_by_size_where_keeping_the_largest_would_drop_a_lesion():
    # Two true lesions (the second smaller); the prediction finds both and adds a small island far away.
    labels = [ball((12, 12, 12), 7) | ball((30, 30, 28), 4), ball((20, 14, 20), 6) | ball((8, 32, 30), 4)]
    predictions = [labels[0] | ball((32, 6, 6), 1), labels[1] | ball((34, 34, 6), 1)]
    decision = decide_postprocessing(tables(predictions, labels))
    (rule,) = decision.rules
    assert rule.kind == "min-volume"
    island, second_lesion = ball((20, 20, 20), 1).sum(), ball((20, 20, 20), 4).sum()  # voxels = mm³ at 1 mm
    assert island < rule.min_volume <= second_lesion
    before = np.mean([dice(p, l) for p, l in zip(predictions, labels)])
    assert decision.dice == pytest.approx(before)
    assert decision.dice_gain == pytest.approx(1.0 - before)  # both cases become exact
    cleaned = [decision.apply(p.astype(np.uint8), 1.0) for p in predictions]
    assert all(np.array_equal(c > 0, l) for c, l in zip(cleaned, labels))


def test_a_size_rule_never_empties_a_case_whose_structures_are_all_under_the_threshold():
    # Validation: large lesions with small islands. Held out: one small lesion, smaller than the threshold.
    labels = [ball((12, 12, 12), 8) | ball((28, 28, 28), 7), ball((20, 20, 20), 8) | ball((6, 30, 30), 7)]
    predictions = [labels[0] | ball((32, 6, 6), 1), labels[1] | ball((34, 34, 6), 1)]
    (rule,) = decide_postprocessing(tables(predictions, labels)).rules
    small = ball((20, 20, 20), 4)
    assert rule.kind == "min-volume" and small.sum() < rule.min_volume
    kept = kept_components(small | ball((4, 34, 34), 1), rule, 1.0)
    assert np.array_equal(kept, small)


def test_an_island_larger_than_another_case_s_lesion_is_removed():
    labels = [ball((12, 12, 12), 8), ball((26, 24, 24), 5)]
    predictions = [labels[0] | ball((31, 31, 31), 6), labels[1] | ball((4, 4, 4), 1)]
    decision = decide_postprocessing(tables(predictions, labels))
    assert decision.changes_anything and decision.dice + decision.dice_gain == pytest.approx(1.0)
    cleaned = [decision.apply(p.astype(np.uint8), 1.0) for p in predictions]
    assert all(np.array_equal(c > 0, l) for c, l in zip(cleaned, labels))


def test_without_islands_nothing_is_post_processed():
    labels = [ball((14, 14, 14), 8), ball((24, 20, 22), 7)]
    predictions = [ball((15, 14, 14), 8), ball((24, 21, 22), 6)]  # one component each, slightly off
    decision = decide_postprocessing(tables(predictions, labels))
    assert decision.rules == (ComponentRule(),) and decision.dice_gain == 0.0
    assert not decision.changes_anything


def test_small_true_lesions_are_kept():
    labels = [ball((12, 12, 12), 7) | ball((30, 30, 30), 2), ball((20, 20, 20), 6) | ball((4, 34, 4), 1)]
    decision = decide_postprocessing(tables(labels, labels))  # a perfect prediction, small lesions included
    assert decision.rules == (ComponentRule(),) and decision.dice == 1.0


def test_each_class_is_decided_on_its_own():
    label = np.zeros(SHAPE, np.uint8)
    label[ball((12, 12, 12), 6)] = 1
    label[ball((28, 28, 28), 6)] = 2
    prediction = label.copy()
    prediction[ball((4, 34, 4), 1)] = 2  # an island of class 2 only
    per_class = [[ComponentTable.of(prediction == k, label == k, 1.0) for k in (1, 2)]]
    decision = decide_postprocessing(per_class)
    assert decision.rules[0] == ComponentRule() and decision.rules[1].kind != "none"
    assert np.array_equal(decision.apply(prediction, 1.0), label)


def test_component_volumes_are_in_mm3_so_a_rule_means_the_same_on_a_finer_grid():
    coarse = ball((10, 10, 10), 6, (24, 24, 24)) | ball((20, 3, 3), 1.5, (24, 24, 24))
    fine = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2)  # voxels of 1/8 the volume
    rule = ComponentRule("min-volume", 50.0)  # between the island's ~14-33 mm³ and the ball's ~900 mm³
    kept_coarse, kept_fine = kept_components(coarse, rule, 1.0), kept_components(fine, rule, 1 / 8)
    assert ndimage.label(kept_coarse)[1] == 1
    assert np.array_equal(np.repeat(np.repeat(np.repeat(kept_coarse, 2, 0), 2, 1), 2, 2), kept_fine)


def test_the_decision_round_trips_through_a_weights_only_checkpoint(tmp_path):
    decision = Postprocessing((ComponentRule("min-volume", 12.5), ComponentRule("largest"), ComponentRule()),
                              dice=0.8, dice_gain=0.01, cases=3)
    torch.save({"postprocessing": decision.to_dict()}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["postprocessing"]
    assert Postprocessing.from_dict(loaded) == decision


# ------------------------------------------------------------------ through predict, with a trained model


@pytest.fixture(scope="module")
def scan_with_island(tiny_brats, tmp_path_factory):
    """A tiny_brats case with a second, small bright blob (the tumour's contrasts) far from its tumour, as
    one 4D NIfTI: the trained model segments both."""
    case = open_dataset(tiny_brats).cases[0].load()
    image = case.image.copy()
    tumour = ndimage.center_of_mass(case.label > 0)
    corner = tuple(3 if c > 16 else 25 for c in tumour)  # the opposite corner of the 32^3 volume
    island = tuple(slice(c, c + 4) for c in corner)
    for channel, contrast in enumerate((2.0, -1.0, 1.0, 1.5)):
        image[(channel, *island)] = 1.0 + contrast
    path = tmp_path_factory.mktemp("island") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), case.affine), path)
    return path


def with_postprocessing(checkpoint, path, decision):
    """A copy of `checkpoint` whose post-processing entry is `decision` (None: removed, an old checkpoint)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state.pop("postprocessing", None)
    if decision is not None:
        state["postprocessing"] = decision.to_dict()
    torch.save(state, path)
    return path


def load_scan(path):
    (source,) = open_dataset(path).test_cases  # one unlabelled NIfTI file
    return source.load()


def read_mask(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_predict_applies_the_checkpoint_decision_unless_told_none(trained_checkpoint, scan_with_island, tmp_path):
    raw = Predictor(trained_checkpoint).predict_case(load_scan(scan_with_island),
                                                     PredictOptions(postprocess="none")).labels > 0
    components, count = ndimage.label(raw, np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel())[1:]
    assert count >= 2, "the model should segment the island too"
    decision = Postprocessing((ComponentRule("min-volume", float(sizes.max())),), dice=0.7, dice_gain=0.05, cases=1)
    checkpoint = with_postprocessing(trained_checkpoint, tmp_path / "decided.pt", decision)
    assert main(["predict", "-c", str(checkpoint), "-i", str(scan_with_island), "-o", str(tmp_path / "auto")]) == 0
    assert main(["predict", "-c", str(checkpoint), "-i", str(scan_with_island), "-o", str(tmp_path / "none"),
                 "--postprocess", "none"]) == 0
    auto, none = read_mask(tmp_path / "auto" / "scan.nii.gz"), read_mask(tmp_path / "none" / "scan.nii.gz")
    assert np.array_equal(none > 0, raw)  # --postprocess none leaves the island
    assert np.array_equal(auto > 0, components == sizes.argmax() + 1)  # auto keeps the largest component only


def test_a_checkpoint_without_a_decision_predicts_as_before(trained_checkpoint, scan_with_island, tmp_path):
    old = with_postprocessing(trained_checkpoint, tmp_path / "old.pt", None)
    case = load_scan(scan_with_island)
    predictor = Predictor(old)
    assert predictor.postprocessing is None
    auto = predictor.predict_case(case, PredictOptions()).labels
    raw = Predictor(trained_checkpoint).predict_case(case, PredictOptions(postprocess="none")).labels
    assert np.array_equal(auto, raw)


def test_components_are_joined_across_slabs_where_they_touch_only_by_a_corner(monkeypatch):
    import ossnet.inference.outputs as outputs
    monkeypatch.setattr(outputs, "SLAB_BYTES", 8 * 12 * 12 * 2)  # slabs of 2 slices
    class_map = np.zeros((12, 12, 9), np.uint8)
    class_map[2, 2, 0:2], class_map[3, 3, 2:5] = 1, 1  # one component: slices 1 and 2 touch by a corner
    class_map[8, 8, 0:6] = 1  # a larger one across three slabs
    class_map[8, 2, 7] = 1  # an island
    components = SlabComponents.of(class_map, 1)
    assert sorted(components.sizes.tolist()) == [1, 5, 6] and components.depth == 2
    kept = kept_components(class_map > 0, ComponentRule("min-volume", 3.0), 1.0)
    assert kept.sum() == 11 and not kept[8, 2, 7]
    largest = np.zeros_like(class_map, dtype=bool)
    largest[8, 8, 0:6] = True
    assert np.array_equal(kept_components(class_map > 0, ComponentRule("largest"), 1.0), largest)


def test_a_class_map_on_disk_is_post_processed_as_the_same_map_in_memory(tmp_path, monkeypatch):
    import ossnet.inference.outputs as outputs
    monkeypatch.setattr(outputs, "SLAB_BYTES", 8 * 40 * 40 * 3)
    rng = np.random.default_rng(3)
    class_map = (ndimage.binary_dilation(rng.random(SHAPE) > 0.995, iterations=2) * rng.integers(1, 3, SHAPE)
                 ).astype(np.uint8)
    on_disk = disk_array(tmp_path / "labels.zarr", SHAPE, np.uint8)
    on_disk[...] = class_map
    rules = Postprocessing((ComponentRule("min-volume", 20.0), ComponentRule("largest")), 0.5, 0.1, 1)
    expected = class_map.copy()
    for k, rule in enumerate(rules.rules, start=1):  # the whole map's components, by scipy
        components, count = ndimage.label(class_map == k, np.ones((3, 3, 3)))
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        expected[(class_map == k) & ~np.concatenate([[True], rule.keeps(sizes.astype(float))])[components]] = 0
    assert not np.array_equal(expected, class_map)
    assert np.array_equal(rules.apply(class_map.copy(), 1.0), expected)
    rules.apply(on_disk, 1.0)
    assert np.array_equal(on_disk[...], expected)
