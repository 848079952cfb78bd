"""Compose network outputs with the image matrices into world-space (RAS) transforms."""

from __future__ import annotations

import numpy as np
import torch

from ..ops.grid import affine_points, apply_affine
from ..ops.sampling import sample_linear


def world_matrix(out: np.ndarray, net_to_src_ras: np.ndarray, dst_ras_to_net: np.ndarray):
    """World pull-back ``net_to_src_ras @ out @ dst_ras_to_net`` (dst RAS -> src RAS)."""
    return net_to_src_ras @ out @ dst_ras_to_net


def world_field(out: torch.Tensor, net_to_src_ras: np.ndarray, dst_to_net: np.ndarray,
                dst_affine: np.ndarray, dst_shape) -> np.ndarray:
    """RAS displacement on the dst grid: ``src_ras(p + u(p)) - dst_ras(x)``, ``p`` the
    network point of dst voxel ``x`` and ``u`` interpolated on clamped coordinates."""
    dev = out.device
    p = affine_points(dst_to_net, dst_shape, device=dev)
    q = p + sample_linear(out, p, boundary="clamp")
    del p
    disp = apply_affine(net_to_src_ras, q)
    del q
    disp -= affine_points(dst_affine, dst_shape, device=dev)
    return disp.cpu().numpy()


def residual_field(total: np.ndarray, dst_affine: np.ndarray, affine: np.ndarray,
                   dst_shape) -> np.ndarray:
    """Displacement ``w`` with ``affine(x + w(x)) = x + total(x)`` on the dst grid: the
    deformable part left after taking out the affine one (ITK composite layout)."""
    pts = affine_points(dst_affine, dst_shape, dtype=torch.float64)
    target = pts + torch.from_numpy(total).double()
    res = apply_affine(np.linalg.inv(affine), target) - pts
    return res.float().numpy()


def push_field(total: np.ndarray, src_affine: np.ndarray, affine: np.ndarray,
               src_shape) -> np.ndarray:
    """Displacement ``v`` with ``x + v(x) = affine(x + total(x))`` on the grid of ``total``."""
    pts = affine_points(src_affine, src_shape, dtype=torch.float64)
    res = apply_affine(affine, pts + torch.from_numpy(total).double()) - pts
    return res.float().numpy()
