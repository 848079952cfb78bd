"""ITK transform files and their conversion to RAS transforms.

ITK works in LPS world coordinates; the transforms of :mod:`.base` work in RAS. With
``F = diag(-1, -1, 1)``: an affine becomes ``F4 @ M @ F4``, a displacement vector
``F @ d``, an image origin ``F @ origin`` and a direction matrix ``F @ direction``.
Both ITK and :mod:`.base` transforms are pull-backs (fixed point -> moving point), so no
inversion happens here.

Formats
-------
``.txt``
    ``#Insight Transform File V1.0`` text, ``AffineTransform_double_3_3`` (also reads
    ``MatrixOffsetTransformBase`` and float variants, and several ``#Transform``
    blocks as one composite).
``.mat``
    MATLAB v4 file as ANTs writes it: ``AffineTransform_double_3_3`` (12x1) and
    ``fixed`` (3x1, the centre).
``.nii`` / ``.nii.gz``
    Displacement field image. Written in ITK's layout: 5-D ``(X, Y, Z, 1, 3)`` float32,
    intent 1007 (vector), LPS components. Read: any 5-D ``(X, Y, Z, 1, 3)`` image is
    ITK/LPS; a 4-D ``(X, Y, Z, 3)`` image is ITK/LPS only with intent 1007 and is
    otherwise taken as RAS displacements (FreeSurfer's intent 1006 warps).
``.h5``
    ITK HDF5 composite transform as ANTs and ITK write it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from ..errors import InputError
from .base import Affine, Chain, DisplacementField, ImageGrid, Transform, has_shear

FLIP = np.diag([-1.0, -1.0, 1.0])
FLIP4 = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE_TYPE = "AffineTransform_double_3_3"
FIELD_TYPE = "DisplacementFieldTransform_double_3_3"
COMPOSITE_TYPE = "CompositeTransform_double_3_3"
INTENT_VECTOR = 1007
_AFFINE_KINDS = ("AffineTransform", "MatrixOffsetTransformBase")
_ITK_VERSION = "5.4.0"


# --------------------------------------------------------------------------- conversion
def affine_from_itk(parameters, fixed=(0.0, 0.0, 0.0)) -> Affine:
    """RAS :class:`Affine` from ITK affine parameters (LPS).

    Parameters
    ----------
    parameters : array_like
        12 numbers: the 3x3 matrix row by row, then the translation.
    fixed : array_like
        The centre of rotation (3 numbers); ``offset = t + c - A @ c``.
    """
    params = np.asarray(parameters, dtype=np.float64).ravel()
    centre = np.asarray(fixed, dtype=np.float64).ravel()
    if params.size != 12 or centre.size != 3:
        raise ValueError("ITK affine needs 12 parameters and 3 fixed parameters")
    a = params[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = params[9:] + centre - a @ centre
    return Affine(FLIP4 @ lps @ FLIP4)


def affine_to_itk(affine: Affine) -> tuple[np.ndarray, np.ndarray]:
    """ITK parameters (12) and fixed parameters (zero centre) of a RAS :class:`Affine`."""
    lps = FLIP4 @ affine.matrix @ FLIP4
    return np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]]), np.zeros(3)


def _orientation(grid: ImageGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS origin, spacing and direction of a grid; refuses sheared grids."""
    if has_shear(grid.affine):
        raise ValueError("ITK cannot represent a sheared voxel grid")
    spacing = grid.zooms
    direction_ras = grid.affine[:3, :3] / spacing
    return FLIP @ grid.affine[:3, 3], spacing, FLIP @ direction_ras


