"""Integration of stationary velocity fields (scaling and squaring)."""

from __future__ import annotations

import torch

from .grid import voxel_grid
from .sampling import sample_linear


def integrate_svf(svf: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Integrate a channels-last SVF ``(X, Y, Z, 3)``, or a batch ``(B, X, Y, Z, 3)``, in
    voxel units into a displacement of the same shape.

    ``v = svf / 2**steps``, then ``steps`` times ``v <- v + v(x + v)``, with fields
    interpolated on clamped coordinates. ``steps=0`` returns the SVF itself.

    >>> svf = torch.zeros(4, 4, 4, 3); svf[..., 0] = 1.0
    >>> integrate_svf(svf, 3)[0, 0, 0]
    tensor([1., 0., 0.])
    >>> integrate_svf(torch.stack([svf, -svf]), 3)[:, 0, 0, 0, 0]
    tensor([ 1., -1.])
    """
    if steps < 0:
        raise ValueError("the number of integration steps must be >= 0")
    if svf.ndim == 5:
        return torch.stack([integrate_svf(v, steps) for v in svf])
    if svf.ndim != 4 or svf.shape[-1] != 3:
        raise ValueError(f"expected an SVF (X, Y, Z, 3), got shape {tuple(svf.shape)}")
    if steps == 0:
        return svf
    grid = voxel_grid(svf.shape[:3], dtype=svf.dtype, device=svf.device)
    disp = svf / 2**steps
    for _ in range(steps):
        disp = disp + sample_linear(disp, grid + disp, boundary="clamp")
    return disp
