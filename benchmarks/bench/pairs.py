"""Pairs made from nilearn's template with a known answer, and a training set."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from synthmorph_nipype.ops.rotation import rotation

from .geometry import LPS, apply_affine, sample, slab_points, slabs

PAIRS_VERSION = 1
TISSUES = ("csf", "gm", "wm")


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
    # the frozen pairs were drawn turning y the other way: the same draws, y negated
    angles = rng.uniform(-max_deg, max_deg, 3) * (1, -1, 1)
    linear = rotation(angles) @ np.diag(
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