def field_to_itk(field: DisplacementField) -> tuple[np.ndarray, np.ndarray]:
    """ITK ``DisplacementFieldTransform`` parameters and fixed parameters (LPS).

    Fixed parameters are size (3), origin (3), spacing (3) and direction (9, row-major);
    parameters are the LPS vectors with x fastest and the components interleaved, in the
    field's own dtype (RAS to LPS only flips signs: exact in any precision).
    """
    origin, spacing, direction = _orientation(field.grid)
    fixed = np.concatenate(
        [np.asarray(field.grid.shape, dtype=np.float64), origin, spacing, direction.ravel()]
    )
    vec = np.asarray(field.field)
    if not np.issubdtype(vec.dtype, np.floating):
        vec = vec.astype(np.float64)
    params = np.empty(vec.shape[2::-1] + (3,), dtype=vec.dtype)  # (z, y, x, 3): x fastest
    np.multiply(vec.transpose(2, 1, 0, 3), np.diag(FLIP).astype(vec.dtype), out=params)
    return params.ravel(), fixed


def field_from_itk(parameters, fixed) -> DisplacementField:
    """RAS :class:`DisplacementField` from ITK displacement-field parameters."""
    fixed = np.asarray(fixed, dtype=np.float64).ravel()
    if fixed.size != 18:
        raise ValueError("displacement field needs 18 fixed parameters")
    shape = tuple(int(round(n)) for n in fixed[:3])
    params = np.asarray(parameters).ravel()
    if params.size != 3 * int(np.prod(shape)):
        raise ValueError(f"{params.size} parameters do not fill a {shape} vector field")
    lps = params.reshape(shape[2], shape[1], shape[0], 3).transpose(2, 1, 0, 3)
    affine = np.eye(4)
    affine[:3, :3] = FLIP @ fixed[9:].reshape(3, 3) * fixed[6:9]
    affine[:3, 3] = FLIP @ fixed[3:6]
    return DisplacementField(ImageGrid.make(shape, affine), lps.astype(np.float64) @ FLIP)


def _need_affine(path, transform) -> Affine:
    if isinstance(transform, Chain):
        transform = transform.as_affine()
    if not isinstance(transform, Affine):
        raise InputError(f"{path}: this format holds a single affine transform only")
    return transform


# --------------------------------------------------------------------------- text (.txt)
def write_itk_txt(path: str | os.PathLike, transform: Affine | Chain) -> None:
    """Write an affine as an ITK text transform file (``AffineTransform_double_3_3``)."""
    params, fixed = affine_to_itk(_need_affine(path, transform))
    text = (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        f"Transform: {AFFINE_TYPE}\n"
        f"Parameters: {' '.join(repr(float(v)) for v in params)}\n"
        f"FixedParameters: {' '.join(repr(float(v)) for v in fixed)}\n"
    )
    Path(path).write_text(text)


def _itk_affine_kind(path, kind: str) -> None:
    if not re.fullmatch(r"(AffineTransform|MatrixOffsetTransformBase)_(double|float)_3_3", kind):
        raise InputError(f"{path}: unsupported ITK transform type {kind!r}")


