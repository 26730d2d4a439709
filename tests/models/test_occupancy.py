import pytest
import torch

from ossnet.errors import OssnetError
from ossnet.models import OccupancyConfig, PatchSampler, create, extract_patches, voxel_to_normalized
from ossnet.models.layers import ConditionalBatchNorm1d

OCCUPANCY_PRESETS = ["onet", "ossnet-a", "ossnet-b", "ossnet-c", "ossnet-d"]
# input 16^3 -> global volume 8^3 -> two encoder blocks -> latent grid 2^3 (L = 8)
TINY = dict(in_channels=2, input_shape=(16, 16, 16), encoder_channels=(4, 8), decoder_width=16)


def query(model, batch=2, n=5):
    """Inputs of one decoder call: global volumes, normalised coordinates and patches of n random voxels."""
    config = model.config
    volumes = torch.randn(batch, config.in_channels, *config.input_shape)
    global_volume = torch.nn.functional.avg_pool3d(volumes, config.global_downscale)
    voxels = torch.stack([torch.randint(0, size, (batch, n)) for size in config.input_shape], -1)
    patches = (torch.stack([extract_patches(v, c, config.local_patches, config.mid_patches)
                            for v, c in zip(volumes, voxels)]) if config.patch_channels else None)
    return global_volume, voxel_to_normalized(voxels, config.input_shape), patches


@pytest.mark.parametrize("name", OCCUPANCY_PRESETS)
def test_every_preset_encodes_and_decodes_with_contract_shapes(name):
    model = create(name, **TINY)
    global_volume, coords, patches = query(model, batch=2, n=5)
    latents = model.encode(global_volume)
    num_latents = 6 if name in ("ossnet-c", "ossnet-d") else 1
    assert latents.vectors.shape == (2, num_latents, 8)
    assert model.decode(latents, coords, patches).shape == (2, 5, 1)


@pytest.mark.parametrize("name", OCCUPANCY_PRESETS)
def test_aux_head_exists_exactly_for_c_and_d(name):
    model = create(name, **TINY, num_classes=3)
    latents = model.encode(query(model)[0])
    if name in ("ossnet-c", "ossnet-d"):
        assert latents.aux_logits.shape == (2, 3, 2, 2, 2)
    else:
        assert latents.aux_logits is None and model.aux_head is None


@pytest.mark.parametrize("name", OCCUPANCY_PRESETS)
def test_one_backward_pass_reaches_every_parameter(name):
    model = create(name, **TINY)
    for module in model.modules():
        if isinstance(module, ConditionalBatchNorm1d):  # zero-initialised: would block the latents' gradient
            torch.nn.init.normal_(module.gamma.weight, std=0.1)
            torch.nn.init.normal_(module.beta.weight, std=0.1)
    global_volume, coords, patches = query(model)
    logits, latents = model(global_volume, coords, patches)
    loss = logits.square().mean() + (latents.aux_logits.square().mean() if latents.aux_logits is not None else 0)
    loss.backward()
    unreached = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unreached == []


@pytest.mark.parametrize("name, conditioning", [("ossnet-a", [0] * 5), ("ossnet-c", [1, 2, 3, 4, 5])])
def test_decoder_block_i_is_conditioned_on_its_latent_vector(name, conditioning):
    model = create(name, **TINY)
    global_volume, coords, patches = query(model)
    latents = model.encode(global_volume)
    received = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, output: received.append(args[1]))
    model.decode(latents, coords, patches)
    assert all(torch.equal(latent, latents.vectors[:, k]) for latent, k in zip(received, conditioning, strict=True))


def test_multi_class_logits_have_one_channel_per_class():
    model = create("ossnet-d", **TINY, num_classes=4)
    global_volume, coords, patches = query(model, batch=3, n=6)
    assert model.decode(model.encode(global_volume), coords, patches).shape == (3, 6, 4)


def test_decoding_in_chunks_equals_decoding_at_once_in_eval_mode():
    model = create("ossnet-c", **TINY).eval()
    global_volume, coords, patches = query(model, batch=2, n=7)
    with torch.no_grad():
        latents = model.encode(global_volume)
        whole = model.decode(latents, coords, patches)
        chunks = [model.decode(latents, coords[:, s], patches[:, s]) for s in (slice(0, 3), slice(3, 7))]
    assert torch.allclose(torch.cat(chunks, 1), whole, atol=1e-6)


