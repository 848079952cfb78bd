"""Resample an image into network space and normalise it."""

from __future__ import annotations

import numpy as np
import torch

from ..ops.grid import affine_points
from ..ops.sampling import axis_permutation, resample_axis_aligned, sample_linear


def conform(data: np.ndarray | torch.Tensor, net_to_img: np.ndarray, extent: int,
            device: torch.device | str = "cpu", *, normalize: bool = True) -> torch.Tensor:
    """Network input ``(extent,)*3``: trilinear resampling with zero outside the image
    (the matrix cast to float32, as the official code), then min-max scaled to [0, 1]
    (``normalize=False``: the values as resampled, e.g. a mask). Grids with parallel axes
    (most scans: no obliquity) take the separable path, same values in a few passes."""
    vol = torch.as_tensor(np.asarray(data, np.float32), device=device)
    shape = (extent,) * 3
    if axis_permutation(net_to_img, shape) is not None:  # parallel axes: separable
        out = resample_axis_aligned(vol, net_to_img, shape)
    else:
        out = torch.zeros(shape, device=device)
        box = content_box(net_to_img, vol.shape, shape)
        if box is not None:  # the grid's voxels outside it are off the image: 0
            points = affine_points(net_to_img, shape, device=device, box=box)
            # a CPU gathers with weights exact in the points' dtype; grid_sample (other
            # devices) normalises the coordinates, so it interpolates in float64 to add
            # no error
            src = vol if vol.device.type == "cpu" else vol.double()
            out[tuple(slice(*r) for r in box)] = sample_linear(src, points,
                                                               boundary="zeros").float()
    if not normalize:
        return out
    out = out - out.min()
    top = out.max()
    return out / top if top > 0 else out


def content_box(grid_to_img: np.ndarray, img_shape, shape
                ) -> tuple[tuple[int, int], ...] | None:
    """``(start, stop)`` per axis of the block of a grid of ``shape`` that holds every
    voxel whose point ``grid_to_img`` maps into the image's voxel box (one voxel of
    margin for the rounding of float32 coordinates); None when no voxel can.

    >>> content_box(np.diag([1.0, 1.0, 1.0, 1.0]), (4, 5, 6), (10, 10, 10))
    ((0, 5), (0, 6), (0, 7))
    >>> shifted = np.eye(4); shifted[0, 3] = 20  # the image starts 20 voxels beyond
    >>> content_box(shifted, (4, 5, 6), (10, 10, 10)) is None
    True
    """
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in img_shape[:3]], indexing="ij"),
                       float).reshape(3, -1)
    to_grid = np.linalg.inv(np.asarray(grid_to_img, float))
    pts = to_grid[:3, :3] @ corners + to_grid[:3, 3:]
    lo = np.maximum(np.floor(pts.min(axis=1)) - 1, 0).astype(int)
    hi = np.minimum(np.ceil(pts.max(axis=1)) + 2, shape).astype(int)
    if (hi <= lo).any():
        return None
    return tuple((int(a), int(b)) for a, b in zip(lo, hi, strict=True))
