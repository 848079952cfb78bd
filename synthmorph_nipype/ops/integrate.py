"""Integration of stationary velocity fields (scaling and squaring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import REVERSED, normalised_matrix
from .sampling import grid_sample


def integrate_svf(svf: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Integrate a channels-last SVF ``(X, Y, Z, 3)``, or a batch ``(B, X, Y, Z, 3)``, in
    voxel units into a displacement of the same shape.

    ``v = svf / 2**steps``, then ``steps`` times ``v <- v + v(x + v)``, with fields
    interpolated on clamped coordinates. ``steps=0`` returns the SVF itself. The squaring
    runs in ``grid_sample``'s own frame (normalised units, axes reversed, channels first),
    so that each step is one interpolation and one addition.

    >>> svf = torch.zeros(4, 4, 4, 3); svf[..., 0] = 1.0
    >>> integrate_svf(svf, 3)[0, 0, 0]
    tensor([1., 0., 0.])
    >>> integrate_svf(torch.stack([svf, -svf]), 3)[:, 0, 0, 0, 0]
    tensor([ 1., -1.])
    """
    if steps < 0:
        raise ValueError("the number of integration steps must be >= 0")
    batched = svf.ndim == 5
    if svf.ndim not in (4, 5) or svf.shape[-1] != 3:
        raise ValueError(f"expected an SVF (X, Y, Z, 3) or (B, X, Y, Z, 3), got shape "
                         f"{tuple(svf.shape)}")
    if steps == 0:
        return svf
    v = svf if batched else svf[None]
    shape = v.shape[1:4]
    scale = v.new_tensor(normalised_matrix(shape).diagonal()[:3])
    # channels last in normalised (x, y, z) = (k, j, i) units: grid_sample's frame
    v = (v * scale)[..., REVERSED] / 2**steps
    eye = torch.eye(3, 4, dtype=v.dtype, device=v.device).expand(v.shape[0], 3, 4)
    identity = F.affine_grid(eye, [v.shape[0], 3, *shape], align_corners=True)
    v = v.permute(0, 4, 1, 2, 3)
    for _ in range(steps):
        v = v + grid_sample(v, identity + v.permute(0, 2, 3, 4, 1), mode="bilinear",
                            padding_mode="border", align_corners=True)
    out = v.permute(0, 2, 3, 4, 1)[..., REVERSED] / scale
    return out if batched else out[0]
