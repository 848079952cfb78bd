"""Spatial transforms as pull-back point maps in world RAS millimetres.

Every transform here maps a point of the *reference* (output, fixed) space to the point
of the *source* (input, moving) space that holds the same anatomy. That is the map ITK
and ``antsApplyTransforms`` use to resample a moving image onto a fixed grid, except
that the world here is RAS (NIfTI, FreeSurfer) while ITK files are LPS; the conversion
lives in :mod:`synthmorph_nipype.transforms.itk`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np


def as_points(points) -> np.ndarray:
    """Return ``points`` as a float64 ``(N, 3)`` array (a single point becomes ``(1, 3)``)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"expected points of shape (N, 3), got {pts.shape}")
    return pts


def _apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``matrix`` (4x4) applied to float64 ``(N, 3)`` points."""
    if len(points) < 4096:
        return points @ matrix[:3, :3].T + matrix[:3, 3]
    import torch  # numpy's (N, 3) @ (3, 3) is ten times slower on large N, same sums

    m = torch.from_numpy(np.array(matrix, dtype=np.float64))
    return torch.addmm(m[:3, 3], torch.from_numpy(np.asarray(points, np.float64)),
                       m[:3, :3].T).numpy()


def has_shear(affine, tol: float = 1e-4) -> bool:
    """Whether a voxel-to-world matrix has non-orthogonal axes (which neither ITK images
    nor a NIfTI qform can hold).

    >>> has_shear(np.diag([2.0, 1.0, 3.0, 1.0])), has_shear(np.array(
    ...     [[1, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    (False, True)
    """
    m = np.asarray(affine, float)[:3, :3]
    axes = m / np.linalg.norm(m, axis=0)
    return not np.allclose(axes.T @ axes, np.eye(3), atol=tol)


class ImageGrid(NamedTuple):
    """A voxel grid: array shape and voxel-to-RAS matrix.

    Attributes
    ----------
    shape : tuple of int
        Number of voxels along the three array axes.
    affine : numpy.ndarray
        4x4 float64 matrix mapping zero-based voxel indices to RAS millimetres.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def make(cls, shape: Sequence[int], affine) -> ImageGrid:
        """Build a grid, normalising ``shape`` to three ints and ``affine`` to 4x4 float64."""
        if len(shape) != 3:
            raise ValueError(f"expected a 3-D shape, got {tuple(shape)}")
        aff = np.array(affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise ValueError(f"expected a 4x4 affine, got shape {aff.shape}")
        return cls(tuple(int(n) for n in shape), aff)

    @classmethod
    def from_image(cls, img) -> ImageGrid:
        """The grid of a nibabel spatial image (its first three dimensions)."""
        return cls.make(img.shape[:3], img.affine)

    @property
    def zooms(self) -> np.ndarray:
        """Voxel sizes in millimetres (column norms of the 3x3 part of ``affine``)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def center_ras(self) -> np.ndarray:
        """FreeSurfer's ``c_ras``: the world position of voxel ``shape / 2`` (not
        ``(shape - 1) / 2``), the centre that LTA files and network space use.

        >>> ImageGrid.make((10, 20, 31), np.eye(4)).center_ras
        array([ 5. , 10. , 15.5])
        """
        return _apply_matrix(self.affine, np.asarray(self.shape, dtype=np.float64)[None] / 2)[0]

    def world_points(self, rows: tuple[int, int] | None = None) -> np.ndarray:
        """RAS coordinates of every voxel centre, as an ``(X, Y, Z, 3)`` float64 array;
        with ``rows = (i0, i1)`` those of the voxels ``i0 <= i < i1`` only (a slab)."""
        i0, i1 = rows if rows is not None else (0, self.shape[0])
        axes = [np.arange(i0, i1), *[np.arange(n) for n in self.shape[1:]]]
        idx = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        return _apply_matrix(self.affine, idx.reshape(-1, 3).astype(np.float64)).reshape(
            i1 - i0, *self.shape[1:], 3
        )

    def same_as(self, other: ImageGrid, atol: float = 1e-4) -> bool:
        """Whether ``other`` has the same shape and (within ``atol``) the same affine."""
        return tuple(self.shape) == tuple(other.shape) and np.allclose(
            self.affine, other.affine, atol=atol
        )


class Transform(ABC):
    """A pull-back point map in world RAS millimetres (reference point -> source point)."""

    @abstractmethod
    def map(self, points) -> np.ndarray:
        """Map ``(N, 3)`` RAS points of the reference space to the source space."""

    def as_affine(self) -> Affine | None:
        """This transform as one :class:`Affine`, or None when it is not affine."""
        return None

    def map_grid(self, grid: ImageGrid, rows: tuple[int, int] | None = None) -> np.ndarray:
        """``map`` of the voxel centres of ``grid`` (rows ``i0 <= i < i1`` with ``rows``),
        as ``(N, 3)`` points in the voxels' C order: what a resampling onto ``grid``
        reads."""
        return self.map(grid.world_points(rows).reshape(-1, 3))


class Affine(Transform):
    """An affine pull-back map given by a 4x4 RAS-to-RAS matrix.

    Parameters
    ----------
    matrix : array_like
        4x4 (or 3x4) matrix; ``map(p) = matrix @ [p, 1]``.
    """

    def __init__(self, matrix) -> None:
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape == (3, 4):
            m = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
        if m.shape != (4, 4):
            raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError("affine matrix has non-finite entries")
        self.matrix = m.copy()

    def map(self, points) -> np.ndarray:
        """Apply the matrix to ``(N, 3)`` points."""
        return _apply_matrix(self.matrix, as_points(points))

    def as_affine(self) -> Affine:
        return self

    def inverse(self) -> Affine:
        """The inverse map (push-forward of this pull-back)."""
        return Affine(np.linalg.inv(self.matrix))

    def __repr__(self) -> str:
        return f"Affine({np.array2string(self.matrix, precision=4)})"


class DisplacementField(Transform):
    """A dense displacement field: ``map(p) = p + d(p)``.

    ``d`` is linearly interpolated at the continuous voxel index ``inv(affine) @ p``.
    As in ITK, a point is on the field when every index lies in ``[-0.5, n - 0.5)``
    (the voxels' extent); there the field is interpolated with edge replication, and
    off the field the displacement is zero.

    Parameters
    ----------
    grid : ImageGrid
        The voxel grid the displacements are stored on.
    field : array_like
        ``(X, Y, Z, 3)`` displacements in RAS millimetres (stored as float32).
    """

    def __init__(self, grid: ImageGrid, field) -> None:
        grid = ImageGrid.make(grid.shape, grid.affine)
        data = np.ascontiguousarray(field, dtype=np.float32)
        if data.shape != (*grid.shape, 3):
            raise ValueError(
                f"field shape {data.shape} does not match grid shape {(*grid.shape, 3)}"
            )
        self.grid = grid
        self.field = data

    def map(self, points) -> np.ndarray:
        """Displace ``(N, 3)`` points by the interpolated field."""
        pts = as_points(points)
        idx = _apply_matrix(np.linalg.inv(self.grid.affine), pts)
        upper = np.asarray(self.grid.shape, dtype=np.float64) - 0.5
        inside = np.all((idx >= -0.5) & (idx < upper), axis=1)
        disp = np.zeros_like(pts)
        if inside.any():  # torch only here: reading and writing transforms needs none
            import torch

            from ..ops.sampling import sample_linear

            vals = sample_linear(
                torch.from_numpy(self.field),
                torch.from_numpy(idx[inside]),
                boundary="clamp",
            )
            disp[inside] = vals.numpy().astype(np.float64)
        return pts + disp

    def map_grid(self, grid: ImageGrid, rows: tuple[int, int] | None = None) -> np.ndarray:
        """On the field's own grid the displacements are the stored ones (no
        interpolation); elsewhere as :meth:`Transform.map_grid`."""
        if not self.grid.same_as(grid, atol=1e-9):
            return super().map_grid(grid, rows)
        i0, i1 = rows if rows is not None else (0, grid.shape[0])
        pts = grid.world_points(rows).reshape(-1, 3)
        return pts + self.field[i0:i1].reshape(-1, 3)

    def __repr__(self) -> str:
        return f"DisplacementField(shape={self.grid.shape})"


class Chain(Transform):
    """Transforms in ITK composite-transform queue order.

    The last element is applied to a point first:
    ``map(p) = t[0](t[1](... t[-1](p)))``. Nested chains are flattened.

    Parameters
    ----------
    transforms : iterable of Transform
        The members, in queue order.
    """

    def __init__(self, transforms: Iterable[Transform] = ()) -> None:
        members: list[Transform] = []
        for t in transforms:
            if isinstance(t, Chain):
                members.extend(t.transforms)
            elif isinstance(t, Transform):
                members.append(t)
            else:
                raise TypeError(f"not a transform: {t!r}")
        self.transforms = members

    def map(self, points) -> np.ndarray:
        """Apply the members from last to first."""
        pts = as_points(points)
        for t in reversed(self.transforms):
            pts = t.map(pts)
        return pts

    def map_grid(self, grid: ImageGrid, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The last member maps the grid (a field on it needs no interpolation), the
        others the points it gives."""
        if not self.transforms:
            return super().map_grid(grid, rows)
        pts = self.transforms[-1].map_grid(grid, rows)
        for t in reversed(self.transforms[:-1]):
            pts = t.map(pts)
        return pts

    def as_affine(self) -> Affine | None:
        """The product of the members as one :class:`Affine`, or None if any is not affine."""
        matrix = np.eye(4)
        for t in self.transforms:
            if not isinstance(t, Affine):
                return None
            matrix = matrix @ t.matrix
        return Affine(matrix)

    def __len__(self) -> int:
        return len(self.transforms)

    def __iter__(self) -> Iterator[Transform]:
        return iter(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]

    def __repr__(self) -> str:
        return f"Chain({self.transforms!r})"


def dense_field(transform: Transform, grid: ImageGrid) -> DisplacementField:
    """Sample ``transform`` at the voxel centres of ``grid`` as a displacement field."""
    grid = ImageGrid.make(grid.shape, grid.affine)
    disp = np.empty((*grid.shape, 3), np.float32)
    step = max(1, (1 << 20) // max(1, grid.shape[1] * grid.shape[2]))
    for i0 in range(0, grid.shape[0], step):  # slab by slab: memory bounded by a slab
        i1 = min(grid.shape[0], i0 + step)
        pts = grid.world_points((i0, i1)).reshape(-1, 3)
        disp[i0:i1] = (transform.map_grid(grid, (i0, i1)) - pts).reshape(
            i1 - i0, *grid.shape[1:], 3)
    return DisplacementField(grid, disp)
