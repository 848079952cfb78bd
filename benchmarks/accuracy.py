"""Accuracy and speed of SynthMorph, ANTsPy and elastix on brain pairs with a known answer.

Pairs are made from the ICBM152 template nilearn ships (T1, tissue probability maps, brain
mask): a moving image is the template (re-contrasted, with a synthetic head, or on thick
slices) pulled through a known random affine and/or smooth warp; the fixed image is the
template or another known deformation of it. Tissue labels (CSF=1, GM=2, WM=3) travel with
the images. (nilearn's template is skull-stripped; the "skull" pair adds a synthetic head.)
Each pair lives in ``OUT/pairs/NAME`` (``fixed.nii.gz``, ``moving.nii.gz``,
``fixed_labels.nii.gz``, ``moving_labels.nii.gz``, the true fixed-to-moving mapping as an
ITK displacement field ``true_fwd.nii.gz`` and, for affine pairs, ``true_fwd_ras.txt``, a
4x4 RAS matrix, fixed point -> moving point).

Every method runs as a separate process (wall time and peak RSS of that process, from GNU
``time``, include start-up and I/O), with the same number of threads:

* ``synthmorph-joint``, ``synthmorph-affine``: ``synthmorph register`` (``-t fwd.h5 -o``);
* ``ants-syn``, ``ants-affine``: ANTsPy ``registration`` (``SyN``, ``Affine``; ANTsPy
  defaults) in its own venv through ``benchmarks/ants_worker.py``;
* ``elastix``, ``elastix-affine``: the elastix binary, affine (+ B-spline), Mattes MI.

After each run, untimed, the method's forward transform is turned into a dense displacement
on the fixed grid by one helper (SimpleITK; the ANTs transforms composed by
antsApplyTransforms, elastix's by ``transformix -def all``), from which come: tissue Dice of
the moving labels pulled onto the fixed grid (nearest neighbour), the share of voxels with
a non-positive Jacobian determinant, and the error in mm against the true mapping over the
fixed brain. The labels are also warped by each tool itself (``synthmorph apply``,
``ants.apply_transforms``, transformix) as a check on the field conventions.

Results go to ``OUT/results.json`` (every run, rewritten after each) and ``OUT/results.md``;
logs to ``OUT/logs``; each run's files are deleted after measuring unless ``--keep``.
Pairs are made once per OUT and resolution and reused.

    bash benchmarks/setup_peers.sh            # ANTsPy venv, elastix, GNU time
    python benchmarks/accuracy.py --out bench_out --weights-affine A.pt --weights-joint J.pt
    python benchmarks/accuracy.py --out smoke --quick --pairs skull --methods ants-affine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
PAIRS_VERSION = 1
TISSUES = ("csf", "gm", "wm")
LPS = np.array([-1.0, -1.0, 1.0])
CHUNK = 1 << 20  # voxels per chunk of point-wise work


# ---------------------------------------------------------------------------- geometry


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points (..., 3) through a 4x4 matrix."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def rotation(degrees: Sequence[float]) -> np.ndarray:
    """3x3 rotation about x, then y, then z (degrees)."""
    out = np.eye(3)
    for axis, angle in enumerate(np.radians(degrees)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        rot = np.eye(3)
        rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
        out = rot @ out
    return out


def slab_points(shape: Sequence[int], affine: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """World points (X, Y, k1 - k0, 3) of the voxels with last index in [k0, k1)."""
    ijk = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), np.arange(k0, k1),
                               indexing="ij"), axis=-1).astype(np.float64)
    return apply_affine(affine, ijk)


def slabs(shape: Sequence[int]):
    """Ranges of the last axis that hold about ``CHUNK`` voxels each."""
    step = max(1, CHUNK // (shape[0] * shape[1]))
    for k0 in range(0, shape[2], step):
        yield k0, min(k0 + step, shape[2])


def sample(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int,
           mode: str = "constant") -> np.ndarray:
    """Values of ``volume`` (voxel-to-world ``affine``) at world ``points`` (..., 3);
    ``order`` 0 is nearest neighbour, 1 trilinear; zero outside unless ``mode`` says."""
    vox = apply_affine(np.linalg.inv(affine), points.reshape(-1, 3)).T
    out = ndimage.map_coordinates(volume, vox, order=order, mode=mode, cval=0.0,
                                  prefilter=False)
    return out.reshape(points.shape[:-1])


# ---------------------------------------------------------------------------- template


@dataclass
class Template:
    """nilearn's ICBM152 2009 template: T1 (skull-stripped), tissue maps, labels."""

    t1: np.ndarray
    probs: np.ndarray  # (3, X, Y, Z): csf, gm, wm
    labels: np.ndarray  # 0 outside the brain mask, 1 + argmax(probs) inside
    mask: np.ndarray
    affine: np.ndarray

    @property
    def center(self) -> np.ndarray:
        """Centre of mass of the brain mask (RAS mm)."""
        return apply_affine(self.affine, np.argwhere(self.mask).mean(0))


