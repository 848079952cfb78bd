"""Points of voxel grids and sampling volumes at world points (RAS mm)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

LPS = np.array([-1.0, -1.0, 1.0])
CHUNK = 1 << 20  # voxels per chunk of point-wise work


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points (..., 3) through a 4x4 matrix."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def slab_points(shape: Sequence[int], affine: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """World points (X, Y, k1 - k0, 3) of the voxels with last index in [k0, k1)."""
    ijk = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(k0, k1),
                               indexing="ij"), axis=-1).astype(np.float64)
    return apply_affine(affine, ijk)


def slabs(shape: Sequence[int]):
    """Ranges of the last axis that hold about ``CHUNK`` voxels each."""
    step = max(1, CHUNK // (shape[0] * shape[1]))
    for k0 in range(0, shape[2], step):
        yield k0, min(k0 + step, shape[2])


def sample(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int,
           mode: str = "constant") -> np.ndarray:
    """Values of ``volume`` (voxel-to-world ``affine``) at world ``points`` (..., 3);
    ``order`` 0 is nearest neighbour, 1 trilinear; zero outside unless ``mode`` says."""
    vox = apply_affine(np.linalg.inv(affine), points.reshape(-1, 3)).T
    out = ndimage.map_coordinates(volume, vox, order=order, mode=mode, cval=0.0,
                                  prefilter=False)
    return out.reshape(points.shape[:-1])
