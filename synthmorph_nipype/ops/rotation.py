"""Rotation matrices, in numpy only (readers of transform files need no torch).

One convention for the package: angles about the x, y and z axes in degrees, x applied
first, ``R = Rz @ Ry @ Rx``, each a right-handed rotation (counter-clockwise looking down
the axis).
"""

from __future__ import annotations

import numpy as np

# the plane each axis turns: x turns (y, z), y turns (z, x), z turns (x, y)
_PLANES = ((1, 2), (2, 0), (0, 1))


def _about(axis: int, radians: np.ndarray) -> np.ndarray:
    out = np.zeros(radians.shape + (3, 3))
    i, j = _PLANES[axis]
    c, s = np.cos(radians), np.sin(radians)
    out[..., axis, axis] = 1.0
    out[..., i, i], out[..., j, j] = c, c
    out[..., i, j], out[..., j, i] = -s, s
    return out


def rotation(angles_deg) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles ``(..., 3)`` in degrees, as ``(..., 3, 3)`` float64.

    >>> np.round(rotation((0, 0, 90)) @ [1, 0, 0], 6)
    array([0., 1., 0.])
    >>> np.round(rotation((0, 90, 0)) @ [0, 0, 1], 6)
    array([1., 0., 0.])
    >>> rotation(np.zeros((2, 5, 3))).shape
    (2, 5, 3, 3)
    """
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    if a.shape[-1:] != (3,):
        raise ValueError(f"expected angles (..., 3), got shape {a.shape}")
    return _about(2, a[..., 2]) @ _about(1, a[..., 1]) @ _about(0, a[..., 0])


def axis_angle(axis, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about ``axis`` (any length; Rodrigues' formula).

    >>> np.round(axis_angle([0, 0, 2], 90) @ [1, 0, 0], 6)
    array([0., 1., 0.])
    >>> r = axis_angle([1, 2, 3], 30)
    >>> round(float(np.degrees(np.arccos((np.trace(r) - 1) / 2))), 6)
    30.0
    """
    k = np.asarray(axis, dtype=np.float64)
    norm = np.linalg.norm(k)
    if norm == 0:
        raise ValueError("the rotation axis must not be zero")
    k = k / norm
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * cross @ cross


def rotation_angle(matrix) -> float:
    """The angle in degrees of a rotation matrix (its top 3x3).

    >>> round(rotation_angle(rotation((0, 0, 30))), 6)
    30.0
    """
    m = np.asarray(matrix, dtype=np.float64)[:3, :3]
    return float(np.degrees(np.arccos(np.clip((np.trace(m) - 1) / 2, -1, 1))))
