"""Compose network outputs with the image matrices into world-space (RAS) transforms."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..ops.grid import affine_points, apply_affine, slabs
from ..ops.sampling import axis_coordinates, axis_permutation, sample_linear

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
    grow with the grid.

    With ``net_to_src_ras = inv(A) @ N`` it is the deformable part ``w`` left after an
    affine ``A`` of the whole map (``A(x + w(x)) = N(p + u(p))``, ITK's composite
    layout), in the same single pass."""
    dev = out.device
    field = partial(sample_linear, out, boundary="clamp") if isinstance(out, torch.Tensor) \
        else out
    # dst's axes parallel to the network grid's (a scan without obliquity): a half-
    # resolution field is interpolated axis by axis, not point by point
    perm = None if isinstance(out, torch.Tensor) else axis_permutation(dst_to_net, dst_shape)
    coords = None if perm is None else axis_coordinates(dst_to_net, dst_shape, perm)
    total = np.empty((*dst_shape, 3), np.float32)
    for rows in slabs(dst_shape, SLAB):
        p = affine_points(dst_to_net, dst_shape, device=dev, rows=rows)
        if coords is None:
            q = p + field(p)
        else:
            q = p + out.separable([coords[0][slice(*rows)], *coords[1:]], perm)
        disp = apply_affine(net_to_src_ras, q)
        disp -= affine_points(dst_affine, dst_shape, device=dev, rows=rows)
        total[rows[0]:rows[1]] = disp.cpu().numpy()
    return total
