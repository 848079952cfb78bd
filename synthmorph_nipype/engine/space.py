"""Network space: the 1 mm isotropic LIA grid of extent ``e`` that the networks see.

Network voxel ``(e/2, e/2, e/2)`` sits on the FreeSurfer centre of an image
(:attr:`~synthmorph_nipype.transforms.base.ImageGrid.center_ras`), as in ``mri_synthmorph``.
Array axes point to Left, Inferior and Anterior.
"""

from __future__ import annotations

import numpy as np

# Columns: world (RAS) direction of the network's array axes i, j, k (L, I, A).
LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def net_to_ras(center: np.ndarray, extent: int) -> np.ndarray:
    """Voxel-to-world matrix of the network grid centred on ``center``."""
    out = np.eye(4)
    out[:3, :3] = LIA
    out[:3, 3] = np.asarray(center, float) - LIA @ np.full(3, extent / 2)
    return out

