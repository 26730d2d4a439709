import pytest
import torch

from ossnet.errors import CheckpointError, OssnetError
from ossnet.models import (PRESETS, ModelsOptions, OccupancyConfig, create, describe_presets, format_presets, load,
                           save)
from ossnet.models.registry import DERIVED_FROM

from .test_occupancy import TINY, query


def test_presets_are_a_chain_of_config_changes():
    assert PRESETS["ossnet-c"] == OccupancyConfig()  # the config's defaults are OSS-Net C
    for name, parent in DERIVED_FROM.items():
        assert type(PRESETS[name]) is type(PRESETS[parent]) and PRESETS[name] != PRESETS[parent]
    assert not PRESETS["onet"].local_patches and PRESETS["ossnet-b"].mid_patches and PRESETS["ossnet-d"].aux_head


def test_create_applies_overrides_and_names_the_model():
    model = create("ossnet-b", **TINY)
    assert model.name == "ossnet-b" and model.config.decoder_width == 16 and model.config.mid_patches


def test_create_rejects_unknown_presets_and_fields():
    with pytest.raises(OssnetError, match="ossnet-e"):
        create("ossnet-e")
    with pytest.raises(OssnetError, match="decoder_depth"):
        create("ossnet-a", decoder_depth=3)


def trained_a_little(model, batch):
    """One training-mode forward pass so batch-norm running statistics differ from their initial values."""
    model.train()
    with torch.no_grad():
        model(*batch) if hasattr(model, "encode") else model(batch)
    return model.eval()


@pytest.mark.parametrize("name", ["ossnet-d", "unet2d"])
def test_save_then_load_gives_identical_outputs(tmp_path, name):
    if name == "unet2d":
        model = create(name, in_channels=2, input_shape=(16, 16, 8), channels=(4, 8), strides=(2,))
        batch = torch.randn(3, 2, 16, 16)
    else:
        model = create(name, **TINY, fourier_features=4, num_classes=3)
        batch = query(model)
    model = trained_a_little(model, batch)
    path = tmp_path / "runs" / "model.pt"
    save(path, model, epoch=7, channel_names=["t1", "t2"])
    loaded, checkpoint = load(path)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind
    assert loaded.name == name and loaded.config == model.config and not loaded.training
    assert checkpoint["epoch"] == 7 and checkpoint["channel_names"] == ["t1", "t2"]
    with torch.no_grad():
        if name == "unet2d":
            assert torch.equal(loaded(batch), model(batch))
        else:
            assert torch.equal(loaded(*batch)[0], model(*batch)[0])


def test_save_refuses_extra_entries_that_would_overwrite_the_model(tmp_path):
    with pytest.raises(OssnetError, match="model_state"):
        save(tmp_path / "m.pt", create("onet", **TINY), model_state={})


def test_load_of_a_missing_or_corrupt_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load(garbage)
    whole = tmp_path / "whole.pt"
    save(whole, create("onet", **TINY))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load(truncated)


def test_load_rejects_unknown_kinds_and_mismatched_weights(tmp_path):
    path = tmp_path / "model.pt"
    save(path, create("onet", **TINY))
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "model_kind": "gan"}, path)
    with pytest.raises(CheckpointError, match="gan"):
        load(path)
    torch.save({**checkpoint, "model_config": {**checkpoint["model_config"], "decoder_width": 32}}, path)
    with pytest.raises(CheckpointError, match="do not match"):
        load(path)
    torch.save({"model_state": {}}, path)
    with pytest.raises(CheckpointError, match="model_kind"):
        load(path)


def decoder_macs(config):
    """Per-location multiply-accumulates of the decoder, from the architecture's definition."""
    width, size3 = config.decoder_width, config.patch_size**3
    d_in = config.decoder_in_features
    mlp = d_in * width + width * width + d_in * width + (config.decoder_blocks - 1) * 2 * width**2
    hidden = max(config.patch_channels // 2, 1)
    patch = size3 * size3 * (config.patch_channels * hidden + hidden) if config.patch_channels else 0
    return mlp + patch + width * config.num_classes


def test_describe_presets_counts_parameters_and_decoder_cost():
    rows = describe_presets(ModelsOptions(in_channels=2, input_shape=(64, 64, 32)))
    assert [row["name"] for row in rows] == list(PRESETS)
    for row in rows:
        model = create(row["name"], in_channels=2, input_shape=(64, 64, 32))
        assert row["parameters"] == sum(p.numel() for p in model.parameters())
        if row["kind"] == "occupancy":
            assert row["encoder_input"] == (2, 32, 32, 16)
            assert row["macs_per_query"] == decoder_macs(model.config)
        else:
            assert row["macs_per_query"] > 0
    by_name = {row["name"]: row for row in rows}
    patch, patch_row = PRESETS["unet3d-patch"].patch_shape, by_name["unet3d-patch"]
    assert patch_row["encoder_input"] == (2, *patch) and f"patch_shape={patch}" in patch_row["adds"]
    assert patch_row["macs_per_query"] == pytest.approx(by_name["unet3d"]["macs_per_query"], rel=1e-3)
    assert "mid_patches=True" in by_name["ossnet-b"]["adds"] and "aux_head=True" in by_name["ossnet-c"]["adds"]
    table = format_presets(rows)
    assert all(name in table for name in PRESETS)
