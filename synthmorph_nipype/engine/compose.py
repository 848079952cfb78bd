"""Compose network outputs with the image matrices into world-space (RAS) transforms."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..ops.grid import affine_points, apply_affine, slabs
from ..ops.sampling import sample_linear

if TYPE_CHECKING:
    from .network import HalfResField

SLAB = 1 << 21  # voxels per slab of whole-grid work, to bound memory


def world_matrix(out: np.ndarray, net_to_src_ras: np.ndarray, dst_ras_to_net: np.ndarray):
    """World pull-back ``net_to_src_ras @ out @ dst_ras_to_net`` (dst RAS -> src RAS)."""
    return net_to_src_ras @ out @ dst_ras_to_net


def world_field(out: torch.Tensor | HalfResField, net_to_src_ras: np.ndarray,
                dst_to_net: np.ndarray, dst_affine: np.ndarray, dst_shape) -> np.ndarray:
    """RAS displacement on the dst grid: ``src_ras(p + u(p)) - dst_ras(x)``, ``p`` the
    network point of dst voxel ``x`` and ``u`` an ``(e, e, e, 3)`` field interpolated on
    clamped coordinates, or a :class:`~synthmorph_nipype.engine.network.HalfResField`
    evaluated at the points. Computed slab by slab: memory beyond the result does not
    grow with the grid."""
    dev = out.device
    field = partial(sample_linear, out, boundary="clamp") if isinstance(out, torch.Tensor) \
        else out
    total = np.empty((*dst_shape, 3), np.float32)
    for rows in slabs(dst_shape, SLAB):
        p = affine_points(dst_to_net, dst_shape, device=dev, rows=rows)
        q = p + field(p)
        disp = apply_affine(net_to_src_ras, q)
        disp -= affine_points(dst_affine, dst_shape, device=dev, rows=rows)
        total[rows[0]:rows[1]] = disp.cpu().numpy()
    return total


def residual_field(total: np.ndarray, dst_affine: np.ndarray, affine: np.ndarray,
                   dst_shape) -> np.ndarray:
    """Displacement ``w`` with ``affine(x + w(x)) = x + total(x)`` on the dst grid: the
    deformable part left after taking out the affine one (ITK composite layout).
    Overwrites and returns ``total`` (float32): :func:`push_field` through the inverse."""
    return push_field(total, dst_affine, np.linalg.inv(affine), dst_shape)


def push_field(total: np.ndarray, src_affine: np.ndarray, affine: np.ndarray,
               src_shape) -> np.ndarray:
    """Displacement ``v`` with ``x + v(x) = affine(x + total(x))`` on the grid of ``total``.
    Overwrites and returns ``total`` (float32), slab by slab."""
    for i0, i1 in slabs(src_shape, SLAB):
        pts = affine_points(src_affine, src_shape, dtype=torch.float64, rows=(i0, i1))
        target = pts + torch.from_numpy(total[i0:i1]).double()
        total[i0:i1] = (apply_affine(affine, target) - pts).float().numpy()
    return total
