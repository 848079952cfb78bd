"""Benchmark pairs from data the embedded models never trained on (issue 13).

Writes pairs in the layout of ``benchmarks/accuracy.py`` (``OUT/pairs/NAME``: ``fixed``,
``moving``, their label maps, ``pair.json`` and, where the answer is known,
``true_fwd.nii.gz`` and ``true_fwd_ras.txt``), which then runs every method on them:

    python benchmarks/heldout.py --data ../shared/data --out bench
    python benchmarks/accuracy.py --out bench --pairs inter-t1,motion-colin-head-brain,...

Sources (``--data``, the folder ``../shared/data`` of this workplace; nothing is copied
into the repository):

* ``synthseg_label_maps/training_seg_17..20``: whole-head label maps of four real
  subjects that training leaves out. Each is rendered as a T1-, T2- or PD-like image
  (fixed per-label intensities for the brain, seeded random ones for the head tissues,
  partial-volume blur, bias field and Rician noise), with its head or skull-stripped
  (head labels and CSF set to background). *inter-* pairs join two different subjects
  (no known answer: Dice of the 31 brain labels); *motion-* pairs join one subject to
  itself under a known affine (exact answer: the error in mm over the fixed brain).
* ``real_heads/colin27_T1w_head`` against its brain-extracted copy under a known rigid
  motion (a real head against a real skull-stripped brain; Dice of the brain mask).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.geometry import sample, slab_points, slabs  # noqa: E402
from bench.pairs import acquire, save_nifti, write_displacement  # noqa: E402

from synthmorph_nipype.ops.rotation import axis_angle  # noqa: E402
from synthmorph_nipype.synthesis.label_maps import BRAIN_LABELS, is_head  # noqa: E402

VERSION = 3
HELD_OUT = (17, 18, 19, 20)
_WM = (2, 41, 7, 46, 16, 28, 60, 77, 85)
_CORTEX = (3, 42, 8, 47)
_CSF = (4, 5, 14, 15, 43, 44, 24, 72)
# per-contrast intensity of brain labels (deep grey nuclei have their own)
_DEEP = {10: (0.66, 0.42, 0.75), 49: (0.66, 0.42, 0.75), 11: (0.55, 0.5, 0.8),
         50: (0.55, 0.5, 0.8), 12: (0.6, 0.45, 0.78), 51: (0.6, 0.45, 0.78),
         13: (0.72, 0.35, 0.72), 52: (0.72, 0.35, 0.72), 17: (0.5, 0.6, 0.82),
         53: (0.5, 0.6, 0.82), 18: (0.5, 0.58, 0.82), 54: (0.5, 0.58, 0.82),
         26: (0.55, 0.5, 0.8), 58: (0.55, 0.5, 0.8)}
CONTRASTS = ("t1", "t2", "pd")
_TISSUE = {"wm": (0.85, 0.3, 0.65), "cortex": (0.5, 0.55, 0.82), "csf": (0.12, 1.0, 0.92),
           "other": (0.4, 0.5, 0.7)}

# name: (description, truth kind, moving (subject, contrast, head), fixed (...), motion,
#        moving slice thickness in mm)
PAIRS = {
    "inter-t1": ("T1 head of subject 17 to the T1 head of subject 18", "none",
                 (17, "t1", True), (18, "t1", True), None, 0.0),
    "inter-t1-brain": ("T1 head of subject 19 to the skull-stripped T1 of subject 20", "none",
                       (19, "t1", True), (20, "t1", False), None, 0.0),
    "inter-t2": ("T2-like head of subject 18 to the T1 head of subject 19", "none",
                 (18, "t2", True), (19, "t1", True), None, 0.0),
    "inter-pd-brain": ("skull-stripped PD-like subject 20 to the T1 head of subject 17",
                       "none", (20, "pd", False), (17, "t1", True), None, 0.0),
    "motion-t2-head-brain": ("T2-like head of subject 17 under a known affine to its own "
                             "skull-stripped T1", "affine", (17, "t2", True),
                             (17, "t1", False), (15.0, 12.0, 0.05), 0.0),
    "motion-thick": ("T1 head of subject 18 on 5 mm slices under a known affine to its own "
                     "T1 head", "affine", (18, "t1", True), (18, "t1", True),
                     (10.0, 10.0, 0.03), 5.0),
    "motion-rot30-pd": ("PD-like head of subject 19 rotated by 30 degrees to its own "
                        "skull-stripped T1", "affine", (19, "pd", True), (19, "t1", False),
                        (30.0, 10.0, 0.0), 0.0),
    "motion-colin-head-brain": ("Colin27 T1 head under a known rigid motion to its "
                                "brain-extracted copy", "affine", ("colin", "t1", True),
                                ("colin", "t1", False), (12.0, 10.0, 0.0), 0.0),
}


def intensities(labels: np.ndarray, contrast: str, rng_seed: int) -> np.ndarray:
    """A lookup label -> intensity for one contrast: fixed for brain tissues, seeded random
    for the head tissues (each contrast its own draw)."""
    c = CONTRASTS.index(contrast)
    top = int(labels.max()) + 1
    table = np.full(top, _TISSUE["other"][c], np.float32)
    table[0] = 0.0
    rng = np.random.default_rng(rng_seed + 7 * c)
    for v in range(1, top):
        if v in _WM:
            table[v] = _TISSUE["wm"][c]
        elif v in _CORTEX:
            table[v] = _TISSUE["cortex"][c]
        elif v in _CSF:
            table[v] = _TISSUE["csf"][c]
        elif v in _DEEP:
            table[v] = _DEEP[v][c]
        elif v >= 500:
            table[v] = rng.uniform(0.05, 1.0)
    return table


def render_subject(labels: np.ndarray, contrast: str, head: bool, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) of a label map in a contrast, with or without its head."""
    labels = labels.copy()
    if not head:
        labels[is_head(labels)] = 0
    image = intensities(labels, contrast, seed)[labels]
    image = ndimage.gaussian_filter(image, 0.7)  # partial volume of a 1 mm scan
    rng = np.random.default_rng(seed)
    image = acquire(image, rng, bias=0.2, noise=0.02)
    return image, labels