def load_template(resolution: int) -> Template:
    """Load nilearn's template at 1 or 2 mm."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    imgs = [datasets.load_mni152_brain_mask(resolution=resolution),
            datasets.load_mni152_gm_template(resolution=resolution),
            datasets.load_mni152_wm_template(resolution=resolution)]
    for img in imgs:
        if img.shape != t1.shape or not np.allclose(img.affine, t1.affine):
            raise RuntimeError("nilearn's template images do not share one grid")
    mask = np.asarray(imgs[0].dataobj) > 0
    gm, wm = (np.asarray(img.get_fdata(), np.float32) * mask for img in imgs[1:])
    csf = np.clip(1 - gm - wm, 0, 1) * mask
    probs = np.stack([csf, gm, wm])
    labels = np.where(mask, probs.argmax(0) + 1, 0).astype(np.uint8)
    data = np.asarray(t1.get_fdata(), np.float32) * mask
    return Template(data, probs, labels, mask, t1.affine)


# ---------------------------------------------------------------------------- deformations


@dataclass
class Deformation:
    """Where a synthetic image's anatomy comes from: its value at point q (RAS mm) is the
    template's at ``pull(q) = W(T^-1 q)`` with ``W(p) = p + u(p)``, so template point p
    sits at ``push(p) = T W^-1(p)`` in the image."""

    matrix: np.ndarray = field(default_factory=lambda: np.eye(4))  # T
    warp: np.ndarray | None = None  # u (X, Y, Z, 3) in mm on its own grid
    warp_affine: np.ndarray | None = None

    def displacement(self, points: np.ndarray) -> np.ndarray:
        """u at template points (..., 3)."""
        if self.warp is None:
            return np.zeros_like(points)
        return np.stack([sample(self.warp[..., c], self.warp_affine, points, 1, "nearest")
                         for c in range(3)], axis=-1)

    def pull(self, points: np.ndarray) -> np.ndarray:
        """Image points -> template points."""
        p = apply_affine(np.linalg.inv(self.matrix), points)
        return p + self.displacement(p)

    def push(self, points: np.ndarray, tol: float = 1e-4) -> np.ndarray:
        """Template points -> image points (W inverted by fixed-point iteration)."""
        r = points.copy()
        if self.warp is not None:
            for _ in range(100):
                new = points - self.displacement(r)
                step = np.abs(new - r).max()
                r = new
                if step < tol:
                    break
            else:
                raise RuntimeError("the inverse of the synthetic warp did not converge")
        return apply_affine(self.matrix, r)


def random_matrix(rng: np.random.Generator, center: np.ndarray, max_deg: float = 10.0,
                  max_shift: float = 10.0, max_scale: float = 0.05) -> np.ndarray:
    """A random affine about ``center``: rotation, per-axis scale, shift (uniform)."""
    linear = rotation(rng.uniform(-max_deg, max_deg, 3)) @ np.diag(
        1 + rng.uniform(-max_scale, max_scale, 3))
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = center - linear @ center + rng.uniform(-max_shift, max_shift, 3)
    return out


def random_field(rng: np.random.Generator, tpl: Template, amplitude: float = 4.0,
                 smooth: float = 12.0, spacing: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smoothed white noise (sigma ``smooth`` mm) on a ``spacing`` mm grid around
    the template, scaled to a largest displacement of ``amplitude`` mm."""
    lo = apply_affine(tpl.affine, np.zeros(3)) - 30
    hi = apply_affine(tpl.affine, np.array(tpl.t1.shape) - 1.0) + 30
    shape = tuple(int(np.ceil((h - lo_) / spacing)) + 1 for lo_, h in zip(lo, hi, strict=True))
    noise = rng.standard_normal(shape + (3,))
    for c in range(3):
        noise[..., c] = ndimage.gaussian_filter(noise[..., c], smooth / spacing, mode="reflect")
    noise *= amplitude / np.linalg.norm(noise, axis=-1).max()
    grads = np.stack([np.stack(np.gradient(noise[..., c], spacing), -1) for c in range(3)], -2)
    det = np.linalg.det(np.eye(3) + grads)
    if det.min() < 0.3:
        raise RuntimeError(f"synthetic warp too strong (min Jacobian {det.min():.2f})")
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    return noise.astype(np.float32), affine


# ---------------------------------------------------------------------------- contrasts


def contrast(tpl: Template, kind: str) -> np.ndarray:
    """The template's anatomy in another contrast (on the template grid)."""
    if kind == "t1":
        return tpl.t1
    if kind == "t2":  # per-tissue intensities from the tissue maps: CSF bright, WM dark
        return np.tensordot(np.array([1.0, 0.55, 0.3], np.float32), tpl.probs, 1)
    if kind == "pd":  # a non-monotonic remapping of the T1 intensities
        return (np.interp(tpl.t1, [0, 0.1, 0.3, 0.55, 0.8, 1.0],
                          [0, 0.75, 0.95, 0.7, 0.5, 0.55]) * tpl.mask).astype(np.float32)
    raise ValueError(kind)


