"""Building blocks of OSS-Net: the Padé activation, conditional batch norm and the two residual blocks."""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ossnet.errors import OssnetError

# Padé coefficients that make P/Q approximate Leaky ReLU (Molina et al., ICLR 2020), REFERENCE 3.5.
LEAKY_RELU_NUMERATOR = (0.0335583603, 0.505000375, 1.65343934, 2.01001052, 0.931901999, 0.152424124)
LEAKY_RELU_DENOMINATOR = (3.30847488e-06, 3.98021568, 5.12471206e-07, 0.301830109)


def _horner(coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """c_0 + c_1 x + ... + c_m x^m for coefficients (m + 1,) = c_0..c_m, evaluated with Horner's scheme."""
    result = torch.empty_like(x).fill_(coefficients[-1])
    for coefficient in coefficients.flip(0)[1:]:
        result.mul_(x).add_(coefficient)
    return result


class PadeFunction(torch.autograd.Function):
    """P(x) / Q(x) with a hand-written backward: stores only x and recomputes P, Q in place.

    Autograd through the ~20 elementwise steps of the formula would store every intermediate (or, with
    checkpointing, run the formula twice plus its generic backward); the analytic gradients are
        dy/dx   = (P'(x) - y Q'(x)) / Q,         Q'(x) = sign(x) sum_k k |b_k| |x|^(k-1)
        dy/da_k = x^k / Q,                       dy/db_k = -y sign(b_k) |x|^k / Q
    with the coefficient gradients summed over all elements (the coefficients are shared).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, numerator, denominator)
        q_coefficients = torch.cat([denominator.new_ones(1), denominator.abs()])
        return _horner(numerator, x).div_(_horner(q_coefficients, x.abs()))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, numerator, denominator = ctx.saved_tensors
        abs_x = x.abs()
        q_coefficients = torch.cat([denominator.new_ones(1), denominator.abs()])
        inverse_q = _horner(q_coefficients, abs_x).reciprocal_()
        y = _horner(numerator, x).mul_(inverse_q)
        degrees_p = torch.arange(1, len(numerator), dtype=x.dtype, device=x.device)
        degrees_q = torch.arange(1, len(q_coefficients), dtype=x.dtype, device=x.device)
        dp = _horner(numerator[1:] * degrees_p, x)
        dq = _horner(q_coefficients[1:] * degrees_q, abs_x).mul_(torch.sign(x))
        grad_x = dp.sub_(dq.mul_(y)).mul_(inverse_q).mul_(grad)
        weighted = grad * inverse_q  # dL/dP per element
        grad_numerator = _power_sums(weighted, x, len(numerator), start=0)
        weighted.mul_(y).neg_()  # dL/dQ per element
        grad_denominator = _power_sums(weighted, abs_x, len(denominator), start=1) * torch.sign(denominator)
        return grad_x, grad_numerator, grad_denominator


def _power_sums(weights: torch.Tensor, base: torch.Tensor, count: int, start: int) -> torch.Tensor:
    """(count,) sums of weights * base^k for k = start .. start + count - 1 (float64 accumulation)."""
    term = weights * base if start == 1 else weights.clone()
    sums = []
    for _ in range(count):
        sums.append(term.sum(dtype=torch.float64))
        term.mul_(base)
    return torch.stack(sums).to(weights.dtype)


class PadeActivation(nn.Module):
    """Padé Activation Unit (PAU), "safe" form of degree (5, 4) with learnable coefficients a, b.

    The coefficients are shared over all elements and start as a Leaky ReLU approximation. Half and
    bfloat16 inputs are evaluated in float32 (the degree-5 polynomial overflows float16) and cast back.
    `PadeFunction` gives the gradients in closed form and keeps only the input for the backward pass:
    on the encoder's full-resolution feature maps, autograd's ~20 stored intermediates would cost more
    memory than the convolutions themselves.
    """

    def __init__(self) -> None:
        super().__init__()
        self.numerator = nn.Parameter(torch.tensor(LEAKY_RELU_NUMERATOR))
        self.denominator = nn.Parameter(torch.tensor(LEAKY_RELU_DENOMINATOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        numerator, denominator = self.numerator.to(compute_dtype), self.denominator.to(compute_dtype)
        return PadeFunction.apply(x.to(compute_dtype), numerator, denominator).to(x.dtype)


ACTIVATIONS = {"pau": PadeActivation, "relu": nn.ReLU, "leaky_relu": partial(nn.LeakyReLU, 0.01)}


def make_activation(kind: str) -> nn.Module:
    """A fresh activation module of `kind`: "pau", "relu" or "leaky_relu" (slope 0.01)."""
    if kind not in ACTIVATIONS:
        raise OssnetError(f"unknown activation {kind!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[kind]()


class ConditionalBatchNorm1d(nn.Module):
    """BatchNorm1d without affine parameters, then gamma(z) * x_hat + beta(z) with gamma, beta linear in z.

    Starts as plain batch norm (gamma = 1, beta = 0) through zero weights and biases 1 / 0, so the
    latent vector's influence is learnt from zero.
    """

    def __init__(self, num_features: int, latent_size: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(num_features, affine=False)
        self.gamma = nn.Linear(latent_size, num_features)
        self.beta = nn.Linear(latent_size, num_features)
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """x: (B, N, F) features of N locations per volume; latent: (B, L). Returns (B, N, F).

        Statistics are taken over all B * N locations; gamma and beta are per volume.
        """
        normalized = self.norm(x.flatten(0, 1)).view_as(x)
        return self.gamma(latent)[:, None, :] * normalized + self.beta(latent)[:, None, :]


class ResidualEncoderBlock(nn.Module):
    """3D residual block that halves every spatial axis (REFERENCE 3.1).

    main: conv3 -> BN -> act -> avgpool 2 -> conv3 -> BN; residual: conv1 (if channels change) -> avgpool 2;
    output act(main + residual). (B, c_in, X, Y, Z) -> (B, c_out, X/2, Y/2, Z/2).
    """

    def __init__(self, in_channels: int, out_channels: int, activation: str) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            make_activation(activation),
            nn.AvgPool3d(2),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
        )
        self.residual = (nn.Identity() if in_channels == out_channels
                         else nn.Conv3d(in_channels, out_channels, 1, bias=False))
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.main(x) + F.avg_pool3d(self.residual(x), 2))


class ResidualDecoderBlock(nn.Module):
    """Residual MLP block with conditional batch norm, applied to every location (REFERENCE 3.2).

    main: linear -> CBN(z) -> act -> linear -> CBN(z); residual: linear (if widths differ); output
    act(main + residual). x: (B, N, d_in), latent z: (B, L) -> (B, N, d).
    """

    def __init__(self, in_features: int, features: int, latent_size: int, activation: str) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, features)
        self.norm1 = ConditionalBatchNorm1d(features, latent_size)
        self.act1 = make_activation(activation)
        self.linear2 = nn.Linear(features, features)
        self.norm2 = ConditionalBatchNorm1d(features, latent_size)
        self.residual = nn.Identity() if in_features == features else nn.Linear(in_features, features)
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.norm1(self.linear1(x), latent))
        h = self.norm2(self.linear2(h), latent)
        return self.act2(h + self.residual(x))


class PatchConv3d(nn.Conv3d):
    """A 'same' 3D convolution over a whole s^3 patch whose kernel is s^3 too, computed as one matrix product.

    On an s^3 input with kernel s and padding s // 2, every output voxel sees (part of) every input voxel,
    so the convolution is a dense linear map on the flattened patch: (M, C_in s^3) @ (C_in s^3, C_out s^3).
    We build that matrix from the kernel by indexing (exact, same parameters and state dict as nn.Conv3d)
    and let one GEMM do the work: ~6x faster than conv3d forward + backward on CPU for 2^13 patches.
    Input and output: (M, C, s, s, s).
    """

    def __init__(self, in_channels: int, out_channels: int, size: int) -> None:
        super().__init__(in_channels, out_channels, size, padding=size // 2)
        steps = torch.arange(size)
        positions = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
        offsets = positions[None, :, :] - positions[:, None, :] + size // 2  # (out, in, 3) kernel offsets
        inside = ((offsets >= 0) & (offsets < size)).all(-1)
        flat = (offsets[..., 0] * size + offsets[..., 1]) * size + offsets[..., 2]
        # Index size^3 points at an appended zero: pairs of voxels farther apart than the kernel reaches.
        self.register_buffer("kernel_index", torch.where(inside, flat, size ** 3), persistent=False)

    def dense_matrix(self) -> torch.Tensor:
        """(C_out s^3, C_in s^3): row = (output channel, output voxel), column = (input channel, input voxel)."""
        c_out, c_in, volume = self.out_channels, self.in_channels, self.kernel_index.shape[0]
        kernel = self.weight.reshape(c_out, c_in, volume)
        kernel = torch.cat([kernel, kernel.new_zeros(c_out, c_in, 1)], dim=-1)
        matrix = kernel[:, :, self.kernel_index]  # (C_out, C_in, out voxel, in voxel)
        return matrix.permute(0, 2, 1, 3).reshape(c_out * volume, c_in * volume)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        volume = self.kernel_index.shape[0]
        flat = patches.flatten(1) @ self.dense_matrix().t()
        flat = (flat.view(-1, self.out_channels, volume) + self.bias[:, None]).view(-1, self.out_channels * volume)
        return flat.view(patches.shape[0], self.out_channels, *patches.shape[2:])
