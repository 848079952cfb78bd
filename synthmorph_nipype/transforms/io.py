"""Load and save transforms, choosing the format from the file name."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from ..errors import InputError
from . import itk, lta
from .base import Affine, Chain, DisplacementField, ImageGrid, Transform, dense_field

SUPPORTED_SUFFIXES = (".lta", ".txt", ".mat", ".nii", ".nii.gz", ".h5")


class LoadedTransform(NamedTuple):
    """A transform read from a file.

    Attributes
    ----------
    chain : Chain
        The pull-back map (reference RAS -> source RAS).
    reference : ImageGrid or None
        The output grid the file implies: the dst volume of an LTA, the grid of a
        displacement-field image, or of the first displacement field of an ``.h5``
        composite; None when the file holds no grid (``.txt``, ``.mat``, affine ``.h5``).
    """

    chain: Chain
    reference: ImageGrid | None


def transform_suffix(path: str | os.PathLike) -> str:
    """The supported suffix ``path`` ends with (case-insensitive).

    Raises
    ------
    InputError
        If the name ends with none of :data:`SUPPORTED_SUFFIXES`.
    """
    name = os.fspath(path).lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise InputError(
        f"{path}: unknown transform file type (supported: {', '.join(SUPPORTED_SUFFIXES)})"
    )


def load_transform(path: str | os.PathLike) -> LoadedTransform:
    """Read a transform file as a pull-back :class:`Chain` and its implied reference grid.

    An LTA (src = moving, dst = fixed) becomes ``Chain([Affine(inv(M))])``.

    Raises
    ------
    InputError
        If the file is missing, unreadable, malformed or of an unknown type.
    """
    suffix = transform_suffix(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such transform file")
    if suffix == ".lta":
        matrix, _src, dst = lta.read_lta(path)
        try:
            pull = np.linalg.inv(matrix)
        except np.linalg.LinAlgError:
            raise InputError(f"{path}: LTA matrix is singular") from None
        return LoadedTransform(Chain([Affine(pull)]), dst)
    if suffix == ".txt":
        return LoadedTransform(itk.read_itk_txt(path), None)
    if suffix == ".mat":
        return LoadedTransform(Chain([itk.read_itk_mat(path)]), None)
    if suffix == ".h5":
        chain = itk.read_itk_h5(path)
        first = chain[-1] if len(chain) else None  # the member applied first
        grid = first.grid if isinstance(first, DisplacementField) else None
        return LoadedTransform(chain, grid)
    field = itk.read_field_nifti(path)
    return LoadedTransform(Chain([field]), field.grid)


def save_transform(
    path: str | os.PathLike,
    chain: Transform,
    *,
    source: ImageGrid | None = None,
    reference: ImageGrid | None = None,
) -> None:
    """Write a pull-back transform to ``path`` in the format its suffix names.

    Parameters
    ----------
    path : path-like
        Output file, written exactly there; ``.lta``, ``.txt``, ``.mat``, ``.nii``,
        ``.nii.gz`` or ``.h5``.
    chain : Transform
        A :class:`Chain` (or single transform) mapping reference RAS to source RAS.
    source, reference : ImageGrid, optional
        Moving and fixed grids. ``.lta`` needs both (it stores the inverse of the
        pull-back as the src -> dst matrix). For ``.nii``/``.nii.gz`` a ``reference``
        turns any chain into a dense field on that grid; without one the chain must be a
        single displacement field.

    Raises
    ------
    InputError
        If the suffix is unknown or the format cannot hold the transform.
    """
    suffix = transform_suffix(path)
    chain = chain if isinstance(chain, Chain) else Chain([chain])
    try:
        _save(path, suffix, chain, source, reference)
    except ValueError as err:  # e.g. a sheared grid, which ITK cannot represent
        raise InputError(f"{path}: {err}") from None


def _save(path, suffix: str, chain: Chain, source, reference) -> None:
    if suffix == ".lta":
        affine = chain.as_affine()
        if affine is None:
            raise InputError(f"{path}: an LTA file holds a single affine transform only")
        if source is None or reference is None:
            raise InputError(f"{path}: writing an LTA needs the moving and fixed image grids")
        lta.write_lta(path, np.linalg.inv(affine.matrix), source, reference)
    elif suffix == ".txt":
        itk.write_itk_txt(path, chain)
    elif suffix == ".mat":
        itk.write_itk_mat(path, chain)
    elif suffix == ".h5":
        itk.write_itk_h5(path, chain)
    else:
        single = len(chain) == 1 and isinstance(chain[0], DisplacementField)
        if single and (reference is None or chain[0].grid.same_as(reference, atol=1e-6)):
            field = chain[0]
        elif reference is not None:
            field = dense_field(chain, reference)
        else:
            raise InputError(
                f"{path}: a displacement-field image needs a single field or a reference grid"
            )
        itk.write_field_nifti(path, field)