def read_itk_txt(path: str | os.PathLike) -> Chain:
    """Read an ITK text transform file of affine transforms as a :class:`Chain`."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read ITK transform file ({err})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise InputError(f"{path}: not an ITK transform file (no '#Insight Transform File')")
    blocks: list[dict[str, str]] = []
    for line in lines[1:]:
        if line.startswith("#Transform"):
            blocks.append({})
            continue
        key, sep, value = line.partition(":")
        if not sep or not blocks:
            raise InputError(f"{path}: malformed ITK transform line '{line[:60]}'")
        blocks[-1][key.strip()] = value.strip()
    members: list[Transform] = []
    for block in blocks:
        kind = block.get("Transform", "")
        if kind.startswith("CompositeTransform"):
            continue
        _itk_affine_kind(path, kind)
        try:
            params = [float(v) for v in block["Parameters"].split()]
            fixed = [float(v) for v in block.get("FixedParameters", "0 0 0").split()]
            members.append(affine_from_itk(params, fixed))
        except (KeyError, ValueError) as err:
            raise InputError(f"{path}: bad parameters for {kind} ({err})") from None
    if not members:
        raise InputError(f"{path}: ITK transform file holds no transform")
    return Chain(members)


# --------------------------------------------------------------------------- MATLAB (.mat)
def write_itk_mat(path: str | os.PathLike, transform: Affine | Chain) -> None:
    """Write an affine as ANTs does: MATLAB v4 ``AffineTransform_double_3_3`` + ``fixed``."""
    import scipy.io  # here, not at import: it costs every command line a tenth of a second

    params, fixed = affine_to_itk(_need_affine(path, transform))
    with open(path, "wb") as fobj:
        scipy.io.savemat(
            fobj, {AFFINE_TYPE: params[:, None], "fixed": fixed[:, None]}, format="4"
        )


def read_itk_mat(path: str | os.PathLike) -> Affine:
    """Read an ANTs/ITK MATLAB affine (``.mat``)."""
    import scipy.io

    try:
        with open(path, "rb") as fobj:
            data = scipy.io.loadmat(fobj)
    except Exception as err:  # scipy raises many types for non-MATLAB bytes
        raise InputError(f"{path}: cannot read ITK .mat transform ({err})") from None
    keys = [k for k in data if not k.startswith("__")]
    kinds = [k for k in keys if k.startswith(_AFFINE_KINDS)]
    if not kinds:
        raise InputError(f"{path}: no affine transform in .mat file (variables: {keys})")
    _itk_affine_kind(path, kinds[0])
    try:
        return affine_from_itk(data[kinds[0]], data.get("fixed", np.zeros(3)))
    except ValueError as err:
        raise InputError(f"{path}: {err}") from None


# --------------------------------------------------------------------------- NIfTI field
def write_field_nifti(path: str | os.PathLike, field: DisplacementField) -> None:
    """Write a displacement field in ITK's NIfTI layout (5-D, intent vector, LPS)."""
    data = (field.field.astype(np.float64) @ FLIP).astype(np.float32)
    img = nib.Nifti1Image(data[:, :, :, None, :], field.grid.affine)
    hdr = img.header
    hdr.set_data_dtype(np.float32)
    hdr.set_intent(INTENT_VECTOR)
    hdr.set_sform(field.grid.affine, code=1)
    hdr.set_qform(field.grid.affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def read_field_nifti(path: str | os.PathLike) -> DisplacementField:
    """Read a displacement-field NIfTI (ITK 5-D/LPS, or 4-D LPS/RAS by intent)."""
    try:
        img = nib.load(str(path))
        shape = img.shape
        if len(shape) == 5 and shape[3] == 1 and shape[4] == 3:
            lps = True
        elif len(shape) == 4 and shape[3] == 3:
            lps = int(img.header["intent_code"]) == INTENT_VECTOR
        else:
            raise InputError(
                f"{path}: not a 3-D displacement field (shape {shape}; expected "
                "(X, Y, Z, 1, 3) or (X, Y, Z, 3))"
            )
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(*shape[:3], 3)
    except InputError:
        raise
    except Exception as err:  # nibabel raises several types for unreadable files
        raise InputError(f"{path}: cannot read displacement field ({err})") from None
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path}: displacement field has non-finite values")
    if lps:
        data = data @ FLIP.astype(np.float32)
    return DisplacementField(ImageGrid.from_image(img), data)


# --------------------------------------------------------------------------- HDF5 (.h5)
def _write_string(group: h5py.Group, name: str, value: str) -> None:
    # ITK stores every string as a one-element array of variable-length ASCII strings.
    group.create_dataset(
        name, data=np.array([value.encode()], dtype=object), dtype=h5py.string_dtype("ascii")
    )