def test_fourier_features_widen_the_decoder_input_and_are_reproducible():
    first, second = create("ossnet-a", **TINY, fourier_features=16), create("ossnet-a", **TINY, fourier_features=16)
    assert first.blocks[0].linear1.in_features == 3 + 2 * 16 + 343 + 8
    assert torch.equal(first.coordinate_features.frequencies, second.coordinate_features.frequencies)
    global_volume, coords, patches = query(first)
    assert first.decode(first.encode(global_volume), coords, patches).shape == (2, 5, 1)


def test_decode_requires_the_patches_the_model_uses():
    model = create("ossnet-b", **TINY)
    global_volume, coords, patches = query(model)
    latents = model.encode(global_volume)
    with pytest.raises(OssnetError, match="patches"):
        model.decode(latents, coords, None)
    with pytest.raises(OssnetError, match="patches"):
        model.decode(latents, coords, patches[:, :, :2])


def test_config_rejects_input_shape_the_encoder_cannot_halve_and_unknown_activations():
    with pytest.raises(OssnetError, match="divisible"):
        OccupancyConfig(input_shape=(256, 256, 155))
    with pytest.raises(OssnetError, match="gelu"):
        OccupancyConfig(activation="gelu")


@pytest.mark.parametrize("name, width, decoder_input, patch_channels",
                         [("onet", 256, 3 + 320, 0), ("ossnet-a", 512, 3 + 343 + 320, 4),
                          ("ossnet-b", 512, 3 + 343 + 320, 8), ("ossnet-d", 512, 3 + 343 + 320, 8)])
def test_brats_presets_have_the_paper_sizes(name, width, decoder_input, patch_channels):
    with torch.device("meta"):
        model = create(name)
        latents = model.encode(torch.zeros(1, 4, 128, 128, 80))
    assert model.config.latent_grid == (8, 8, 5)
    assert latents.vectors.shape[2] == 320
    assert [block.linear1.in_features for block in model.blocks] == [decoder_input] + [width] * 4
    assert model.config.patch_channels == patch_channels
    if patch_channels:
        assert model.patch_mapping.layers[0].in_channels == patch_channels
    if name == "ossnet-d":
        assert latents.vectors.shape == (1, 6, 320) and latents.aux_logits.shape == (1, 1, 8, 8, 5)
        assert sum(skip[1].out_channels for skip in model.encoder.skips) == 120


