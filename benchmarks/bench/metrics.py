"""Dice, folding and error of a registration, from its forward transform."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from .geometry import LPS, sample, slab_points, slabs
from .pairs import TISSUES


def displacement_on_grid(transforms: Sequence[Path], reference: Path) -> np.ndarray:
    """Dense displacement d (X, Y, Z, 3; RAS mm) on ``reference``'s voxel grid such that
    x -> x + d(x) is the point mapping of ``transforms`` (ITK files: .h5/.txt/.mat
    transforms or displacement-field images; composed as antsApplyTransforms does, the
    last listed applied first). For a registration's forward transform this maps fixed
    points to moving points."""
    import SimpleITK as sitk

    composite = sitk.CompositeTransform(3)
    for path in transforms:
        name = str(path)
        if name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
            img = sitk.Cast(sitk.ReadImage(name), sitk.sitkVectorFloat64)
            composite.AddTransform(sitk.DisplacementFieldTransform(img))
        else:
            composite.AddTransform(sitk.ReadTransform(name))
    flt = sitk.TransformToDisplacementFieldFilter()
    flt.SetReferenceImage(sitk.ReadImage(str(reference)))
    flt.SetOutputPixelType(sitk.sitkVectorFloat64)
    field_ = sitk.GetArrayFromImage(flt.Execute(composite))  # (Z, Y, X, 3), LPS
    return (field_.transpose(2, 1, 0, 3) * LPS).astype(np.float32)


def jacobian_determinant(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """det of the Jacobian of x -> x + disp(x) (central differences in the voxel grid;
    the voxel size and direction enter through ``affine``)."""
    lin = affine[:3, :3]
    # m[c][a] = d(world_c)/d(voxel_a) of the mapping
    m = [[lin[c, a] + g for a, g in enumerate(np.gradient(disp[..., c]))] for c in range(3)]
    det = (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
           - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
           + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    return det / np.linalg.det(lin)


def pull_labels(labels: np.ndarray, labels_affine: np.ndarray, disp: np.ndarray,
                affine: np.ndarray) -> np.ndarray:
    """Moving labels at the points x + disp(x) of the fixed grid (nearest neighbour)."""
    out = np.empty(disp.shape[:3], labels.dtype)
    for k0, k1 in slabs(out.shape):
        pts = slab_points(out.shape, affine, k0, k1) + disp[:, :, k0:k1]
        out[..., k0:k1] = sample(labels, labels_affine, pts, 0)
    return out


def dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int] | None = None
         ) -> dict[str, float]:
    """Per-tissue Dice of two label maps, and their mean; with ``labels`` (held-out
    pairs), the Dice of each of those labels (keys ``"label-N"``) and their mean over the
    labels the fixed map holds."""
    out = {}
    names = {v: t for v, t in enumerate(TISSUES, start=1)} if labels is None else \
        {int(v): f"label-{int(v)}" for v in labels}
    for value, name in names.items():
        x, y = a == value, b == value
        total = x.sum() + y.sum()
        out[name] = float(2 * (x & y).sum() / total) if y.any() else float("nan")
    out["mean"] = float(np.nanmean([out[t] for t in names.values()]))
    return out


@dataclass
class PairData:
    """A pair's arrays, loaded once for all methods."""

    path: Path
    info: dict
    fixed_affine: np.ndarray
    fixed_labels: np.ndarray
    moving_affine: np.ndarray
    moving_labels: np.ndarray
    true_disp: np.ndarray | None  # None: no known answer (pairs of two subjects)

    @classmethod
    def load(cls, path: Path) -> PairData:
        fixed = nb.load(path / "fixed_labels.nii.gz")
        moving = nb.load(path / "moving_labels.nii.gz")
        truth = path / "true_fwd.nii.gz"
        return cls(path, json.loads((path / "pair.json").read_text()), fixed.affine,
                   np.asarray(fixed.dataobj), moving.affine, np.asarray(moving.dataobj),
                   displacement_on_grid([truth], path / "fixed.nii.gz")
                   if truth.exists() else None)

    @property
    def labels(self) -> list[int] | None:
        """The labels Dice counts (None: the template pairs' CSF, GM, WM)."""
        return self.info.get("dice_labels")

    def dice_before(self) -> dict[str, float]:
        """Dice with the moving labels taken at the same world points (identity)."""
        zero = np.zeros(self.fixed_labels.shape + (3,), np.float32)
        return dice(pull_labels(self.moving_labels, self.moving_affine, zero,
                                self.fixed_affine), self.fixed_labels, self.labels)

    def dice_truth(self) -> dict[str, float] | None:
        """Dice through the true mapping: the ceiling that label resampling leaves."""
        if self.true_disp is None:
            return None
        return dice(pull_labels(self.moving_labels, self.moving_affine, self.true_disp,
                                self.fixed_affine), self.fixed_labels, self.labels)


def evaluate(pair: PairData, transforms: Sequence[Path], tool_labels: Path | None) -> dict:
    """Metrics of one registration from its forward transform files."""
    disp = displacement_on_grid(transforms, pair.path / "fixed.nii.gz")
    brain = pair.fixed_labels > 0
    det = jacobian_determinant(disp, pair.fixed_affine)
    moved = pull_labels(pair.moving_labels, pair.moving_affine, disp, pair.fixed_affine)
    out = {"dice": dice(moved, pair.fixed_labels, pair.labels),
           "folding_pct_brain": float(100 * (det[brain] <= 0).mean()),
           "folding_pct_all": float(100 * (det <= 0).mean()),
           "jacobian_min": float(det.min())}
    if pair.true_disp is not None:
        err = np.linalg.norm(disp[brain] - pair.true_disp[brain], axis=-1)
        out.update(error_mm_mean=float(err.mean()), error_mm_max=float(err.max()))
    if tool_labels is not None and tool_labels.is_file():
        warped = np.asarray(nb.load(tool_labels).dataobj)
        out["dice_tool"] = dice(np.rint(warped).astype(np.int64), pair.fixed_labels,
                                pair.labels)
    return out
