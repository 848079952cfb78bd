"""Shared fixtures: a small template image and tiny random-weight models.

Everything is made here from what the installed packages ship (nilearn's template);
nothing is read from outside the project.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch

from synthmorph_nipype.models.checkpoint import save_checkpoint

from .helpers import tiny_models

# pytest-xdist workers share the cores: one worker's torch threads get its share
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))
                              // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """Torch checkpoints of tiny random models: ``affine`` (detector), ``joint``
    (detector + hyper U-Net, also used for ``deform``)."""
    root = tmp_path_factory.mktemp("weights")
    affine, deform = tiny_models()
    paths = {"affine": root / "affine.pt", "joint": root / "joint.pt"}
    save_checkpoint(paths["affine"], affine=affine)
    save_checkpoint(paths["joint"], affine=affine, deform=deform)
    return paths


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """nilearn's bundled ICBM152 2009 template at 2 mm (99 x 117 x 95), float32, RAS."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32)
    out = tmp_path_factory.mktemp("template") / "template.nii.gz"
    nb.save(nb.Nifti1Image(data, img.affine), out)
    return out


@pytest.fixture(scope="session")
def nipype_pair(template, tiny_weights, tmp_path_factory) -> dict[str, Path]:
    """Inputs of the Nipype tests: the 2 mm template as ``fixed``; ``moving``, the same data
    under a rotated and shifted header (plus a brain ``mask`` and ``labels`` on its grid);
    ``moving_2``, another shift; and the tiny ``weights`` (joint)."""
    from synthmorph_nipype.ops.rotation import rotation

    root = tmp_path_factory.mktemp("nipype_pair")
    img = nb.load(template)
    data = np.asarray(img.dataobj, dtype=np.float32)
    out = {"fixed": root / "fixed.nii.gz", "weights": tiny_weights["joint"]}
    nb.save(nb.Nifti1Image(data, img.affine), out["fixed"])
    for name, rot, shift in (("moving", (5.0, -3.0, 6.0), (4.0, -6.0, 3.0)),
                             ("moving_2", (-2.0, 4.0, 0.0), (-5.0, 2.0, 6.0))):
        move = np.eye(4)
        move[:3, :3], move[:3, 3] = rotation(rot), shift
        affine = move @ img.affine
        out[name] = root / f"{name}.nii.gz"
        nb.save(nb.Nifti1Image(data, affine), out[name])
        if name == "moving":
            out["mask"] = root / "mask.nii.gz"
            nb.save(nb.Nifti1Image((data > 0.2 * data.max()).astype(np.uint8), affine),
                    out["mask"])
            out["labels"] = root / "labels.nii.gz"
            nb.save(nb.Nifti1Image(np.digitize(data, np.quantile(data, [0.5, 0.8]))
                                   .astype(np.int16), affine), out["labels"])
    return out
