"""Network space: the 1 mm isotropic LIA grid of extent ``e`` that the networks see.

Network voxel ``(e/2, e/2, e/2)`` sits on the FreeSurfer centre of an image,
``c_ras = vox2ras @ (shape / 2)`` (``shape / 2``, not ``(shape - 1) / 2``), as in
``mri_synthmorph``. Array axes point to Left, Inferior and Anterior.
"""

from __future__ import annotations

import numpy as np

EXTENTS = (192, 256)

# Columns: world (RAS) direction of the network's array axes i, j, k (L, I, A).
LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def center_ras(vox2ras: np.ndarray, shape) -> np.ndarray:
    """FreeSurfer's ``c_ras``: world position of voxel ``shape / 2``.

    >>> center_ras(np.eye(4), (10, 20, 31))
    array([ 5. , 10. , 15.5])
    """
    return (np.asarray(vox2ras, float) @ np.r_[np.asarray(shape[:3], float) / 2, 1])[:3]


def net_to_ras(center: np.ndarray, extent: int) -> np.ndarray:
    """Voxel-to-world matrix of the network grid centred on ``center``."""
    out = np.eye(4)
    out[:3, :3] = LIA
    out[:3, 3] = np.asarray(center, float) - LIA @ np.full(3, extent / 2)
    return out


def net_to_image(vox2ras: np.ndarray, center: np.ndarray, extent: int) -> np.ndarray:
    """Network index to image index: ``inv(vox2ras) @ net_to_ras``."""
    return np.linalg.inv(np.asarray(vox2ras, float)) @ net_to_ras(center, extent)