def random_motion(rng: np.random.Generator, center: np.ndarray, degrees: float,
                  shift_mm: float, scale: float) -> np.ndarray:
    """RAS 4x4 about ``center``: rotation of ``degrees`` about a random axis, a shift of
    ``shift_mm`` in a random direction, per-axis scales within ``scale``."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    rot = axis_angle(axis, degrees)
    lin = rot @ np.diag(1 + rng.uniform(-scale, scale, 3))
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * shift_mm
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = center + shift - lin @ center
    return out


def thick_affine(affine: np.ndarray, shape: Sequence[int], slice_mm: float
                 ) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid's field of view on slices ``slice_mm`` thick along its third axis."""
    shape = np.array(shape)
    center = affine[:3, :3] @ ((shape - 1) / 2) + affine[:3, 3]
    out = affine.copy()
    out[:3, 2] *= slice_mm / np.linalg.norm(affine[:3, 2])
    new = shape.copy()
    new[2] = int(np.ceil(shape[2] * np.linalg.norm(affine[:3, 2]) / slice_mm))
    out[:3, 3] += center - (out[:3, :3] @ ((new - 1) / 2) + out[:3, 3])
    return tuple(int(n) for n in new), out


def moved(volume: np.ndarray, affine: np.ndarray, motion: np.ndarray, shape, out_affine,
          order: int, slice_mm: float = 0.0) -> np.ndarray:
    """``volume`` whose content moved by ``motion`` (RAS: the anatomy at x shows at
    motion @ x), on the grid ``shape``/``out_affine``; thick slices average 1 mm
    sub-slices (images only)."""
    inv = np.linalg.inv(motion)
    out = np.empty(tuple(shape), np.float32)
    axis = out_affine[:3, 2] / np.linalg.norm(out_affine[:3, 2])
    offsets = [0.0]
    if slice_mm and order > 0:
        n = max(1, round(slice_mm))
        offsets = list(np.linspace(-(n - 1) / 2, (n - 1) / 2, n) * slice_mm / n)
    for k0, k1 in slabs(shape):
        pts = slab_points(shape, out_affine, k0, k1)
        acc = sum(sample(volume, affine, (pts + o * axis) @ inv[:3, :3].T + inv[:3, 3], order)
                  for o in offsets)
        out[..., k0:k1] = acc / len(offsets)
    return out


def _load_subject(data: Path, which) -> tuple[np.ndarray, np.ndarray]:
    path = data / "synthseg_label_maps" / f"training_seg_{which:02d}.nii.gz"
    img = nb.load(path)
    return np.asarray(img.dataobj).astype(np.int32), img.affine


