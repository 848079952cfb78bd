"""Resample an image into network space and normalise it."""

from __future__ import annotations

import numpy as np
import torch

from ..ops.grid import affine_points
from ..ops.sampling import sample_linear


def conform(data: np.ndarray | torch.Tensor, net_to_img: np.ndarray, extent: int,
            device: torch.device | str = "cpu", *, normalize: bool = True) -> torch.Tensor:
    """Network input ``(extent,)*3``: trilinear resampling with zero outside the image
    (the matrix cast to float32, as the official code), then min-max scaled to [0, 1]
    (``normalize=False``: the values as resampled, e.g. a mask)."""
    vol = torch.as_tensor(np.asarray(data, np.float32), device=device)
    points = affine_points(net_to_img, (extent,) * 3, device=device)
    # interpolate in float64 so that float32 coordinate normalisation adds no error
    out = sample_linear(vol.double(), points, boundary="zeros").float()
    if not normalize:
        return out
    out = out - out.min()
    top = out.max()
    return out / top if top > 0 else out
