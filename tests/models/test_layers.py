import numpy as np
import pytest
import torch
from torch.func import functional_call

from ossnet.errors import OssnetError
from ossnet.models import layers
from ossnet.models.layers import ConditionalBatchNorm1d, PadeActivation, ResidualEncoderBlock, activate_, make_activation


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


def pau_with_random_coefficients(seed, device):
    pau = PadeActivation().to(device)
    a, b = random_coefficients(seed)
    with torch.no_grad():
        pau.numerator.copy_(torch.from_numpy(a))
        pau.denominator.copy_(torch.from_numpy(b))
    return pau


def test_pau_chunked_kernels_equal_the_whole_tensor_formula(monkeypatch, device):
    pau = pau_with_random_coefficients(3, device)
    x = torch.randn(37, 11, device=device) * 2
    x[0, :3] = 0.0  # sign(0) = 0 in dQ/dx, as the formula has it
    grad = torch.randn_like(x)
    x_ref = x.clone().requires_grad_()
    expected = layers._pade_expression(x_ref, pau.numerator, pau.denominator, None)
    expected_grads = torch.autograd.grad(expected, (x_ref, pau.numerator, pau.denominator), grad)
    monkeypatch.setattr(layers, "PADE_CHUNK", 24)  # many chunks, the last one partial
    x_ours = x.clone().requires_grad_()
    ours = pau(x_ours)
    grads = torch.autograd.grad(ours, (x_ours, pau.numerator, pau.denominator), grad)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pau_saves_its_input_at_its_own_precision_under_autocast(device):
    """Under bfloat16 autocast a float32 copy of every activation input would eat the memory it saves."""
    pau = PadeActivation().to(device)
    linear = torch.nn.Linear(8, 8).to(device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = pau(linear(torch.randn(4, 8, device=device)))
    activation_inputs = [t for t in saved if t.shape == (4, 8)]
    assert y.dtype == torch.bfloat16 and activation_inputs
    assert all(t.dtype == torch.bfloat16 for t in activation_inputs)
    y.float().sum().backward()
    assert torch.isfinite(pau.numerator.grad).all() and torch.isfinite(linear.weight.grad).all()


def test_activate_in_place_with_a_bias_equals_the_activation_of_the_shifted_input(monkeypatch, device):
    monkeypatch.setattr(layers, "PADE_CHUNK", 16)
    bias = torch.randn(5, device=device)
    buffer = torch.randn(9, 8, device=device)
    x = buffer[:, :5]  # rows with a stride, as a column block of the decoder's input
    for activation in (pau_with_random_coefficients(4, device), torch.nn.LeakyReLU(0.01)):
        expected = activation(x + bias).detach()
        result = activate_(activation, x.clone(), bias)
        torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    strided = buffer.clone()
    activate_(pau_with_random_coefficients(4, device), strided[:, :5], bias)
    assert torch.equal(strided[:, 5:], buffer[:, 5:])


def test_compiled_pau_falls_back_to_the_eager_kernels_where_compiling_fails(monkeypatch):
    def no_compiler(function):
        def failing(*args):
            raise RuntimeError("no C++ compiler")
        return failing
    monkeypatch.setattr(layers, "_compiled", no_compiler)
    monkeypatch.setattr(layers, "_compile_unavailable", False)
    x = torch.randn(6, 4, requires_grad=True)
    eager = PadeActivation()
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler"):
        y = PadeActivation(compiled=True)(x)
    assert torch.equal(y, eager(x))
    y.sum().backward()  # the backward pass falls back silently: the warning came once
    assert x.grad is not None


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


def test_compiled_pau_equals_the_eager_kernels(device):
    if device.type == "cpu":
        pytest.skip("compiling takes ~30 s on a CPU; benchmarks/gpu.sh runs this on CUDA")
    eager, compiled = pau_with_random_coefficients(5, device), pau_with_random_coefficients(5, device)
    compiled.compiled = True
    x = torch.randn(300, 7, device=device)
    results = []
    for pau in (eager, compiled):
        x_ = x.clone().requires_grad_()
        y = pau(x_)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x_, pau.numerator, pau.denominator))))
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
