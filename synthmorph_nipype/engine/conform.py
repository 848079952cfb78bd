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
        points = affine_points(net_to_img, shape, device=device)
        # a CPU gathers with weights exact in the points' dtype; grid_sample (other
        # devices) normalises the coordinates, so it interpolates in float64 to add no error
        src = vol if vol.device.type == "cpu" else vol.double()
        out = sample_linear(src, points, boundary="zeros").float()
    if not normalize:
        return out
    out = out - out.min()
    top = out.max()
    return out / top if top > 0 else out
