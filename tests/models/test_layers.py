import numpy as np
import pytest
import torch
from torch.func import functional_call

from ossnet.errors import OssnetError
from ossnet.models.layers import ConditionalBatchNorm1d, PadeActivation, ResidualEncoderBlock, make_activation


def rational_numpy(x, a, b):
    """The safe Padé form written out term by term: sum a_k x^k / (1 + sum |b_k| |x|^k)."""
    numerator = sum(a_k * x**k for k, a_k in enumerate(a))
    denominator = 1 + sum(abs(b_k) * abs(x) ** k for k, b_k in enumerate(b, start=1))
    return numerator / denominator


def random_coefficients(seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, 6)
    b = rng.uniform(0.2, 1, 4) * np.array([1, -1, 1, -1])  # both signs, away from |b| = 0
    return a, b


def test_pau_matches_the_rational_function_written_out():
    a, b = random_coefficients(1)
    pau = PadeActivation().double()
    with torch.no_grad():
        pau.numerator.copy_(torch.from_numpy(a))
        pau.denominator.copy_(torch.from_numpy(b))
    x = np.linspace(-4, 4, 81)
    np.testing.assert_allclose(pau(torch.from_numpy(x)).detach().numpy(), rational_numpy(x, a, b), rtol=1e-12)


def test_pau_starts_as_leaky_relu_on_the_working_range():
    x = torch.linspace(-3, 3, 121)
    with torch.no_grad():
        y = PadeActivation()(x)
    assert torch.allclose(y, torch.nn.functional.leaky_relu(x, 0.01), atol=0.05)


def test_pau_gradients_for_input_and_coefficients_pass_gradcheck():
    pau = PadeActivation().double()
    a, b = (torch.from_numpy(c).requires_grad_() for c in random_coefficients(2))
    x = torch.linspace(-3, 3, 12, dtype=torch.float64)
    x = (x + 0.1 * torch.sign(x)).requires_grad_()  # |x| is not differentiable at 0
    assert torch.autograd.gradcheck(
        lambda x, a, b: functional_call(pau, {"numerator": a, "denominator": b}, (x,)), (x, a, b))


def test_pau_keeps_bfloat16_dtype_and_float32_values():
    pau = PadeActivation()
    x = torch.randn(64)
    y_half = pau(x.bfloat16())
    assert y_half.dtype == torch.bfloat16
    assert torch.allclose(y_half.float(), pau(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_make_activation_rejects_unknown_kind():
    assert isinstance(make_activation("pau"), PadeActivation)
    with pytest.raises(OssnetError, match="gelu"):
        make_activation("gelu")


def test_conditional_batch_norm_starts_as_plain_batch_norm():
    cbn = ConditionalBatchNorm1d(num_features=6, latent_size=5)
    x, latent = torch.randn(2, 7, 6), torch.randn(2, 5)
    expected = torch.nn.functional.batch_norm(x.reshape(14, 6), None, None, training=True).view(2, 7, 6)
    assert torch.allclose(cbn(x, latent), expected, atol=1e-6)


def test_conditional_batch_norm_conditions_each_volume_on_its_own_latent():
    cbn = ConditionalBatchNorm1d(num_features=6, latent_size=5)
    torch.nn.init.normal_(cbn.gamma.weight)
    torch.nn.init.normal_(cbn.beta.weight)
    x, latent = torch.randn(2, 7, 6), torch.randn(2, 5)
    changed = latent.clone()
    changed[1] += 1
    before, after = cbn(x, latent), cbn(x, changed)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


def test_encoder_block_halves_every_axis():
    block = ResidualEncoderBlock(3, 5, "relu")
    assert block(torch.randn(2, 3, 8, 6, 4)).shape == (2, 5, 4, 3, 2)


def test_patch_conv_equals_a_same_padded_conv3d_in_values_and_gradients():
    import torch.nn.functional as F
    from ossnet.models.layers import PatchConv3d

    layer = PatchConv3d(3, 2, 5).double()
    patches = torch.randn(6, 3, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    expected = F.conv3d(patches, layer.weight, layer.bias, padding=2)
    assert torch.allclose(layer(patches), expected, atol=1e-10)
    grad_ours = torch.autograd.grad(layer(patches).square().sum(), (patches, layer.weight, layer.bias))
    grad_conv = torch.autograd.grad(expected.square().sum(), (patches, layer.weight, layer.bias))
    for ours, reference in zip(grad_ours, grad_conv):
        assert torch.allclose(ours, reference, atol=1e-8)