def write_itk_h5(path: str | os.PathLike, chain: Transform) -> None:
    """Write a chain of affines and displacement fields as an ITK HDF5 composite.

    Group ``TransformGroup/0`` is the composite; groups ``1..N`` are the members in
    :class:`Chain` (queue) order.
    """
    members = list(chain) if isinstance(chain, Chain) else [chain]
    if not members:
        raise InputError(f"{path}: nothing to write (empty transform chain)")
    encoded = []
    for t in members:
        if isinstance(t, Affine):
            encoded.append((AFFINE_TYPE, *affine_to_itk(t)))
        elif isinstance(t, DisplacementField):
            encoded.append((FIELD_TYPE, *field_to_itk(t)))
        else:
            raise InputError(f"{path}: cannot store {type(t).__name__} in an ITK .h5 file")
    with h5py.File(path, "w") as f:
        _write_string(f, "HDFVersion", h5py.version.hdf5_version)
        _write_string(f, "ITKVersion", _ITK_VERSION)
        _write_string(f, "OSName", "Linux")
        group = f.create_group("TransformGroup")
        _write_string(group.create_group("0"), "TransformType", COMPOSITE_TYPE)
        for i, (kind, params, fixed) in enumerate(encoded, start=1):
            sub = group.create_group(str(i))
            _write_string(sub, "TransformType", kind)
            sub.create_dataset("TransformFixedParameters", data=fixed.astype(np.float64))
            # Dense fields in their own (float32) precision; HDF5 converts on read. No gzip:
            # float32 fields shrink by under 10% for seconds of compression.
            big = params.size > 4096
            sub.create_dataset("TransformParameters",
                               data=params.astype(np.float32 if big else np.float64,
                                                  copy=False))


def _h5_string(dataset) -> str:
    value = np.asarray(dataset[()]).ravel()
    if value.size == 0:
        return ""
    item = value[0]
    return item.decode() if isinstance(item, bytes) else str(item)


def _h5_member(path, name: str, sub) -> Transform | None:
    if not isinstance(sub, h5py.Group) or "TransformType" not in sub:
        raise InputError(f"{path}: TransformGroup/{name} has no TransformType")
    kind = _h5_string(sub["TransformType"])
    if kind.startswith("CompositeTransform"):
        return None
    # Old ITK versions wrote "Tranform..." (sic).
    prefix = "Transform" if "TransformParameters" in sub else "Tranform"
    try:
        params = np.asarray(sub[f"{prefix}Parameters"], dtype=np.float64)
        fixed = np.asarray(sub[f"{prefix}FixedParameters"], dtype=np.float64)
    except KeyError:
        raise InputError(f"{path}: TransformGroup/{name} lacks parameters") from None
    try:
        if kind.startswith(_AFFINE_KINDS):
            _itk_affine_kind(path, kind)
            return affine_from_itk(params, fixed)
        if re.fullmatch(r"DisplacementFieldTransform_(double|float)_3_3", kind):
            return field_from_itk(params, fixed)
    except ValueError as err:
        raise InputError(f"{path}: TransformGroup/{name}: {err}") from None
    raise InputError(f"{path}: unsupported ITK transform type {kind!r}")


def read_itk_h5(path: str | os.PathLike) -> Chain:
    """Read an ITK HDF5 transform file (composite or single) as a :class:`Chain`."""
    try:
        f = h5py.File(path, "r")
    except Exception as err:  # h5py raises OSError and others for non-HDF5 bytes
        raise InputError(f"{path}: cannot read HDF5 transform file ({err})") from None
    with f:
        group = f.get("TransformGroup")
        if not isinstance(group, h5py.Group):
            raise InputError(f"{path}: not an ITK transform file (no TransformGroup)")
        names = sorted(group, key=lambda n: int(n) if n.isdigit() else -1)
        if not names or not all(n.isdigit() for n in names):
            raise InputError(f"{path}: TransformGroup must hold groups named 0..N")
        members = [_h5_member(path, n, group[n]) for n in names]
    chain = Chain([m for m in members if m is not None])
    if not len(chain):
        raise InputError(f"{path}: ITK transform file holds no transform")
    return chain
