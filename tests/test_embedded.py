"""The embedded models, as a fresh install uses them: no weights argument, no FreeSurfer,
the test-time refinement they recommend. Their transforms are read back by SimpleITK and
compared with the known answer."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import nibabel as nb
import numpy as np
import pytest
import SimpleITK as sitk

from synthmorph_nipype.engine.weights import find_weights, load_models
from synthmorph_nipype.ops.rotation import rotation
from synthmorph_nipype.transforms.base import ImageGrid

CLI = [sys.executable, "-m", "synthmorph_nipype.cli.main"]
LPS = np.array([-1.0, -1.0, 1.0])


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("FREESURFER_HOME", "SYNTHMORPH_WEIGHTS_DIR")}


def _itk_map(path, points_ras: np.ndarray) -> np.ndarray:
    """RAS points through an ITK (LPS) transform file, read by SimpleITK."""
    tx = sitk.ReadTransform(str(path))
    return np.array([np.array(tx.TransformPoint(tuple(p * LPS))) * LPS for p in points_ras])


def test_embedded_models_are_found_and_recommend_refinement():
    for mode in ("affine", "rigid", "joint", "deform"):
        files = find_weights(mode)
        assert all(f.parent.name == "data" and f.suffix == ".pt" for f in files)
    joint = load_models("joint", find_weights("joint"))
    assert joint.refine_affine > 0 and joint.refine > 0
    sizes = sum(f.stat().st_size for f in {*find_weights("affine"), *find_weights("joint")})
    assert sizes <= 25e6


def test_demo_affine_error_below_a_millimetre_and_read_by_simpleitk(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([*CLI, "demo", str(out), "-m", "affine", "-e", "192", "-j", "2"],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    error = float(re.search(r"mean error ([0-9.]+) mm", result.stdout).group(1))
    assert error < 1.0, result.stdout
    # independently: SimpleITK maps brain points through ours and through the truth
    fixed = nb.load(out / "fixed.nii.gz")
    data = np.asarray(fixed.dataobj)
    pts = ImageGrid.from_image(fixed).world_points()[data > 0.3 * data.max()][::400]
    dist = np.linalg.norm(_itk_map(out / "fwd.h5", pts) - _itk_map(out / "true_fwd.txt", pts),
                          axis=1)
    assert dist.mean() < 1.0 and dist.mean() == pytest.approx(error, abs=0.3)


def test_register_without_weights(nipype_pair, tmp_path):
    fwd = tmp_path / "fwd.h5"
    result = subprocess.run([*CLI, "register", str(nipype_pair["moving"]),
                             str(nipype_pair["fixed"]), "-t", str(fwd), "-e", "192", "-j", "2"],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "affine refinement (mind)" in result.stdout
    assert "register: refinement (mind+mi)" in result.stdout
    # the pair: the same data under a header rotated (5, -3, 6) deg and shifted (4, -6, 3)
    truth = np.eye(4)
    truth[:3, :3], truth[:3, 3] = rotation((5.0, -3.0, 6.0)), (4.0, -6.0, 3.0)
    fixed = nb.load(nipype_pair["fixed"])
    data = np.asarray(fixed.dataobj)
    pts = ImageGrid.from_image(fixed).world_points()[data > 0.3 * data.max()][::200]
    expected = pts @ truth[:3, :3].T + truth[:3, 3]
    dist = np.linalg.norm(_itk_map(fwd, pts) - expected, axis=1)
    assert dist.mean() < 1.5, dist.mean()