def add_head(tpl: Template, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A synthetic head around the (skull-stripped) T1 brain: shells of CSF, skull with
    marrow, muscle, fat and skin whose thickness varies smoothly."""
    res = np.abs(tpl.affine[:3, :3]).max(0)
    dist = ndimage.distance_transform_edt(~tpl.mask, sampling=res)
    wobble = ndimage.zoom(rng.uniform(-1.5, 1.5, (5, 5, 5)),
                          np.array(dist.shape) / 5, order=1, grid_mode=True, mode="nearest")
    dist = dist + wobble[tuple(slice(0, n) for n in dist.shape)]
    edges = [2.0, 4.0, 6.5, 8.5, 11.0, 15.0, 16.5]
    values = np.array([0.12, 0.04, 0.5, 0.04, 0.35, 0.85, 0.45, 0.0], np.float32)
    head = values[np.digitize(dist, edges)]
    head = ndimage.gaussian_filter(head, 0.6 / res)
    return np.where(tpl.mask, image, head).astype(np.float32)


def acquire(image: np.ndarray, rng: np.random.Generator, bias: float = 0.2,
            noise: float = 0.02) -> np.ndarray:
    """Scanner effects: a smooth multiplicative bias field and Rician noise (inside the
    image support only, so skull-stripped images stay zero outside)."""
    coarse = rng.uniform(-1, 1, (4, 4, 4))
    field_ = ndimage.zoom(coarse, np.array(image.shape) / 4, order=1, grid_mode=True,
                          mode="nearest")[tuple(slice(0, n) for n in image.shape)]
    out = image * np.exp(bias * field_)
    support = image > 1e-3
    sigma = noise * np.percentile(out[support], 99)
    real = out + rng.normal(0, sigma, out.shape)
    imag = rng.normal(0, sigma, out.shape)
    return np.where(support, np.hypot(real, imag), 0).astype(np.float32)


# ---------------------------------------------------------------------------- pairs


@dataclass
class Side:
    """How one image of a pair is made from the template."""

    contrast: str = "t1"
    deform: Deformation = field(default_factory=Deformation)
    head: bool = False
    acquire: bool = True
    slice_mm: float = 0.0  # thick slices along the grid's third axis (0: template grid)


def render(tpl: Template, src: np.ndarray, side: Side, shape: Sequence[int],
           affine: np.ndarray, order: int) -> np.ndarray:
    """``src`` (template grid) pulled through ``side.deform`` onto a grid; thick slices
    average 1 mm sub-slices over the slice thickness (images only)."""
    out = np.empty(shape, np.float32)
    axis = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    offsets = [0.0]
    if side.slice_mm and order > 0:
        n = max(1, round(side.slice_mm))
        offsets = list(np.linspace(-(n - 1) / 2, (n - 1) / 2, n) * side.slice_mm / n)
    for k0, k1 in slabs(shape):
        pts = slab_points(shape, affine, k0, k1)
        acc = sum(sample(src, tpl.affine, side.deform.pull(pts + o * axis), order)
                  for o in offsets)
        out[..., k0:k1] = acc / len(offsets)
    return out


def thick_grid(tpl: Template, slice_mm: float) -> tuple[tuple[int, ...], np.ndarray]:
    """The template's field of view on slices ``slice_mm`` thick (third axis)."""
    shape = np.array(tpl.t1.shape)
    center = apply_affine(tpl.affine, (shape - 1) / 2)
    affine = tpl.affine.copy()
    affine[:3, 2] *= slice_mm / np.linalg.norm(affine[:3, 2])
    new = shape.copy()
    new[2] = int(np.ceil(shape[2] * np.linalg.norm(tpl.affine[:3, 2]) / slice_mm))
    affine[:3, 3] += center - apply_affine(affine, (new - 1) / 2)
    return tuple(int(n) for n in new), affine


def make_image(tpl: Template, side: Side, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, voxel-to-RAS affine) of one side."""
    src = contrast(tpl, side.contrast)
    if side.head:
        src = add_head(tpl, src, rng)
    if side.slice_mm:
        shape, affine = thick_grid(tpl, side.slice_mm)
    else:
        shape, affine = tpl.t1.shape, tpl.affine
    image = render(tpl, src, side, shape, affine, 1)
    labels = render(tpl, tpl.labels.astype(np.float32), side, shape, affine, 0)
    if side.acquire:
        image = acquire(image, rng)
    return image, labels.astype(np.uint8), affine


def _deformed(rng: np.random.Generator, tpl: Template, warp: bool) -> Deformation:
    matrix = random_matrix(rng, tpl.center)
    if not warp:
        return Deformation(matrix)
    return Deformation(matrix, *random_field(rng, tpl))


# name -> (description, truth kind, builder(rng, tpl) -> (fixed side, moving side))
PAIRS: dict[str, tuple[str, str, Callable[[np.random.Generator, Template], tuple[Side, Side]]]]
PAIRS = {
    "subject-template": (
        "T1 subject (random affine + smooth warp, bias, noise) to the T1 template",
        "deformable", lambda rng, tpl: (Side(acquire=False), Side(deform=_deformed(
            rng, tpl, True)))),
    "cross-subject": (
        "two T1 subjects, each the template through its own affine + warp",
        "deformable", lambda rng, tpl: (Side(deform=_deformed(rng, tpl, True)),
                                        Side(deform=_deformed(rng, tpl, True)))),
    "contrast": (
        "T2-like subject (tissue intensities, affine + warp) to the T1 template",
        "deformable", lambda rng, tpl: (Side(acquire=False), Side(
            "t2", _deformed(rng, tpl, True)))),
    "affine-contrast": (
        "PD-like subject (non-monotonic T1 remap, affine only) to the T1 template",
        "affine", lambda rng, tpl: (Side(acquire=False), Side(
            "pd", _deformed(rng, tpl, False)))),
    "skull": (
        "T1 subject with a synthetic head (affine only) to the skull-stripped template",
        "affine", lambda rng, tpl: (Side(acquire=False), Side(
            deform=_deformed(rng, tpl, False), head=True))),
    "thick-slices": (
        "T1 subject on 5 mm slices (affine only) to the T1 template",
        "affine", lambda rng, tpl: (Side(acquire=False), Side(
            deform=_deformed(rng, tpl, False), slice_mm=5.0))),
}


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write with matching qform and sform (what ITK-based tools read)."""
    img = nb.Nifti1Image(data, affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    nb.save(img, path)


def write_displacement(path: Path, disp_ras: np.ndarray, reference: Path) -> None:
    """Write a RAS displacement (X, Y, Z, 3) on ``reference``'s grid as an ITK field."""
    import SimpleITK as sitk

    ref = sitk.ReadImage(str(reference))
    lps = np.ascontiguousarray((disp_ras * LPS).transpose(2, 1, 0, 3), dtype=np.float32)
    img = sitk.GetImageFromArray(lps, isVector=True)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(path))


def make_pair(name: str, tpl: Template, resolution: int, root: Path) -> Path:
    """Write pair ``name`` under ``root/name`` unless an up-to-date copy is there."""
    out = root / name
    if pair_is_current(out, resolution):
        return out
    out.mkdir(parents=True, exist_ok=True)
    description, truth, build = PAIRS[name]
    rng = np.random.default_rng(_seed(name))
    fixed_side, moving_side = build(rng, tpl)
    images = {}
    for tag, side in (("fixed", fixed_side), ("moving", moving_side)):
        image, labels, affine = make_image(tpl, side, rng)
        save_nifti(image, affine, out / f"{tag}.nii.gz")
        save_nifti(labels, affine, out / f"{tag}_labels.nii.gz")
        images[tag] = (image.shape, affine)
    shape, affine = images["fixed"]
    disp = np.empty(tuple(shape) + (3,), np.float32)
    for k0, k1 in slabs(shape):
        pts = slab_points(shape, affine, k0, k1)
        disp[:, :, k0:k1] = moving_side.deform.push(fixed_side.deform.pull(pts)) - pts
    write_displacement(out / "true_fwd.nii.gz", disp, out / "fixed.nii.gz")
    info = {"version": PAIRS_VERSION, "name": name, "description": description,
            "truth": truth, "resolution": resolution,
            "moving_contrast": moving_side.contrast, "moving_head": moving_side.head,
            "moving_slice_mm": moving_side.slice_mm,
            "fixed_voxel_mm": np.linalg.norm(affine[:3, :3], axis=0).round(3).tolist(),
            "moving_voxel_mm": np.linalg.norm(images["moving"][1][:3, :3], axis=0)
            .round(3).tolist(),
            "true_displacement_mm": {
                "mean": float(np.linalg.norm(disp, axis=-1).mean()),
                "max": float(np.linalg.norm(disp, axis=-1).max())}}
    if truth == "affine":
        true = moving_side.deform.matrix @ np.linalg.inv(fixed_side.deform.matrix)
        np.savetxt(out / "true_fwd_ras.txt", true, fmt="%.10f",
                   header="fixed RAS -> moving RAS (mm); maps a fixed point to the moving "
                   "point holding the same anatomy")
        info["true_fwd_ras"] = true.tolist()
    (out / "pair.json").write_text(json.dumps(info, indent=1))
    return out


def pair_is_current(path: Path, resolution: int) -> bool:
    """Whether ``path`` holds a pair made by this version at this resolution."""
    try:
        info = json.loads((path / "pair.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("version") == PAIRS_VERSION and info.get("resolution") == resolution


def _seed(name: str) -> int:
    """A seed that depends on the pair name only (stable across Python runs)."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) + 1234


# ---------------------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------------------- methods


@dataclass
class Context:
    """Settings shared by all methods."""

    threads: int
    quick: bool
    extent: int
    weights: dict[str, list[str]]
    ants_python: Path
    work: Path
    gpu: bool = False

    def env(self) -> dict[str, str]:
        """The environment of every method process (thread counts pinned)."""
        n = str(self.threads)
        return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n,
                    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=n)


class Method:
    """A registration method: availability, the timed command, the untimed follow-up."""

    name = ""
    kind = ""  # "affine" or "deformable"

    def check(self, ctx: Context) -> str | None:
        """Why the method cannot run here (None if it can)."""
        return None

    def version(self, ctx: Context) -> str:
        """A version string for the report."""
        return ""

    def command(self, pair: Path, run: Path, ctx: Context) -> list[str]:
        """The registration command (timed)."""
        raise NotImplementedError

    def post(self, pair: Path, run: Path, ctx: Context, log) -> tuple[list[Path], Path]:
        """Untimed: (forward transform files for ``displacement_on_grid``, labels warped
        by the tool itself)."""
        raise NotImplementedError


def _call(cmd: Sequence[str], ctx: Context, log) -> None:
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    subprocess.run([str(c) for c in cmd], env=ctx.env(), stdout=log, stderr=subprocess.STDOUT,
                   check=True)


class SynthMorph(Method):
    """``synthmorph register`` (this package), run as its own process."""

    def __init__(self, mode: str, suffix: str = "", extra: Sequence[str] = (),
                 weights: str | None = None, mask: bool = False):
        self.mode, self.name = mode, f"synthmorph-{mode}{suffix}"
        self.mask = mask  # pass the pair's fixed_mask.nii.gz as -x
        self.kind = "affine" if mode in ("affine", "rigid") else "deformable"
        self.extra = list(extra)
        self.weights_key = weights or mode  # which --weights-* option gives its weights

    def _cli(self) -> list[str]:
        return [sys.executable, "-m", "synthmorph_nipype.cli.main"]

    def check(self, ctx: Context) -> str | None:
        given = ctx.weights.get(self.weights_key)
        if self.weights_key != self.mode and not given:
            return f"give its weights with --weights-{self.weights_key.replace('_', '-')}"
        if given:
            missing = [w for w in given if not Path(w).is_file()]
            return f"weights not found: {', '.join(missing)}" if missing else None
        try:
            from synthmorph_nipype.engine.weights import find_weights
            from synthmorph_nipype.errors import WeightsError
        except ImportError as err:
            return f"synthmorph_nipype not importable: {err}"
        try:
            find_weights(self.mode)
        except WeightsError as err:
            return f"no weights (give --weights-{self.mode}): {err}"
        return None

    def version(self, ctx: Context) -> str:
        import synthmorph_nipype

        return synthmorph_nipype.__version__

    def command(self, pair: Path, run: Path, ctx: Context) -> list[str]:
        cmd = self._cli() + ["register", str(pair / "moving.nii.gz"), str(pair / "fixed.nii.gz"),
                             "-m", self.mode, "-t", str(run / "fwd.h5"),
                             "-o", str(run / "moved.nii.gz"), "-j", str(ctx.threads),
                             "-e", str(ctx.extent), "-g" if ctx.gpu else "--cpu"]
        for w in ctx.weights.get(self.weights_key) or []:
            cmd += ["-w", str(w)]
        if self.mask and (pair / "fixed_mask.nii.gz").is_file():
            cmd += ["-x", str(pair / "fixed_mask.nii.gz")]
        return cmd + self.extra

    def post(self, pair: Path, run: Path, ctx: Context, log) -> tuple[list[Path], Path]:
        _call(self._cli() + ["apply", "-m", "nearest", run / "fwd.h5",
                             pair / "moving_labels.nii.gz", run / "labels_tool.nii.gz",
                             "--reference", pair / "fixed.nii.gz"], ctx, log)
        return [run / "fwd.h5"], run / "labels_tool.nii.gz"


class Ants(Method):
    """ANTsPy ``registration`` in its own venv via ``ants_worker.py``."""

    worker = HERE / "ants_worker.py"

    def __init__(self, kind: str):
        self.type = kind
        self.name = "ants-syn" if kind == "SyN" else "ants-affine"
        self.kind = "deformable" if kind == "SyN" else "affine"
        self._version: str | None = None

    def check(self, ctx: Context) -> str | None:
        if not ctx.ants_python.is_file():
            return (f"no ANTs venv python at {ctx.ants_python} (run benchmarks/setup_peers.sh "
                    "or give --ants-python)")
        try:
            out = subprocess.run([str(ctx.ants_python), str(self.worker), "version"],
                                 capture_output=True, text=True, check=True, timeout=300)
            self._version = json.loads(out.stdout.strip().splitlines()[-1])["antspyx"]
        except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as err:
            return f"ANTsPy not usable with {ctx.ants_python}: {err}"
        return None

    def version(self, ctx: Context) -> str:
        return f"antspyx {self._version}"

    def command(self, pair: Path, run: Path, ctx: Context) -> list[str]:
        cmd = [str(ctx.ants_python), str(self.worker), "register", str(pair / "fixed.nii.gz"),
               str(pair / "moving.nii.gz"), str(run), "--type", self.type,
               "--threads", str(ctx.threads)]
        return cmd + (["--quick"] if ctx.quick else [])

    def post(self, pair: Path, run: Path, ctx: Context, log) -> tuple[list[Path], Path]:
        _call([ctx.ants_python, self.worker, "post", pair / "fixed.nii.gz",
               pair / "moving_labels.nii.gz", run, "--threads", ctx.threads], ctx, log)
        return [run / "fwd_comptx.nii.gz"], run / "labels_tool.nii.gz"


def elastix_parameters(transform: str, quick: bool, last: bool) -> str:
    """An elastix parameter file: multi-resolution, Mattes MI (any contrast), adaptive
    stochastic gradient descent; ``transform`` is "affine" or "bspline"."""
    p: dict[str, object] = {
        "FixedInternalImagePixelType": "float", "MovingInternalImagePixelType": "float",
        "UseDirectionCosines": "true", "Registration": "MultiResolutionRegistration",
        "FixedImagePyramid": "FixedSmoothingImagePyramid",
        "MovingImagePyramid": "MovingSmoothingImagePyramid",
        "Interpolator": "BSplineInterpolator", "BSplineInterpolationOrder": 1,
        "ResampleInterpolator": "FinalBSplineInterpolator", "FinalBSplineInterpolationOrder": 3,
        "Resampler": "DefaultResampler", "Optimizer": "AdaptiveStochasticGradientDescent",
        "Metric": "AdvancedMattesMutualInformation", "NumberOfHistogramBins": 32,
        "ImageSampler": "RandomCoordinate", "NumberOfSpatialSamples": 2048,
        "NewSamplesEveryIteration": "true", "CheckNumberOfSamples": "true",
        "NumberOfResolutions": 2 if quick else 4,
        "MaximumNumberOfIterations": 100 if quick else 500,
        "HowToCombineTransforms": "Compose", "DefaultPixelValue": 0,
        "WriteResultImage": "true" if last else "false", "ResultImagePixelType": "float",
        "ResultImageFormat": "nii.gz",
    }
    if transform == "affine":
        p.update({"Transform": "AffineTransform", "AutomaticScalesEstimation": "true",
                  "AutomaticTransformInitialization": "true",
                  "AutomaticTransformInitializationMethod": "CenterOfGravity"})
    else:
        p.update({"Transform": "BSplineTransform",
                  "FinalGridSpacingInPhysicalUnits": 20 if quick else 10})
    lines = []
    for key, value in p.items():
        text = f'"{value}"' if isinstance(value, str) else str(value)
        lines.append(f"({key} {text})")
    return "\n".join(lines) + "\n"


class Elastix(Method):
    """The elastix binary: affine, then (unless ``affine_only``) B-spline."""

    def __init__(self, affine_only: bool):
        self.stages = ["affine"] if affine_only else ["affine", "bspline"]
        self.name = "elastix-affine" if affine_only else "elastix"
        self.kind = "affine" if affine_only else "deformable"

    def check(self, ctx: Context) -> str | None:
        missing = [b for b in ("elastix", "transformix") if shutil.which(b) is None]
        if missing:
            return f"{' and '.join(missing)} not on PATH (run benchmarks/setup_peers.sh)"
        return None

    def version(self, ctx: Context) -> str:
        out = subprocess.run(["elastix", "--version"], capture_output=True, text=True)
        return out.stdout.strip()

    def command(self, pair: Path, run: Path, ctx: Context) -> list[str]:
        run.mkdir(parents=True, exist_ok=True)
        cmd = ["elastix", "-f", str(pair / "fixed.nii.gz"), "-m", str(pair / "moving.nii.gz"),
               "-out", str(run), "-threads", str(ctx.threads)]
        for i, stage in enumerate(self.stages):
            params = run / f"params_{stage}.txt"
            params.write_text(elastix_parameters(stage, ctx.quick, i == len(self.stages) - 1))
            cmd += ["-p", str(params)]
        return cmd

    def post(self, pair: Path, run: Path, ctx: Context, log) -> tuple[list[Path], Path]:
        tp = run / f"TransformParameters.{len(self.stages) - 1}.txt"
        _call(["transformix", "-def", "all", "-tp", tp, "-out", run, "-threads", ctx.threads],
              ctx, log)
        text = tp.read_text()
        text = re.sub(r"\(FinalBSplineInterpolationOrder \d+\)",
                      "(FinalBSplineInterpolationOrder 0)", text)
        text = re.sub(r'\(ResultImagePixelType "[^"]*"\)',
                      '(ResultImagePixelType "unsigned char")', text)
        nearest = run / "TransformParameters.nearest.txt"
        nearest.write_text(text)
        labels_dir = run / "labels"
        labels_dir.mkdir(exist_ok=True)
        _call(["transformix", "-in", pair / "moving_labels.nii.gz", "-tp", nearest,
               "-out", labels_dir, "-threads", ctx.threads], ctx, log)
        fields = sorted(run.glob("deformationField.*"))
        if not fields:
            raise RuntimeError("transformix wrote no deformationField")
        results = sorted(labels_dir.glob("result.*"))
        return [fields[0]], results[0] if results else run / "missing"


NO_REFINEMENT = ["--refine", "0", "--refine-affine", "0"]
METHODS: dict[str, Callable[[], Method]] = {
    # the defaults (with the test-time refinement the weights recommend), the networks
    # alone, and longer refinements
    "synthmorph-joint": lambda: SynthMorph("joint"),
    "synthmorph-affine": lambda: SynthMorph("affine"),
    "synthmorph-joint-net": lambda: SynthMorph("joint", "-net", NO_REFINEMENT),
    "synthmorph-affine-net": lambda: SynthMorph("affine", "-net", ["--refine-affine", "0"]),
    # the refinements restricted to the fixed image's brain mask (pairs that have one)
    "synthmorph-affine-mask": lambda: SynthMorph("affine", "-mask", mask=True),
    "synthmorph-joint-mask": lambda: SynthMorph("joint", "-mask", mask=True),
    "synthmorph-joint-refine50": lambda: SynthMorph("joint", "-refine50", ["--refine", "50"]),
    "synthmorph-joint-refine200": lambda: SynthMorph("joint", "-refine200", ["--refine", "200"]),
    # other joint models (give them with --weights-finetuned / --weights-svr), with the
    # refinement they recommend and alone
    "synthmorph-joint-finetuned": lambda: SynthMorph("joint", "-finetuned", weights="finetuned"),
    "synthmorph-joint-finetuned-net": lambda: SynthMorph("joint", "-finetuned-net", NO_REFINEMENT,
                                                         weights="finetuned"),
    "synthmorph-joint-svr": lambda: SynthMorph("joint", "-svr", weights="svr"),
    "synthmorph-joint-svr-net": lambda: SynthMorph("joint", "-svr-net", NO_REFINEMENT,
                                                   weights="svr"),
    "ants-syn": lambda: Ants("SyN"),
    "ants-affine": lambda: Ants("Affine"),
    "elastix": lambda: Elastix(affine_only=False),
    "elastix-affine": lambda: Elastix(affine_only=True),
}


DEFAULT_METHODS = ["synthmorph-joint", "synthmorph-affine", "ants-syn", "ants-affine",
                   "elastix", "elastix-affine"]

# ---------------------------------------------------------------------------- running


# Peak RSS must come from a small process that forks the method: a child forked (or
# vforked) straight from this process inherits its high-water RSS, so ``wait4`` here would
# report at least this process's peak. GNU time is such a process; without it, a short
# Python launcher reads its child's usage.
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")
LAUNCHER = ("import resource, subprocess, sys; "
            "code = subprocess.call(sys.argv[2:]); "
            "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
            "open(sys.argv[1], 'w').write(f'{u.ru_utime} {u.ru_stime} {u.ru_maxrss}'); "
            "sys.exit(code)")


def run_timed(cmd: Sequence[str], env: dict[str, str], log_path: Path
              ) -> tuple[int, float, float, float]:
    """Run ``cmd``; (exit status, wall seconds, CPU seconds, peak RSS in GB)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log_path.with_suffix(".usage")
    usage_file.unlink(missing_ok=True)
    if GNU_TIME:
        wrapped = [GNU_TIME, "-f", "%U %S %M", "-o", str(usage_file), *cmd]
    else:
        wrapped = [sys.executable, "-c", LAUNCHER, str(usage_file), *cmd]
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        start = time.perf_counter()
        status = subprocess.call(wrapped, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    try:  # GNU time puts "Command exited with non-zero status N" etc. before the numbers
        user, system, rss_kb = usage_file.read_text().strip().splitlines()[-1].split()
        cpu, rss = float(user) + float(system), float(rss_kb) / 1024**2  # kB -> GB
    except (OSError, ValueError, IndexError):
        cpu = rss = float("nan")
    return status, wall, cpu, rss


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_one(method: Method, pair: PairData, rep: int, ctx: Context, keep: bool) -> dict:
    """Register one pair once with one method, then measure the result."""
    run = ctx.work / "runs" / pair.path.name / method.name / f"rep{rep}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    logs = ctx.work / "logs" / pair.path.name / method.name
    record: dict = {"pair": pair.path.name, "method": method.name, "repeat": rep}
    cmd = method.command(pair.path, run, ctx)
    status, wall, cpu, rss = run_timed(cmd, ctx.env(), logs / f"rep{rep}.log")
    record.update(wall_s=wall, cpu_s=cpu, peak_rss_gb=rss, exit_status=status)
    if status != 0:
        record.update(status="failed", reason=f"exit {status}: {_tail(logs / f'rep{rep}.log')}")
        return record
    post_log = logs / f"rep{rep}.post.log"
    try:
        with open(post_log, "w") as log:
            transforms, tool_labels = method.post(pair.path, run, ctx, log)
        record.update(evaluate(pair, transforms, tool_labels))
        record["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - one failed run must not end the benchmark
        record.update(status="failed", reason=f"after registration: {err!r} "
                      f"{_tail(post_log)}")
    finally:
        if not keep:
            shutil.rmtree(run, ignore_errors=True)
    return record


def environment(methods: dict[str, Method], ctx: Context) -> dict:
    """Machine and tool versions."""
    import scipy
    import SimpleITK as sitk

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
           "python": platform.python_version(), "numpy": np.__version__,
           "scipy": scipy.__version__, "SimpleITK": sitk.Version_VersionString()}
    for name, method in methods.items():
        try:
            out[name] = method.version(ctx)
        except Exception as err:  # noqa: BLE001 - versions are informative only
            out[name] = f"unknown ({err})"
    return out


# ---------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> list[dict]:
    """Medians over the successful repeats of each (pair, method)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["pair"], r["method"]), []).append(r)
    out = []
    for (pair, method), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        row: dict = {"pair": pair, "method": method, "runs": len(rs), "ok": len(ok)}
        if not ok:
            row["reason"] = rs[-1].get("reason", "")
        else:
            def med(get, ok=ok):
                return float(statistics.median(get(r) for r in ok))

            walls = [r["wall_s"] for r in ok]
            known = "error_mm_mean" in ok[0]
            row.update(
                dice_after=med(lambda r: r["dice"]["mean"]),
                dice_after_tissue={t: med(lambda r, t=t: r["dice"][t]) for t in TISSUES}
                if TISSUES[0] in ok[0]["dice"] else None,
                folding_pct_brain=med(lambda r: r["folding_pct_brain"]),
                folding_pct_all=med(lambda r: r["folding_pct_all"]),
                error_mm_mean=med(lambda r: r["error_mm_mean"]) if known else None,
                error_mm_max=med(lambda r: r["error_mm_max"]) if known else None,
                wall_s_median=float(statistics.median(walls)), wall_s_min=min(walls),
                wall_s_max=max(walls), cpu_s_median=med(lambda r: r["cpu_s"]),
                peak_rss_gb=med(lambda r: r["peak_rss_gb"]))
            if all("dice_tool" in r for r in ok):
                row["dice_tool"] = med(lambda r: r["dice_tool"]["mean"])
        out.append(row)
    return out


def markdown(results: dict) -> str:
    """The report: one table row per (pair, method), then skipped methods and notes."""
    pairs = results["pairs"]
    lines = [
        f"# Registration accuracy and speed ({results['config']['resolution']} mm template, "
        f"{results['config']['threads']} threads, {results['config']['repeats']} run(s)"
        f"{', quick settings' if results['config']['quick'] else ''})", "",
        "| pair | method | Dice before -> after (truth) | CSF / GM / WM after "
        "| folding % brain (all) | error vs truth mm, mean (max) | wall s, median (min-max) "
        "| peak RSS GB |",
        "|---|---|---|---|---|---|---|---|"]
    warnings = []
    for row in results["summary"]:
        pair = pairs[row["pair"]]
        before = f"{pair['dice_before']['mean']:.3f}"
        truth = f"({pair['dice_truth']['mean']:.3f})" if pair["dice_truth"] else "(-)"
        label = f"{row['pair']} ({pair['truth']})"
        if not row["ok"]:
            lines.append(f"| {label} | {row['method']} | {before} -> failed {truth} | | | | | |")
            warnings.append(f"{row['pair']} / {row['method']} failed: {row['reason']}")
            continue
        tissue = " / ".join(f"{row['dice_after_tissue'][t]:.3f}" for t in TISSUES) \
            if row["dice_after_tissue"] else "(brain labels)"
        error = "-" if row["error_mm_mean"] is None else \
            f"{row['error_mm_mean']:.2f} ({row['error_mm_max']:.2f})"
        lines.append(
            f"| {label} | {row['method']} | {before} -> {row['dice_after']:.3f} {truth} "
            f"| {tissue} "
            f"| {row['folding_pct_brain']:.3f} ({row['folding_pct_all']:.3f}) "
            f"| {error} "
            f"| {row['wall_s_median']:.1f} ({row['wall_s_min']:.1f}-{row['wall_s_max']:.1f}) "
            f"| {row['peak_rss_gb']:.2f} |")
        if "dice_tool" in row and abs(row["dice_tool"] - row["dice_after"]) > 0.02:
            warnings.append(f"{row['pair']} / {row['method']}: Dice from the tool's own label "
                            f"warp {row['dice_tool']:.3f} differs from the field's "
                            f"{row['dice_after']:.3f} (check transform conventions)")
        if row["ok"] < row["runs"]:
            warnings.append(f"{row['pair']} / {row['method']}: {row['runs'] - row['ok']} of "
                            f"{row['runs']} runs failed")
    lines += ["", "Dice: mean over CSF, GM, WM of the moving labels pulled onto the fixed grid "
              "through each method's forward transform (nearest neighbour); (truth): through the "
              "true mapping, the ceiling that resampling the labels leaves. Folding: voxels "
              "with a non-positive Jacobian determinant of that mapping, inside the fixed "
              "brain (whole grid). Error: distance between the estimated and the true "
              "fixed-to-moving mapping over the fixed brain; on pairs marked (affine) it is "
              "the affine error. Wall time and peak RSS: the whole method process."]
    for name, reason in results["skipped"].items():
        warnings.append(f"{name} skipped: {reason}")
    if warnings:
        lines += [""] + [f"* {w}" for w in warnings]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def _comma_list(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(bad) or '(empty)'}; choose from {', '.join(choices)}")
        return items
    return parse


def write_training_set(root: Path, count: int, resolution: int) -> None:
    """``count`` T1 'subjects' for VoxelMorph-style fine-tuning: the template through
    random affines and warps, with scanner effects, drawn from seeds no pair uses."""
    tpl = load_template(resolution)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        rng = np.random.default_rng(1_000_000 + k)
        image, _, affine = make_image(tpl, Side(deform=_deformed(rng, tpl, True)), rng)
        save_nifti(image, affine, root / f"sub-{k:02d}_T1w.nii.gz")
    print(f"wrote {count} training images to {root}")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, make the pairs, run every method on every pair, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--resolution", type=int, choices=(1, 2),
                        help="template resolution in mm (default 1; 2 with --quick)")
    parser.add_argument("--repeats", type=int, help="runs per (pair, method) (default 3; "
                        "1 with --quick)")
    parser.add_argument("--methods", type=_comma_list(list(METHODS)), default=DEFAULT_METHODS,
                        help=f"comma list of {', '.join(METHODS)} (default: "
                        f"{', '.join(DEFAULT_METHODS)})")
    parser.add_argument("--pairs", type=lambda t: [n for n in t.split(",") if n],
                        default=list(PAIRS),
                        help=f"comma list of {', '.join(PAIRS)} (default: all), or pairs "
                        "already in OUT/pairs (benchmarks/heldout.py writes held-out ones)")
    parser.add_argument("--threads", type=int, default=2, help="threads for every method")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 mm, 1 run, fewer ANTs/elastix iterations, extent 192")
    parser.add_argument("--extent", type=int, choices=(192, 256),
                        help="synthmorph network extent (default 256; 192 with --quick)")
    parser.add_argument("--weights-affine", action="append", metavar="FILE",
                        help="synthmorph -w for synthmorph-affine (repeatable; default: the "
                        "package's own weights)")
    parser.add_argument("--weights-joint", action="append", metavar="FILE",
                        help="synthmorph -w for synthmorph-joint (repeatable)")
    parser.add_argument("--weights-finetuned", action="append", metavar="FILE",
                        help="synthmorph -w for synthmorph-joint-finetuned")
    parser.add_argument("--weights-svr", action="append", metavar="FILE",
                        help="synthmorph -w for synthmorph-joint-svr")
    parser.add_argument("--ants-python", type=Path, default=Path(
        os.environ.get("ANTS_VENV", "/work/bench/ants-venv")) / "bin" / "python",
        help="Python of the ANTsPy venv (default: $ANTS_VENV/bin/python, "
        "ANTS_VENV=/work/bench/ants-venv)")
    parser.add_argument("--gpu", action="store_true",
                        help="run the synthmorph methods on the GPU (default: CPU, like the peers)")
    parser.add_argument("--keep", action="store_true", help="keep each run's output files")
    parser.add_argument("--training-set", type=int, metavar="N",
                        help="instead of benchmarking, write N deformed template subjects to "
                        "OUT (images for `synthmorph train --objective similarity`)")
    args = parser.parse_args(argv)
    resolution = args.resolution or (2 if args.quick else 1)
    if args.training_set:
        write_training_set(args.out, args.training_set, resolution)
        return
    repeats = args.repeats or (1 if args.quick else 3)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(threads=args.threads, quick=args.quick,
                  extent=args.extent or (192 if args.quick else 256),
                  weights={"affine": args.weights_affine, "joint": args.weights_joint,
                           "finetuned": args.weights_finetuned, "svr": args.weights_svr},
                  ants_python=args.ants_python, work=out, gpu=args.gpu)

    methods, skipped = {}, {}
    for name in args.methods:
        method = METHODS[name]()
        reason = method.check(ctx)
        if reason:
            skipped[name] = reason
            print(f"skipping {name}: {reason}", flush=True)
        else:
            methods[name] = method

    print(f"making pairs ({resolution} mm) in {out / 'pairs'}", flush=True)
    tpl = None
    pairs: dict[str, PairData] = {}
    for name in args.pairs:
        if name not in PAIRS:  # made by another script (benchmarks/heldout.py)
            if not (out / "pairs" / name / "pair.json").is_file():
                parser.error(f"unknown pair {name}: not one of {', '.join(PAIRS)} and not "
                             f"in {out / 'pairs'}")
            pairs[name] = PairData.load(out / "pairs" / name)
            continue
        if not pair_is_current(out / "pairs" / name, resolution):
            tpl = tpl or load_template(resolution)
        pairs[name] = PairData.load(make_pair(name, tpl, resolution, out / "pairs"))
    del tpl

    results = {"config": {"resolution": resolution, "repeats": repeats, "threads": args.threads,
                          "quick": args.quick, "extent": ctx.extent, "gpu": args.gpu,
                          "weights": {k: v for k, v in ctx.weights.items() if v},
                          "methods": args.methods, "pairs": args.pairs},
               "environment": environment(methods, ctx),
               "pairs": {name: dict(p.info, dice_before=p.dice_before(),
                                   dice_truth=p.dice_truth())
                         for name, p in pairs.items()},
               "skipped": skipped, "runs": []}

    def save() -> None:
        results["summary"] = summarize(results["runs"])
        (out / "results.json").write_text(json.dumps(results, indent=1))

    for rep in range(repeats):
        for pair in pairs.values():
            for method in methods.values():
                record = run_one(method, pair, rep, ctx, args.keep)
                results["runs"].append(record)
                msg = (f"Dice {record['dice']['mean']:.3f}, error "
                       f"{record.get('error_mm_mean', float('nan')):.2f} mm"
                       if record["status"] == "ok" else record["reason"])
                print(f"[{rep + 1}/{repeats}] {pair.path.name} {method.name}: "
                      f"{record['wall_s']:.1f} s, {record['peak_rss_gb']:.2f} GB, {msg}",
                      flush=True)
                save()
    save()
    report = markdown(results)
    (out / "results.md").write_text(report)
    print()
    print(report)


if __name__ == "__main__":
    main()
