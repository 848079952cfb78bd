"""Voxel grids, the coordinate frames the package samples in, and affine maps of them.

Three frames of one grid of ``shape``, all in array order ``(i, j, k)``:

index
    zero-based voxel indices, the package's own (every sampler takes these);
normalised
    ``[-1, 1]`` from the first to the last voxel centre, the frame of
    ``torch.nn.functional.grid_sample`` and ``affine_grid`` with ``align_corners=True``
    (which also want the axes reversed, :data:`REVERSED`);
centred
    indices minus the centre ``(n - 1) / 2``, the affine detector's frame.
"""

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


REVERSED = [2, 1, 0]
"""Axis order of ``grid_sample``'s coordinates, ``(x, y, z) = (k, j, i)``, for ``(i, j, k)``."""


def normalised_matrix(shape) -> np.ndarray:
    """4x4 map from voxel indices to the normalised frame (module docstring); a single
    voxel along an axis counts as two (no division by zero).

    >>> normalised_matrix((3, 5, 1)) @ [2, 0, 0, 1]
    array([ 1., -1., -1.,  1.])
    """
    half = np.maximum(np.asarray(shape, dtype=np.float64) - 1, 1) / 2
    out = np.diag(list(1 / half) + [1.0])
    out[:3, 3] = -1.0
    return out


def to_grid_sample(coords: torch.Tensor, shape) -> torch.Tensor:
    """Voxel indices ``(..., 3)`` -> the ``grid`` argument of ``grid_sample`` (normalised,
    axes reversed), in the coordinates' dtype.

    >>> to_grid_sample(torch.tensor([[2.0, 0.0, 4.0]]), (3, 5, 5))
    tensor([[ 1., -1.,  1.]])
    """
    m = torch.as_tensor(normalised_matrix(shape), dtype=coords.dtype, device=coords.device)
    return torch.addcmul(m[:3, 3], coords, m.diagonal()[:3]).flip(-1)  # flip: REVERSED


def _shift(offset: float, like: torch.Tensor) -> torch.Tensor:
    out = torch.eye(4, dtype=like.dtype, device=like.device)
    out[:3, 3] = offset
    return out


def centred_to_index(matrix: torch.Tensor, extent: int) -> torch.Tensor:
    """A matrix of the centred frame of a cube of side ``extent`` in the index frame,
    ``T(+c) @ matrix @ T(-c)`` with ``c = (extent - 1) / 2`` (batched or not).

    >>> centred_to_index(torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])), 5)[:3, 3]
    tensor([-2., -2., -2.])
    """
    c = (extent - 1) / 2
    return _shift(c, matrix) @ matrix @ _shift(-c, matrix)


def index_to_centred(matrix: torch.Tensor, extent: int) -> torch.Tensor:
    """The inverse of :func:`centred_to_index`.

    >>> m = torch.rand(4, 4, dtype=torch.float64)
    >>> torch.allclose(index_to_centred(centred_to_index(m, 7), 7), m)
    True
    """
    c = (extent - 1) / 2
    return _shift(-c, matrix) @ matrix @ _shift(c, matrix)


def _rows(matrix, dtype, device) -> torch.Tensor:
    """The top 3x4 of a matrix (numpy or torch; a tensor keeps its autograd history)."""
    if isinstance(matrix, torch.Tensor):
        return matrix[:3].to(dtype=dtype, device=device)
    return torch.as_tensor(np.asarray(matrix)[:3], dtype=dtype, device=device)


def affine_points(matrix, shape, *, dtype=torch.float32, device=None,
                  rows: tuple[int, int] | None = None,
                  box: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
    """``matrix @ [i, j, k, 1]`` for every voxel of ``shape``, as ``(*shape, 3)``; with
    ``rows = (i0, i1)`` only for the voxels with ``i0 <= i < i1`` (a slab, see
    :func:`slabs`), as ``(i1 - i0, *shape[1:], 3)``, and with ``box`` (one ``(start,
    stop)`` per axis) only for that block; either way the same values as those voxels
    of the whole grid.

    The matrix (3x4 or 4x4) is cast to ``dtype`` before use, as the official code does.

    >>> m = torch.eye(4); m[0, 3] = 10
    >>> affine_points(m, (4, 2, 2), rows=(2, 3))[0, 1, 0]
    tensor([12.,  1.,  0.])
    >>> torch.equal(affine_points(m, (4, 3, 2), box=((1, 3), (2, 3), (0, 2))),
    ...             affine_points(m, (4, 3, 2))[1:3, 2:3, 0:2])
    True
    """
    m = _rows(matrix, dtype, device)
    if box is None:
        box = ((0, int(shape[0])) if rows is None else rows, (0, int(shape[1])),
               (0, int(shape[2])))
    # one broadcast sum of the three axes' terms: no (N, 3) index grid, no matmul
    ax = [torch.arange(int(a), int(b), dtype=dtype, device=device) for a, b in box]
    plane = (ax[0][:, None] * m[:, 0] + m[:, 3])[:, None] + (ax[1][:, None] * m[:, 1])[None]
    return plane[:, :, None] + (ax[2][:, None] * m[:, 2])[None, None]


def slabs(shape, points: int = 1 << 21):
    """``(i0, i1)`` ranges of the first axis that cover ``shape`` with about ``points``
    voxels each (at least one row): whole-grid work done slab by slab keeps its memory
    bounded by the slab, not the grid.

    >>> list(slabs((5, 10, 10), points=250))
    [(0, 2), (2, 4), (4, 5)]
    """
    step = max(1, points // max(1, int(np.prod(shape[1:]))))
    for i0 in range(0, int(shape[0]), step):
        yield i0, min(int(shape[0]), i0 + step)


def apply_affine(matrix, points: torch.Tensor) -> torch.Tensor:
    """Apply a 3x4 or 4x4 matrix (numpy, or torch, differentiably) to ``(..., 3)`` points in
    the points' dtype."""
    m = _rows(matrix, points.dtype, points.device)
    return points @ m[:, :3].T + m[:, 3]
