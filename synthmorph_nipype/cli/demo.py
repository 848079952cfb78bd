"""``synthmorph demo``: a registration problem with a known answer, made from the template
that nilearn ships, and its registration with the installed (or given) weights."""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nb
import numpy as np

from ..engine.device import pick_device, set_threads
from ..engine.register import register
from ..engine.resample import resample
from ..engine.weights import find_weights, load_models
from ..errors import WeightsError
from ..io.atomic import OutputSet
from ..io.images import save_image
from ..ops.rotation import rotation
from ..transforms.base import Affine, ImageGrid
from ..transforms.io import save_transform


def rotation4(rx: float, ry: float, rz: float) -> np.ndarray:
    """4x4 rotation about the RAS axes (degrees), x applied first."""
    out = np.eye(4)
    out[:3, :3] = rotation((rx, ry, rz))
    return out


def make_pair(outdir: Path) -> tuple[Path, Path, Affine]:
    """Fixed: the template (1 mm). Moving: T2-like contrast, on an oblique 1.2 x 1 x 1.5 mm
    grid, moved by a known rigid + scale transform. Returns the true pull-back."""
    from nilearn.datasets import load_mni152_template

    tpl = load_mni152_template(resolution=1)
    data = np.asarray(tpl.get_fdata(), np.float32)
    fixed = nb.Nifti1Image(data, tpl.affine)
    # anatomy at fixed point p sits at moving point A p
    move = rotation4(8, -6, 10)
    move[:3, :3] *= 1.04
    move[:3, 3] = [10, -7, 5]
    truth = Affine(move)  # fixed RAS -> moving RAS
    grid_rot = rotation4(12, -9, 5)
    vox = np.diag([1.2, 1.0, 1.5, 1.0])
    shape = (170, 200, 135)
    mov_affine = grid_rot @ vox
    center = move[:3, :3] @ np.array([0.0, -18.0, 18.0]) + move[:3, 3]
    mov_affine[:3, 3] = center - mov_affine[:3, :3] @ (np.array(shape) / 2)
    recontrast = nb.Nifti1Image(np.interp(data, [0, .05, .3, .65, .87, 1],
                                          [0, .15, 1, .6, .35, .3]).astype(np.float32),
                                tpl.affine)
    moving = resample(recontrast, truth.inverse(), ImageGrid.make(shape, mov_affine))
    with OutputSet() as out:
        save_image(fixed, out.temp(outdir / "fixed.nii.gz"))
        save_image(moving, out.temp(outdir / "moving.nii.gz"))
        save_transform(out.temp(outdir / "true_fwd.txt"), truth)
        save_transform(out.temp(outdir / "true_fwd.lta"), truth,
                       source=ImageGrid.make(shape, mov_affine),
                       reference=ImageGrid.from_image(fixed))
    return outdir / "moving.nii.gz", outdir / "fixed.nii.gz", truth


def run(args: argparse.Namespace) -> None:
    """``synthmorph demo``: write the pair, register it, print the error against the
    truth."""
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    OutputSet.check_writable(outdir / "fixed.nii.gz")
    moving_path, fixed_path, truth = make_pair(outdir)
    print(f"demo pair written to {outdir} (moving.nii.gz, fixed.nii.gz, true_fwd.txt/.lta)")
    try:
        files = find_weights(args.mode, args.weights)
    except WeightsError as err:
        if args.weights:
            raise
        print(f"not registered: {err}")
        return
    set_threads(args.threads)
    models = load_models(args.mode, files)
    moving, fixed = nb.load(moving_path), nb.load(fixed_path)
    result = register(moving, fixed, models, mode=args.mode, extent=args.extent,
                      device=pick_device(True if args.gpu else None))
    with OutputSet() as out:
        save_transform(out.temp(outdir / "fwd.h5"), result.forward)
        save_transform(out.temp(outdir / "inv.h5"), result.inverse)
        save_image(resample(moving, result.forward, result.fixed),
                   out.temp(outdir / "moved.nii.gz"))
    from nilearn.datasets import load_mni152_brain_mask

    mask = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0
    pts = ImageGrid.from_image(fixed).world_points()[mask][::50]
    err = np.linalg.norm(result.forward.map(pts) - truth.map(pts), axis=1)
    print(f"{args.mode} registration: mean error {err.mean():.2f} mm "
          f"(max {err.max():.2f} mm) against the known transform; "
          f"outputs fwd.h5, inv.h5, moved.nii.gz in {outdir}")
