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


def pool_field(field: torch.Tensor, pool: int) -> torch.Tensor:
    """A channels-last displacement ``(X, Y, Z, 3)`` or ``(B, X, Y, Z, 3)`` (voxels) on a
    grid ``pool`` times coarser, in the coarse grid's voxels: each coarse voxel holds the
    mean of its ``pool**3`` fine voxels, divided by ``pool``. Coarse voxel ``k`` sits at
    fine voxel ``pool * k + (pool - 1) / 2``; :func:`upsample_field` goes back.

    >>> pool_field(torch.full((4, 4, 4, 3), 2.0), 2).shape, float(pool_field(
    ...     torch.full((4, 4, 4, 3), 2.0), 2).max())
    (torch.Size([2, 2, 2, 3]), 1.0)
    """
    if pool == 1:
        return field
    batched = field.ndim == 5
    x = (field if batched else field[None]).permute(0, 4, 1, 2, 3)
    out = (F.avg_pool3d(x, pool) / pool).permute(0, 2, 3, 4, 1)
    return out if batched else out[0]


def upsample_field(field: torch.Tensor, shape, pool: int) -> torch.Tensor:
    """The inverse of :func:`pool_field`: a coarse channels-last displacement back on the
    fine grid of ``shape`` (trilinear, coarse voxel ``k`` at fine ``pool * k + (pool - 1)
    / 2``), in the fine grid's voxels.

    >>> fine = torch.zeros(8, 8, 8, 3); fine[..., 0] = torch.arange(8.0)[:, None, None]
    >>> back = upsample_field(pool_field(fine, 2), (8, 8, 8), 2)
    >>> torch.allclose(back[1:-1], fine[1:-1])  # a linear field, away from the edges
    True
    """
    if pool == 1:
        return field
    batched = field.ndim == 5
    x = (field if batched else field[None]).permute(0, 4, 1, 2, 3)
    out = pool * F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)
    out = out.permute(0, 2, 3, 4, 1)
    return out if batched else out[0]


#: scaling-and-squaring steps of the half-way warps between the passes of a cascade
HALF_WAY_STEPS = 5


def half_way(svf: torch.Tensor, steps: int = HALF_WAY_STEPS
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The displacements of ``exp(svf / 2)`` and ``exp(-svf / 2)`` on the SVF's grid
    (channels last, voxels), integrated together.

    >>> svf = torch.zeros(4, 4, 4, 3); svf[..., 1] = 2.0
    >>> a, b = half_way(svf)
    >>> float(a[..., 1].mean()), float(b[..., 1].mean())
    (1.0, -1.0)
    """
    both = integrate_svf(torch.stack([0.5 * svf, -0.5 * svf]), steps)
    return both[0], both[1]