def test_training_step_runs_under_bfloat16_autocast():
    model = create("ossnet-c", **TINY)
    global_volume, coords, patches = query(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, latents = model(global_volume, coords, patches)
    logits.float().mean().backward()
    assert logits.dtype == torch.bfloat16
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def with_trained_looking_norms(model):
    """Non-trivial CBN weights and running statistics, as after training (the initial ones fold to identity)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ConditionalBatchNorm1d):
                module.gamma.weight.normal_(0, 0.3, generator=generator)
                module.beta.weight.normal_(0, 0.3, generator=generator)
                module.norm.running_mean.normal_(0, 1, generator=generator)
                module.norm.running_var.uniform_(0.5, 2, generator=generator)
    return model


def one_volume(model, n, device):
    """An encoded volume, its patch sampler and n locations (normalised coordinates, voxels)."""
    config = model.config
    volume = torch.randn(config.in_channels, *config.input_shape, device=device)
    latents = model.encode(torch.nn.functional.avg_pool3d(volume[None], config.global_downscale))
    voxels = torch.stack([torch.randint(0, size, (n,)) for size in config.input_shape], -1).to(device)
    sampler = (PatchSampler(volume, config.local_patches, config.mid_patches) if config.patch_channels else None)
    return latents, sampler, voxel_to_normalized(voxels, config.input_shape), voxels


@pytest.mark.parametrize("name, overrides", [(name, {}) for name in OCCUPANCY_PRESETS]
                         + [("ossnet-d", {"num_classes": 3, "fourier_features": 4}),
                            ("ossnet-a", {"activation": "leaky_relu"})])
def test_folded_decoder_equals_unfolded_decoder(name, overrides, device):
    model = with_trained_looking_norms(create(name, **TINY, **overrides)).to(device).eval()
    with torch.no_grad():
        latents, sampler, coords, voxels = one_volume(model, 300, device)
        patches = None if sampler is None else sampler(voxels)[None]
        expected = model.decode(latents, coords[None], patches)[0]
        folded = model.fold(latents, sampler)(coords, voxels)
    assert folded.shape == expected.shape == (300, model.config.num_classes)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_folded_decoder_streams_patches_without_changing_the_result(monkeypatch, device):
    from ossnet.models import occupancy

    model = with_trained_looking_norms(create("ossnet-d", **TINY)).to(device).eval()
    with torch.no_grad():
        latents, sampler, coords, voxels = one_volume(model, 50, device)
        whole = model.fold(latents, sampler)(coords, voxels)
        monkeypatch.setattr(occupancy, "CHUNK_SIZE", 7)
        torch.testing.assert_close(model.fold(latents, sampler)(coords, voxels), whole, rtol=1e-5, atol=1e-6)


def test_folded_decoder_under_bfloat16_autocast_is_as_close_to_float32_as_the_unfolded_one(device):
    model = with_trained_looking_norms(create("ossnet-c", **TINY)).to(device).eval()
    with torch.no_grad():
        latents, sampler, coords, voxels = one_volume(model, 500, device)
        decoder = model.fold(latents, sampler)
        full = decoder(coords, voxels)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            folded = decoder(coords, voxels)
            unfolded = model.decode(latents, coords[None], sampler(voxels)[None])[0].float()
    assert folded.dtype == torch.float32
    error, reference_error = (folded - full).abs().mean(), (unfolded - full).abs().mean()
    assert 0 < error < 3 * reference_error


def test_fold_needs_eval_mode_and_one_volume():
    model = create("ossnet-c", **TINY)
    global_volume, _, _ = query(model, batch=2)
    with pytest.raises(ValueError, match="eval"):
        model.fold(model.encode(global_volume[:1]), None)
    model.eval()
    with pytest.raises(ValueError, match="one volume"):
        model.fold(model.encode(global_volume), None)


@pytest.mark.parametrize("recompute", ["norms", "blocks"])
def test_checkpointed_training_step_gives_the_same_gradients(recompute, device):
    """Recomputing in the backward pass changes memory, not results: gradients and batch-norm running
    statistics (updated once per step, not again when recomputed) equal those of storing everything."""
    reference = with_trained_looking_norms(create("ossnet-c", **TINY, decoder_recompute="none")).to(device)
    model = create("ossnet-c", **TINY, decoder_recompute=recompute).to(device)
    model.load_state_dict(reference.state_dict())
    global_volume, coords, patches = (t.to(device) for t in query(reference, batch=2, n=33))
    results = []
    for network in (reference, model):
        logits, latents = network(global_volume, coords, patches)
        (logits.square().mean() + latents.aux_logits.square().mean()).backward()
        results.append(({n: p.grad for n, p in network.named_parameters()}, dict(network.named_buffers())))
    (grads, buffers), (grads_ours, buffers_ours) = results
    for name in grads:
        torch.testing.assert_close(grads_ours[name], grads[name], rtol=1e-4, atol=1e-6)
    for name in buffers:
        torch.testing.assert_close(buffers_ours[name], buffers[name], rtol=0, atol=0)


def test_config_rejects_unknown_decoder_recompute():
    with pytest.raises(OssnetError, match="decoder_recompute"):
        OccupancyConfig(decoder_recompute="everything")


def test_folded_decoding_does_not_synchronise_the_gpu(device):
    if device.type != "cuda":
        pytest.skip("host-device synchronisation is a GPU matter; benchmarks/gpu.sh runs this on CUDA")
    model = with_trained_looking_norms(create("ossnet-d", **TINY)).to(device).eval()
    with torch.no_grad():
        latents, sampler, coords, voxels = one_volume(model, 300, device)
        decoder = model.fold(latents, sampler)
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            logits = decoder(coords, voxels)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert logits.shape == (300, 1)
