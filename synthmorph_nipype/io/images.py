"""Load 3-D images (NIfTI, MGZ), refusing the unusable ones with a one-line reason, and
save them in the format a file name asks for."""

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


MGH_TYPES = {"u1": "u1", "i1": "i2", "i2": "i2", "u2": "i4", "i4": "i4", "u4": "f4",
             "i8": "f4", "u8": "f4", "f2": "f4", "f4": "f4", "f8": "f4", "b1": "u1"}


def save_image(img, path: str | Path) -> None:
    """Save in the format the file name asks for (``.mgz``/``.mgh`` or NIfTI); MGH files
    get the nearest type they can hold (uint8, int16, int32, float32)."""
    name = str(path).lower()
    if name.endswith((".mgz", ".mgh")):
        data = np.asanyarray(img.dataobj)
        mgh = np.dtype(MGH_TYPES.get(data.dtype.str[1:], "f4"))
        img = nb.MGHImage(data.astype(mgh), img.affine)
    elif not name.endswith((".mgz", ".mgh")) and isinstance(img, nb.MGHImage):
        img = nb.Nifti1Image(np.asarray(img.dataobj), img.affine)
    nb.save(img, str(path))