def _side(data: Path, spec, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, affine) of one side of a pair."""
    which, contrast, head = spec
    if which == "colin":
        name = "colin27_T1w_head.nii.gz" if head else "colin27_T1w_brain.nii.gz"
        img = nb.load(data / "real_heads" / name)
        brain = np.asarray(nb.load(data / "real_heads" / "colin27_T1w_brain.nii.gz").dataobj)
        image = np.asarray(img.dataobj, dtype=np.float32)
        return image / np.percentile(image, 99.5), (brain > 0).astype(np.int32), img.affine
    labels, affine = _load_subject(data, which)
    image, labels = render_subject(labels, contrast, head, seed)
    return image, labels, affine


def brain_labels(labels: np.ndarray) -> np.ndarray:
    """The labels the metrics count: the head (labels >= 500, CSF) is background, so the
    error is the brain's and Dice counts brain structures."""
    out = labels.copy()
    out[is_head(out)] = 0
    return out


def make_pair(name: str, data: Path, root: Path) -> Path:
    """Write pair ``name`` under ``root/name`` unless a current copy is there."""
    out = root / name
    try:
        if json.loads((out / "pair.json").read_text()).get("heldout_version") == VERSION:
            return out
    except (OSError, ValueError):
        pass
    out.mkdir(parents=True, exist_ok=True)
    description, truth, moving_spec, fixed_spec, motion_spec, slice_mm = PAIRS[name]
    seed = sum((i + 1) * ord(c) for i, c in enumerate(name)) + 4321
    rng = np.random.default_rng(seed)
    f_img, f_lab, f_aff = _side(data, fixed_spec, seed)
    m_img, m_lab, m_aff = _side(data, moving_spec, seed + 1)
    save_nifti(f_img, f_aff, out / "fixed.nii.gz")
    f_lab, m_lab = brain_labels(f_lab), brain_labels(m_lab)
    save_nifti(f_lab.astype(np.int16), f_aff, out / "fixed_labels.nii.gz")
    # the fixed image's brain mask, for the methods that take one (-x)
    save_nifti((f_lab > 0).astype(np.uint8), f_aff, out / "fixed_mask.nii.gz")
    info = {"version": 1, "heldout_version": VERSION, "name": name,
            "description": description, "truth": truth, "resolution": 1,
            "moving": list(map(str, moving_spec)), "fixed": list(map(str, fixed_spec)),
            "moving_slice_mm": slice_mm,
            "dice_labels": [1] if fixed_spec[0] == "colin" else list(BRAIN_LABELS)}
    if motion_spec is not None:
        shape = m_img.shape
        center = m_aff[:3, :3] @ ((np.array(shape) - 1) / 2) + m_aff[:3, 3]
        brain = np.argwhere(m_lab > 0).mean(0)
        center = m_aff[:3, :3] @ brain + m_aff[:3, 3]
        motion = random_motion(rng, center, *motion_spec)
        grid_shape, grid_aff = (shape, m_aff) if not slice_mm else \
            thick_affine(m_aff, shape, slice_mm)
        m_img = moved(m_img, m_aff, motion, grid_shape, grid_aff, 1, slice_mm)
        m_lab = moved(m_lab.astype(np.float32), m_aff, motion, grid_shape, grid_aff, 0)
        m_aff = grid_aff
        np.savetxt(out / "true_fwd_ras.txt", motion, fmt="%.10f",
                   header="fixed RAS -> moving RAS (mm); maps a fixed point to the moving "
                   "point holding the same anatomy")
        info["true_fwd_ras"] = motion.tolist()
        shape = f_img.shape
        disp = np.empty(tuple(shape) + (3,), np.float32)
        for k0, k1 in slabs(shape):
            pts = slab_points(shape, f_aff, k0, k1)
            disp[:, :, k0:k1] = pts @ motion[:3, :3].T + motion[:3, 3] - pts
        write_displacement(out / "true_fwd.nii.gz", disp, out / "fixed.nii.gz")
        info["true_displacement_mm"] = {"mean": float(np.linalg.norm(disp, axis=-1).mean())}
    save_nifti(m_img.astype(np.float32), m_aff, out / "moving.nii.gz")
    save_nifti(np.rint(m_lab).astype(np.int16), m_aff, out / "moving_labels.nii.gz")
    (out / "pair.json").write_text(json.dumps(info, indent=1))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with synthseg_label_maps/ and real_heads/")
    parser.add_argument("--out", type=Path, required=True, help="benchmark folder")
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help=f"comma list of {', '.join(PAIRS)} (default: all)")
    args = parser.parse_args(argv)
    names = [n for n in args.pairs.split(",") if n]
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        parser.error(f"unknown pairs: {', '.join(unknown)}")
    for name in names:
        path = make_pair(name, args.data, args.out / "pairs")
        print(f"{name}: {path}", flush=True)


if __name__ == "__main__":
    main()
