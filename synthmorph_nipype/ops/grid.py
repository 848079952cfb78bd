"""Voxel grids and affine maps of them."""

from __future__ import annotations

import numpy as np
import torch


def voxel_grid(shape, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """All voxel indices of ``shape`` as a ``(*shape, 3)`` tensor.

    >>> voxel_grid((2, 1, 1))[:, 0, 0]
    tensor([[0., 0., 0.],
            [1., 0., 0.]])
    """
    axes = [torch.arange(int(n), dtype=dtype, device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _rows(matrix, dtype, device) -> torch.Tensor:
    """The top 3x4 of a matrix (numpy or torch; a tensor keeps its autograd history)."""
    if isinstance(matrix, torch.Tensor):
        return matrix[:3].to(dtype=dtype, device=device)
    return torch.as_tensor(np.asarray(matrix)[:3], dtype=dtype, device=device)


def affine_points(matrix, shape, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """``matrix @ [i, j, k, 1]`` for every voxel of ``shape``, as ``(*shape, 3)``.

    The matrix (3x4 or 4x4) is cast to ``dtype`` before use, as the official code does.
    """
    m = _rows(matrix, dtype, device)
    grid = voxel_grid(shape, dtype=dtype, device=device)
    return grid @ m[:, :3].T + m[:, 3]


def apply_affine(matrix, points: torch.Tensor) -> torch.Tensor:
    """Apply a 3x4 or 4x4 matrix (numpy, or torch, differentiably) to ``(..., 3)`` points in
    the points' dtype."""
    m = _rows(matrix, points.dtype, points.device)
    return points @ m[:, :3].T + m[:, 3]
