"""FreeSurfer linear transform array (LTA) text files.

An LTA matrix of type 1 (``LINEAR_RAS_TO_RAS``) maps a point of the *src* volume to the
point of the *dst* volume with the same anatomy (push-forward). To resample the src
image onto the dst grid use the pull-back ``Affine(inv(matrix))``.

Each volume-info block fixes the vox2ras matrix of a grid: its 3x3 part is the
direction cosines ``xras, yras, zras`` (columns) scaled by ``voxelsize`` and its
translation puts the voxel index ``volume / 2`` at ``cras``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .base import ImageGrid

LINEAR_VOX_TO_VOX = 0
LINEAR_RAS_TO_RAS = 1
_TYPE_NAMES = {LINEAR_VOX_TO_VOX: "LINEAR_VOX_TO_VOX", LINEAR_RAS_TO_RAS: "LINEAR_RAS_TO_RAS"}
_VOLUME_KEYS = ("valid", "filename", "volume", "voxelsize", "xras", "yras", "zras", "cras")


def _fmt(values) -> str:
    return " ".join(f"{float(v):.15e}" for v in values)


def _volume_info(grid: ImageGrid) -> list[str]:
    grid = ImageGrid.make(grid.shape, grid.affine)
    zooms = grid.zooms
    cosines = grid.affine[:3, :3] / zooms
    c_ras = grid.center_ras
    return [
        "valid = 1",
        "filename = none",
        "volume = {:d} {:d} {:d}".format(*grid.shape),
        f"voxelsize = {_fmt(zooms)}",
        f"xras   = {_fmt(cosines[:, 0])}",
        f"yras   = {_fmt(cosines[:, 1])}",
        f"zras   = {_fmt(cosines[:, 2])}",
        f"cras   = {_fmt(c_ras)}",
    ]


def grid_from_volume_info(
    shape, voxelsize, xras, yras, zras, cras
) -> ImageGrid:
    """Rebuild a vox2ras grid from the fields of an LTA volume-info block."""
    shape = np.asarray(shape, dtype=np.float64)
    rot = np.column_stack([xras, yras, zras]).astype(np.float64) * np.asarray(voxelsize)
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = np.asarray(cras, dtype=np.float64) - rot @ (shape / 2)
    return ImageGrid.make([int(n) for n in shape], affine)


def write_lta(
    path: str | os.PathLike, matrix, src: ImageGrid, dst: ImageGrid
) -> None:
    """Write a type-1 (``LINEAR_RAS_TO_RAS``) LTA file as FreeSurfer lays it out.

    Parameters
    ----------
    path : path-like
        The file to write (exactly this path).
    matrix : array_like
        4x4 matrix mapping a src-RAS point to the dst-RAS point (push-forward).
    src, dst : ImageGrid
        Source (moving) and destination (fixed) grids.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
    lines = [
        f"type      = {LINEAR_RAS_TO_RAS} # {_TYPE_NAMES[LINEAR_RAS_TO_RAS]}",
        "nxforms   = 1",
        "mean      = 0.0000 0.0000 0.0000",
        "sigma     = 1.0000",
        "1 4 4",
        *(_fmt(row) for row in m),
        "src volume info",
        *_volume_info(src),
        "dst volume info",
        *_volume_info(dst),
    ]
    Path(path).write_text("\n".join(lines) + "\n")


class _Parser:
    """Line-by-line reader of an LTA file that reports problems as InputError."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{self.path}: cannot read LTA file ({err})") from None
        self.lines = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line.startswith("filename"):  # a file name may contain '#'
                line = line.split("#", 1)[0].strip()
            if line:
                self.lines.append(line)
        self.pos = 0

    def fail(self, problem: str) -> InputError:
        return InputError(f"{self.path}: not a valid LTA file ({problem})")

    def next(self, what: str) -> str:
        if self.pos >= len(self.lines):
            raise self.fail(f"ends before {what}")
        line = self.lines[self.pos]
        self.pos += 1
        return line

    def value(self, key: str) -> str:
        line = self.next(f"'{key}'")
        name, sep, val = line.partition("=")
        if not sep or name.strip() != key:
            raise self.fail(f"expected '{key} = ...', found '{line[:60]}'")
        return val.strip()

    def numbers(self, text: str, count: int, what: str) -> np.ndarray:
        try:
            vals = np.array([float(v) for v in text.split()], dtype=np.float64)
        except ValueError:
            raise self.fail(f"non-numeric {what}") from None
        if vals.size != count or not np.all(np.isfinite(vals)):
            raise self.fail(f"expected {count} finite numbers for {what}")
        return vals

    def volume_info(self, which: str) -> ImageGrid | None:
        header = self.next(f"'{which} volume info'")
        if header != f"{which} volume info":
            raise self.fail(f"expected '{which} volume info', found '{header[:60]}'")
        fields = {}
        for key in _VOLUME_KEYS:
            fields[key] = self.value(key)
        valid = fields["valid"].split()[0] if fields["valid"] else "0"
        if valid != "1":
            return None
        shape = self.numbers(fields["volume"], 3, f"{which} volume")
        if np.any(shape < 1) or np.any(shape != np.round(shape)):
            raise self.fail(f"bad {which} volume size")
        return grid_from_volume_info(
            shape,
            self.numbers(fields["voxelsize"], 3, f"{which} voxelsize"),
            self.numbers(fields["xras"], 3, f"{which} xras"),
            self.numbers(fields["yras"], 3, f"{which} yras"),
            self.numbers(fields["zras"], 3, f"{which} zras"),
            self.numbers(fields["cras"], 3, f"{which} cras"),
        )


def read_lta(
    path: str | os.PathLike,
) -> tuple[np.ndarray, ImageGrid | None, ImageGrid | None]:
    """Read a single-transform LTA file of type 0 or 1.

    Parameters
    ----------
    path : path-like
        The LTA file.

    Returns
    -------
    matrix : numpy.ndarray
        4x4 src-RAS to dst-RAS matrix (push-forward); a type-0 (``LINEAR_VOX_TO_VOX``)
        matrix is converted with the embedded geometry,
        ``dst_vox2ras @ M @ inv(src_vox2ras)``.
    src, dst : ImageGrid or None
        The grids of the volume-info blocks, None where a block is marked invalid.

    Raises
    ------
    InputError
        If the file is unreadable, malformed, of another type, or holds several
        transforms.
    """
    p = _Parser(path)
    try:
        kind = int(p.value("type").split()[0])
    except (ValueError, IndexError):
        raise p.fail("bad 'type' line") from None
    if kind not in _TYPE_NAMES:
        raise p.fail(f"unsupported transform type {kind}")
    if p.value("nxforms").split()[:1] != ["1"]:
        raise p.fail("only files with nxforms = 1 are supported")
    p.numbers(p.value("mean"), 3, "mean")
    p.numbers(p.value("sigma"), 1, "sigma")
    if p.next("'1 4 4'").split() != ["1", "4", "4"]:
        raise p.fail("expected the matrix header '1 4 4'")
    matrix = np.stack([p.numbers(p.next("the matrix"), 4, "a matrix row") for _ in range(4)])
    src = p.volume_info("src")
    dst = p.volume_info("dst")
    if kind == LINEAR_VOX_TO_VOX:
        if src is None or dst is None:
            raise p.fail("a LINEAR_VOX_TO_VOX transform needs valid src and dst volume info")
        matrix = dst.affine @ matrix @ np.linalg.inv(src.affine)
    return matrix, src, dst
