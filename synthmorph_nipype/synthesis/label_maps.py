"""Label maps of real subjects (``synthmorph train --label-maps``), affinely normalised.

SynthMorph trains on whole-head label maps of real subjects: FreeSurfer's brain labels
(aseg numbering) plus non-brain head tissues. This module reads such maps (NIfTI or MGZ,
any grid), and brings them into one affine reference: the centroids of the brain labels
every map shares are fitted to their mean configuration (generalised Procrustes with full
affines). Placed on the training grid through that fit, two different subjects differ by
their anatomy only, so the affine between two synthetic images made from them is the
product of the generator's own draws, as for two images of one subject.

Label conventions (SynthSeg's training maps, FreeSurfer's look-up table):

* :data:`BRAIN_LABELS` are what the losses count (cerebral and cerebellar white matter
  and cortex, ventricles, deep grey nuclei, brain stem, ...);
* labels of 500 and above (skull, scalp, soft tissue, eyes, ...) and 24 (CSF, mostly
  extra-cerebral in these maps) are the *head*: synthesis may strip them (skull on/off);
* everything else is kept in the images but ignored by the losses.

Maps that hold none of the brain labels (another numbering) count every non-head label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

#: FreeSurfer aseg labels of the brain that the training losses count.
BRAIN_LABELS = (2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 26, 28,
                41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)
#: Labels below 500 that belong to the head rather than the brain.
HEAD_LABELS_BELOW_500 = (24,)
SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")


def is_head(labels) -> np.ndarray:
    """Where ``labels`` belong to the head rather than the brain: 500 and above, or
    :data:`HEAD_LABELS_BELOW_500`.

    >>> is_head([0, 2, 24, 515])
    array([False, False,  True,  True])
    """
    labels = np.asarray(labels)
    return (labels >= 500) | np.isin(labels, HEAD_LABELS_BELOW_500)


@dataclass
class SubjectLabels:
    """One subject's label map: integer labels on their grid, and where they lie."""

    path: Path
    labels: np.ndarray  # int32, 3-D
    affine: np.ndarray  # voxel -> RAS (mm)
    to_reference: np.ndarray | None = None  # RAS (mm) -> reference RAS, set by align

    @property
    def head_labels(self) -> tuple[int, ...]:
        """Labels of this map that synthesis may strip."""
        present = np.unique(self.labels)
        return tuple(int(v) for v in present[is_head(present)])


def label_map_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The label maps in a folder (NIfTI/MGZ, sorted by name) or a list of files.

    >>> label_map_files([])
    Traceback (most recent call last):
    ...
    synthmorph_nipype.errors.InputError: no label maps given
    """
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.exists():
            raise InputError(f"{folder}: not found")
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir()
                           if p.is_file() and p.name.endswith(SUFFIXES))
            if not files:
                raise InputError(f"{folder}: holds no label maps (.nii, .nii.gz, .mgz)")
            return files
        return [folder]
    files = [Path(p) for p in source]
    if not files:
        raise InputError("no label maps given")
    return files


def read_label_map(path: str | Path) -> SubjectLabels:
    """Read one label map; refuse files that are not 3-D integer-valued maps."""
    import nibabel as nb

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: label map not found")
    try:
        img = nb.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many kinds for non-images
        raise InputError(f"{path}: not a readable NIfTI or MGZ label map "
                         f"({err.__class__.__name__})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: label map is {data.ndim}-D with shape {data.shape}, "
                         "need a 3-D volume")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise InputError(f"{path}: not a label map (non-integer values)")
    if data.min() < 0:
        raise InputError(f"{path}: not a label map (negative labels)")
    labels = data.astype(np.int32)
    if not np.any(labels):
        raise InputError(f"{path}: label map is empty (all background)")
    return SubjectLabels(path, labels, np.asarray(img.affine, dtype=np.float64))


def loss_labels(maps: Sequence[SubjectLabels]) -> tuple[int, ...]:
    """The labels the losses count: :data:`BRAIN_LABELS` present in any map, else every
    label that is neither background nor head."""
    present = set()
    for m in maps:
        present.update(int(v) for v in np.unique(m.labels))
    brain = tuple(v for v in BRAIN_LABELS if v in present)
    if brain:
        return brain
    return tuple(sorted(v for v in present if v and not is_head(v)))


def centroids(subject: SubjectLabels, labels: Sequence[int]) -> np.ndarray:
    """World (RAS, mm) centroids ``(len(labels), 3)`` of ``labels`` (NaN where absent)."""
    flat = subject.labels.reshape(-1)
    top = max(int(flat.max()), max(labels)) + 1
    count = np.bincount(flat, minlength=top).astype(np.float64)
    ijk = np.empty((len(labels), 3))
    shape = subject.labels.shape
    for axis in range(3):
        coord = np.arange(shape[axis], dtype=np.float64)
        view = [1, 1, 1]
        view[axis] = -1
        weights = np.broadcast_to(coord.reshape(view), shape).reshape(-1)
        sums = np.bincount(flat, weights=weights, minlength=top)
        with np.errstate(invalid="ignore", divide="ignore"):
            ijk[:, axis] = sums[list(labels)] / count[list(labels)]
    return ijk @ subject.affine[:3, :3].T + subject.affine[:3, 3]


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 4x4 affine mapping points ``src`` onto ``dst`` (both ``(N, 3)``).

    >>> pts = np.array([[0., 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]])
    >>> mat = np.diag([2.0, 1.0, 0.5, 1.0]); mat[:3, 3] = [1, 2, 3]
    >>> moved = pts @ mat[:3, :3].T + mat[:3, 3]
    >>> bool(np.allclose(fit_affine(pts, moved), mat))
    True
    """
    if len(src) < 4:
        raise ValueError("an affine fit needs at least 4 points")
    design = np.hstack([src, np.ones((len(src), 1))])
    sol, *_ = np.linalg.lstsq(design, dst, rcond=None)
    out = np.eye(4)
    out[:3] = sol.T
    return out


def align(maps: Sequence[SubjectLabels], iterations: int = 5) -> np.ndarray:
    """Set every map's ``to_reference``: the affine taking its brain-label centroids onto
    their mean configuration (centred on the origin). Returns that configuration."""
    if not maps:
        raise ValueError("no label maps to align")
    labels = loss_labels(maps)
    cents = [centroids(m, labels) for m in maps]
    shared = np.all([np.all(np.isfinite(c), axis=1) for c in cents], axis=0)
    if shared.sum() < 4:
        # too few labels shared by all maps for an affine: centre each map instead
        for m, c in zip(maps, cents, strict=True):
            mat = np.eye(4)
            mat[:3, 3] = -np.nanmean(c, axis=0)
            m.to_reference = mat
        return np.zeros((0, 3))
    cents = [c[shared] for c in cents]
    spread = [np.linalg.svd(c - c.mean(0), compute_uv=False) for c in cents]
    if min(float(s[-1] / s[0]) for s in spread) < 1e-2:
        # the centroids lie (nearly) on a plane or a line: no affine to fit, centre only
        for m, c in zip(maps, cents, strict=True):
            mat = np.eye(4)
            mat[:3, 3] = -c.mean(0)
            m.to_reference = mat
        return np.zeros((0, 3))
    ref = cents[0] - cents[0].mean(0)
    for _ in range(iterations):
        fits = [fit_affine(c, ref) for c in cents]
        ref = np.mean([c @ f[:3, :3].T + f[:3, 3] for c, f in zip(cents, fits, strict=True)],
                      axis=0)
        ref = ref - ref.mean(0)
    for m, c in zip(maps, cents, strict=True):
        m.to_reference = fit_affine(c, ref)
    return ref
