"""Resample images through world-space transforms onto a reference grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nb
import numpy as np
import torch

from ..errors import SynthMorphError
from ..ops.grid import apply_affine
from ..ops.sampling import sample_linear, sample_nearest
from ..transforms.base import ImageGrid, Transform

SLAB = 1 << 20  # points mapped per step, to bound memory


def resample(img, transform: Transform, reference: ImageGrid, *, method: str = "linear",
             fill: float = 0.0, dtype=None):
    """Resample ``img`` onto ``reference`` through the pull-back ``transform``.

    Linear interpolation gives ``fill`` outside the image; ``nearest`` copies voxel values
    (label maps keep their labels). The output dtype is ``dtype`` or the input's; values
    are rounded and clipped for integer types.
    """
    if method not in ("linear", "nearest"):
        raise SynthMorphError(f"unknown interpolation {method!r}, use linear or nearest")
    src = np.asanyarray(img.dataobj)
    src = src.reshape(src.shape[:3] + src.shape[3:]) if src.ndim > 3 else src
    vol = torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32 if method == "linear"
                                                else src.dtype.newbyteorder("=")))
    if vol.ndim > 3:
        vol = vol.reshape(*vol.shape[:3], -1)
    to_index = np.linalg.inv(np.asarray(img.affine, float))
    ref_pts = reference.world_points().reshape(-1, 3)
    out = []
    for start in range(0, len(ref_pts), SLAB):
        pts = transform.map(ref_pts[start:start + SLAB])
        idx = apply_affine(to_index, torch.from_numpy(pts))
        if method == "linear":
            out.append(sample_linear(vol, idx.float(), boundary="zeros", fill=fill))
        else:
            out.append(sample_nearest(vol, idx, fill=fill))
    data = torch.cat(out).reshape(*reference.shape, *vol.shape[3:]).numpy()
    return make_image(img, _cast(data, np.dtype(dtype) if dtype else src.dtype),
                      reference.affine)


def _cast(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "iu" and data.dtype.kind == "f":
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    return data.astype(dtype)


def make_image(like, data: np.ndarray, affine: np.ndarray):
    """An image of ``like``'s class and header with new data and voxel-to-world matrix."""
    if isinstance(like, nb.Nifti1Image | nb.Nifti2Image):
        hdr = like.header.copy()
        hdr.set_data_dtype(data.dtype)
        out = like.__class__(data, affine, hdr)
        out.set_sform(affine, 1)
        out.set_qform(affine, 1)
        return out
    if isinstance(like, nb.MGHImage):
        return nb.MGHImage(data, affine)
    return nb.Nifti1Image(data, affine)


def save_image(img, path: str | Path) -> None:
    """Save in the format the file name asks for (``.mgz``/``.mgh`` or NIfTI)."""
    name = str(path).lower()
    if name.endswith((".mgz", ".mgh")) and not isinstance(img, nb.MGHImage):
        img = nb.MGHImage(np.asarray(img.dataobj), img.affine)
    elif not name.endswith((".mgz", ".mgh")) and isinstance(img, nb.MGHImage):
        img = nb.Nifti1Image(np.asarray(img.dataobj), img.affine)
    nb.save(img, str(path))


def has_shear(affine: np.ndarray, tol: float = 1e-4) -> bool:
    """Whether a voxel-to-world matrix has shear (non-orthogonal axes), which a NIfTI qform
    cannot hold.

    >>> has_shear(np.diag([2.0, 1.0, 3.0, 1.0])), has_shear(np.array(
    ...     [[1, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    (False, True)
    """
    m = np.asarray(affine, float)[:3, :3]
    axes = m / np.linalg.norm(m, axis=0)
    return not np.allclose(axes.T @ axes, np.eye(3), atol=tol)


def header_only(img, transform: Transform):
    """Move ``img`` by changing its voxel-to-world matrix only (affine transforms)."""
    affine = transform.as_affine() if hasattr(transform, "as_affine") else None
    if affine is None:
        raise SynthMorphError("header-only output needs an affine transform")
    return make_image(img, np.asanyarray(img.dataobj), affine.inverse().matrix @ img.affine)
