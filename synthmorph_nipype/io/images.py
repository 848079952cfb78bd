"""Load 3-D images (NIfTI, MGZ) and refuse the unusable ones with a one-line reason."""

from __future__ import annotations

import gzip
import warnings
import zlib
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import InputError


def load_image(path: str | Path, *, check_values: bool = True) -> nb.spatialimages.SpatialImage:
    """Load a 3-D image and check it can be registered.

    A 4-D image with a single frame (or trailing singleton axes) is accepted as 3-D; more
    frames are an error, since which one to register is the user's choice.

    Raises
    ------
    InputError
        Missing or unreadable file, truncated data, fewer or more than 3 dimensions,
        NaN or infinite voxels, or (with ``check_values``) a constant image.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image")
    try:
        img = nb.load(str(path))
    except Exception as err:  # nibabel raises many kinds for non-images
        raise InputError(f"{path}: not a readable NIfTI or MGZ image ({_reason(err)})") from None
    shape = img.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise InputError(f"{path}: image is {len(shape)}-D, need a 3-D volume")
    if len(shape) > 4:
        raise InputError(f"{path}: image is {len(shape)}-D with shape {tuple(img.shape)} "
                         "(a vector or tensor image, e.g. a displacement field?), need a "
                         "3-D volume")
    if len(shape) > 3:
        raise InputError(f"{path}: image is 4-D with {shape[3]} frames, need a 3-D volume "
                         "(extract one frame first, e.g. with fslroi or mri_convert --frame)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as err:
        raise InputError(f"{path}: image data cannot be read ({_reason(err)})") from None
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: invalid voxel-to-world matrix in the header")
    if check_values:
        if data.dtype.kind in "fc" and not np.all(np.isfinite(data)):
            raise InputError(f"{path}: image contains NaN or infinite values")
        if data.size == 0 or np.ptp(data) == 0:
            raise InputError(f"{path}: image is constant, nothing to register")
    out = img.__class__(data, img.affine, img.header)
    return out


def _reason(err: Exception) -> str:
    if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)):
        return "truncated or corrupt compressed data"
    msg = str(err).splitlines()[0] if str(err) else err.__class__.__name__
    return msg[:120]


def image_data(img) -> np.ndarray:
    """Image data as float32 (the dtype the networks use)."""
    return np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
