"""Gaussian noise from the operating system's CSPRNG, for DP-SGD's secure mode.

Opacus's ``secure_mode`` needs ``torchcsprng``, whose last release (0.2.1, 2021)
does not build against torch 2.x, so fedvault draws the noise itself: uniform
bits from ``os.urandom`` (a CSPRNG), the Box-Muller transform in float64, and,
as Opacus does against floating-point attacks (Holohan & Braghin 2021,
arXiv:2107.10138, section 5.1, with n = 2), the sum of four Gaussians of the
target standard deviation divided by two.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

_TWO_53 = float(2**53)


def _uniform_open(n: int) -> np.ndarray:
    """``n`` uniforms in (0, 1] with 53 random bits each, from os.urandom."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (raw.astype(np.float64) + 1.0) / _TWO_53


def secure_standard_normal(n: int) -> np.ndarray:
    """``n`` independent N(0, 1) draws (Box-Muller on CSPRNG uniforms)."""
    half = (n + 1) // 2
    u1, u2 = _uniform_open(half), _uniform_open(half)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])
    return z[:n]


def secure_gaussian_like(reference: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) noise shaped like ``reference``: (sum of 4 draws of N(0, std^2)) / 2."""
    import torch  # here, so that the CSPRNG helpers load without torch

    if std == 0:
        return torch.zeros_like(reference)
    n = reference.numel()
    total = np.zeros(n, dtype=np.float64)
    for _ in range(4):
        total += secure_standard_normal(n)
    noise = (std * total / 2.0).reshape(tuple(reference.shape))
    return torch.from_numpy(noise).to(dtype=reference.dtype, device=reference.device)


class UniformSource(Protocol):
    """Anything with numpy ``Generator.random``'s signature."""

    def random(self, size: int | tuple[int, ...]) -> np.ndarray: ...


class SecureUniform:
    """A source of uniforms with numpy ``Generator.random``'s signature, drawn from
    ``os.urandom``: for every random choice the privacy analysis treats as secret
    (Poisson sampling, the stochastic rounding of HE quantisation). A seeded numpy
    generator is a drop-in replacement, for ``--insecure-noise`` runs only."""

    def random(self, size: int | tuple[int, ...]) -> np.ndarray:
        shape = (size,) if isinstance(size, int) else tuple(size)
        n = int(np.prod(shape)) if shape else 1
        # (0, 1] -> [0, 1): numpy's convention, so `u < p` has probability exactly p.
        return (1.0 - _uniform_open(n)).reshape(shape)
