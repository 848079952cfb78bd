"""Resample images through world-space transforms onto a reference grid."""

from __future__ import annotations

import warnings

import nibabel as nb
import numpy as np
import torch

from ..errors import DataWarning, SynthMorphError
from ..ops.grid import apply_affine, slabs
from ..ops.sampling import sample_linear, sample_nearest
from ..transforms.base import ImageGrid, Transform

SLAB = 1 << 20  # points mapped per step, to bound memory


def resample(img, transform: Transform, reference: ImageGrid, *, method: str = "linear",
             fill: float = 0.0, dtype=None):
    """Resample ``img`` onto ``reference`` through the pull-back ``transform``.

    Linear interpolation gives ``fill`` outside the image (outside the voxels' extent, as
    ITK: the half voxel beyond the outer voxel centres repeats the edge); ``nearest``
    copies voxel values (label maps keep their labels). The output dtype is ``dtype`` or
    the input's; values are rounded and clipped for integer types.
    """
    if method not in ("linear", "nearest"):
        raise SynthMorphError(f"unknown interpolation {method!r}, use linear or nearest")
    src = np.asanyarray(img.dataobj)
    stored = np.dtype(img.get_data_dtype())
    # default: the stored type, unless the image is scaled (then its values are floats)
    out_dtype = np.dtype(dtype) if dtype else stored if src.dtype == stored else np.dtype("f4")
    _check_fill(fill, out_dtype)
    work = np.float32 if method == "linear" else (
        np.int64 if src.dtype.kind in "biu" else src.dtype.newbyteorder("="))
    vol = torch.from_numpy(np.ascontiguousarray(src, dtype=work))
    if vol.ndim > 3:
        vol = vol.reshape(*vol.shape[:3], -1)
    to_index = np.linalg.inv(np.asarray(img.affine, float))
    data = np.empty((*reference.shape, *vol.shape[3:]), out_dtype)
    lo, hi = np.inf, -np.inf
    for i0, i1 in slabs(reference.shape, SLAB):  # memory bounded by a slab, not the grid
        pts = transform.map_grid(reference, (i0, i1))
        idx = apply_affine(to_index, torch.from_numpy(pts))
        if method == "linear":
            # ITK's rule (values up to half a voxel beyond the edge centres), so that
            # ITK, ANTs and SimpleITK give the same image through our transforms
            vals = sample_linear(vol, idx.float(), boundary="itk", fill=fill)
        else:
            vals = sample_nearest(vol, idx, fill=fill)
        vals = vals.reshape(i1 - i0, *data.shape[1:]).numpy()
        if vals.size:
            lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
        data[i0:i1] = _cast(vals, out_dtype)
    _warn_if_clipped(lo, hi, out_dtype)
    return make_image(img, data, reference.affine)


def _check_fill(fill: float, dtype: np.dtype) -> None:
    if dtype.kind in "biu":
        info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
        if fill != int(fill) or not info.min <= fill <= info.max:
            raise SynthMorphError(f"fill value {fill:g} does not fit the output type {dtype}")


def _warn_if_clipped(lo: float, hi: float, dtype: np.dtype) -> None:
    """One warning when values ``lo`` to ``hi`` were clipped to the integer ``dtype``."""
    if dtype.kind in "iu" and lo <= hi:
        info = np.iinfo(dtype)
        if lo < info.min - 0.5 or hi > info.max + 0.5:
            warnings.warn(f"values {lo:g} to {hi:g} do not fit {dtype} ({info.min} to "
                          f"{info.max}): clipped", DataWarning, stacklevel=3)


def _cast(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``data`` as ``dtype``, rounded and clipped for integer types."""
    if dtype.kind in "iu" and data.dtype.kind in "fiu":
        info = np.iinfo(dtype)
        if data.dtype.kind == "f":
            data = np.rint(data)
        data = np.clip(data, info.min, info.max)
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


def header_only(img, transform: Transform):
    """Move ``img`` by changing its voxel-to-world matrix only (affine transforms)."""
    affine = transform.as_affine() if hasattr(transform, "as_affine") else None
    if affine is None:
        raise SynthMorphError("header-only output needs an affine transform")
    return make_image(img, np.asanyarray(img.dataobj), affine.inverse().matrix @ img.affine)
