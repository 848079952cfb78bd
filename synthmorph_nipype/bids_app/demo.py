"""A small BIDS dataset made from the template nilearn ships: each participant is the
template under a random affine and a smooth random warp, with its own intensities (T1w)
and an inverted, T2-like contrast of the same head, slightly moved (T2w)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
from scipy import ndimage

from ..ops.rotation import rotation


def _subject_images(seed: int, template, mask) -> tuple[nb.Nifti1Image, nb.Nifti1Image]:
    rng = np.random.default_rng(seed)
    data = np.asarray(template.get_fdata(), dtype=np.float32)
    shape = data.shape
    # smooth random displacement (voxels), ~2-3 voxels at most
    disp = [ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 12)
            for _ in range(3)]
    disp = [d * (3.0 / (np.abs(d).max() + 1e-6)) for d in disp]
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    coords = [g + d for g, d in zip(grid, disp, strict=True)]
    warped = ndimage.map_coordinates(data, coords, order=1)
    brain = ndimage.map_coordinates(np.asarray(mask.dataobj, np.float32), coords, order=1) > 0.5
    # intensities: a gamma curve and noise; T2-like: inverted inside the brain
    norm = warped / max(float(warped.max()), 1e-6)
    t1 = norm ** rng.uniform(0.8, 1.25) + rng.normal(0, 0.01, shape)
    t2 = np.where(brain, 1.0 - 0.8 * norm, 0.0) + rng.normal(0, 0.01, shape)
    # a random pose in the scanner, and a small head movement between the two scans
    move = np.eye(4)
    move[:3, :3] = rotation(rng.uniform(-8, 8, 3)) * rng.uniform(0.95, 1.05)
    move[:3, 3] = rng.uniform(-8, 8, 3)
    shift = np.eye(4)
    shift[:3, :3], shift[:3, 3] = rotation(rng.uniform(-3, 3, 3)), rng.uniform(-3, 3, 3)
    scale = 1000.0
    imgs = []
    for vol, extra in ((t1, np.eye(4)), (t2, shift)):
        out = np.clip(vol * scale, 0, None).astype(np.int16)
        img = nb.Nifti1Image(out, extra @ move @ template.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(img.affine, 1)
        img.set_sform(img.affine, 1)
        imgs.append(img)
    return imgs[0], imgs[1]


def make_demo_dataset(root: str | Path, n_subjects: int = 3, resolution: int = 2) -> Path:
    """Write the demo dataset under ``root`` (left as it is when already there)."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    root = Path(root)
    if (root / "dataset_description.json").is_file():
        return root
    template = load_mni152_template(resolution=resolution)
    mask = load_mni152_brain_mask(resolution=resolution)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["participant_id"]
    for k in range(1, n_subjects + 1):
        sub = f"sub-{k:02d}"
        anat = root / sub / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        t1, t2 = _subject_images(k, template, mask)
        t1.to_filename(anat / f"{sub}_T1w.nii.gz")
        t2.to_filename(anat / f"{sub}_T2w.nii.gz")
        for suffix in ("T1w", "T2w"):
            (anat / f"{sub}_{suffix}.json").write_text(json.dumps(
                {"Description": "synthetic, made from the ICBM 2009a template"}))
        rows.append(sub)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    (root / "README").write_text(
        "Synthetic demo dataset of synthmorph-nipype: the ICBM 2009a template (as nilearn "
        "ships it) under random affine and smooth warps, with T1-like and T2-like "
        "intensities.\n")
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "synthmorph-nipype demo", "BIDSVersion": "1.10.0", "DatasetType": "raw",
         "License": "CC0"}, indent=2))
    return root
