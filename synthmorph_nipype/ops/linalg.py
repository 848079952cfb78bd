"""Differentiable matrix functions on batches (torch)."""

from __future__ import annotations

import torch


def sqrtm(matrix: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Principal square root of a batch of matrices (Denman-Beavers iteration).

    >>> m = torch.tensor([[[4.0, 0.0], [0.0, 9.0]]], dtype=torch.float64)
    >>> sqrtm(m)[0].diagonal()
    tensor([2., 3.], dtype=torch.float64)
    """
    y = matrix
    z = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device).expand_as(matrix)
    for _ in range(iterations):
        y, z = 0.5 * (y + torch.linalg.inv(z)), 0.5 * (z + torch.linalg.inv(y))
    return y


def rotation_exp(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrix ``exp([w]x)`` of an axis-angle vector ``w`` (3,) in radians, the
    parameterisation an optimiser moves smoothly through (differentiable).

    >>> r = rotation_exp(torch.tensor([0.0, 0.0, torch.pi / 2], dtype=torch.float64))
    >>> (r @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)).round(decimals=6)
    tensor([0., 1., 0.], dtype=torch.float64)
    """
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    k = torch.stack([torch.stack([zero, -w[2], w[1]]), torch.stack([w[2], zero, -w[0]]),
                     torch.stack([-w[1], w[0], zero])])
    return torch.linalg.matrix_exp(k)
